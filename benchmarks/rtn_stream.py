"""Streaming RTN benchmark: throughput and peak memory of `run_quantization` on a synthetic
Llama-architecture model, against the raw read speed of the same files.

    python benchmarks/rtn_stream.py --params 1b [--rounds N] [--workdir DIR] [--cache cold|warm] [--keep-output]

The model (bf16 random weights, one shard per decoder layer) is generated once, tensor by tensor,
so generation never holds more than one layer, and cached under the user cache directory (or
--workdir). The quantization (RTN INT4, group 128, symmetric, compressed-tensors layout) runs in
a child process so its peak RSS (ru_maxrss) is not polluted by the generation. With --cache cold
(default) each file is evicted from the page cache (posix_fadvise DONTNEED) before both the raw
read and the quantization, so both measure the same thing. Each round reads the files raw, then
quantizes, then reads them raw again: the disk of a VM can change speed within minutes, so the
quantization is compared with the reads on both sides of it. "anon / file" are the job's sampled
peaks of anonymous and file-backed resident memory (RssAnon / RssFile, every 50 ms): the mapped
source pages are reclaimable page cache, anonymous memory is what can run a machine out of RAM.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

GIB = 2**30

# Llama-architecture shapes of common sizes (hidden, intermediate, layers, heads, kv heads, vocab, tied).
PRESETS: dict[str, tuple[int, int, int, int, int, int, bool]] = {
    "tiny": (512, 1536, 4, 8, 4, 32000, False),
    "1b": (2048, 8192, 16, 32, 8, 128256, True),  # Llama-3.2-1B
    "3b": (3072, 8192, 28, 24, 8, 128256, True),  # Llama-3.2-3B
    "8b": (4096, 14336, 32, 32, 8, 128256, False),  # Llama-3.1-8B
    "14b": (5120, 13824, 48, 40, 8, 152064, False),  # Qwen2.5-14B shapes, Llama architecture
}


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "quantscope" / "bench"


def _config(preset: str) -> dict:
    hidden, inter, layers, heads, kv, vocab, tied = PRESETS[preset]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": hidden // heads, "vocab_size": vocab, "tie_word_embeddings": tied,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
        "hidden_act": "silu", "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }


def _layer_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    return {
        "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i), "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
    }


def _random(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def generate(folder: Path, preset: str) -> Path:
    """Write the synthetic model shard by shard (one decoder layer in memory at a time)."""
    done_marker = folder / ".complete"
    if done_marker.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cfg = _config(preset)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(0)
    n_layers = cfg["num_hidden_layers"]
    groups: list[dict[str, tuple[int, ...]]] = [{"model.embed_tokens.weight": (cfg["vocab_size"], cfg["hidden_size"])}]
    for li in range(n_layers):
        groups.append({f"model.layers.{li}.{k}": v for k, v in _layer_shapes(cfg).items()})
    head = {"model.norm.weight": (cfg["hidden_size"],)}
    if not cfg["tie_word_embeddings"]:
        head["lm_head.weight"] = (cfg["vocab_size"], cfg["hidden_size"])
    groups.append(head)
    weight_map: dict[str, str] = {}
    for si, group in enumerate(groups):
        name = f"model-{si + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: _random(s, gen) for k, s in group.items()}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        del tensors
        print(f"\rgenerating {preset}: shard {si + 1}/{len(groups)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    done_marker.touch()
    return folder


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def evict(folder: Path) -> None:
    """Drop the files from the page cache so the next read comes from disk."""
    for f in _weight_files(folder):
        with open(f, "rb") as h:
            os.posix_fadvise(h.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def raw_read(folder: Path, chunk: int = 64 << 20) -> tuple[int, float]:
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for f in _weight_files(folder):
        with open(f, "rb", buffering=0) as h:
            while n := h.readinto(view):
                total += n
    return total, time.perf_counter() - t0


def quantize_child(model: Path, out: Path) -> None:
    """Runs in the child process: quantize and print one JSON line."""
    from core.config import QuantJob, RTNConfig
    from core.engine import run_quantization

    r = run_quantization(QuantJob(model, out, RTNConfig(bits=4, group_size=128, sym=True), overwrite=True))
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": r.seconds, "peak_rss_gib": r.peak_rss_gib, "maxrss_gib": maxrss / GIB,
                      "peak_anon_gib": r.peak_rss_anon_gib, "peak_file_gib": r.peak_rss_file_gib,
                      "source_gib": r.source_gib, "output_gib": r.output_gib,
                      "mean_rel_error": sum(x["rel_error"] for x in r.layers) / len(r.layers)}))


def _quantize(model: Path, out: Path) -> dict:
    child = subprocess.run([sys.executable, __file__, "--child", str(model), str(out)], check=False,
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if child.returncode != 0:
        sys.stderr.write(child.stderr)
        raise SystemExit(child.returncode)
    return json.loads(child.stdout.strip().splitlines()[-1])


def _read_gbs(model: Path, cold: bool) -> tuple[int, float]:
    """(bytes, GB/s) of one raw read of the model's files (evicted first when cold)."""
    if cold:
        evict(model)
    nbytes, seconds = raw_read(model)
    return nbytes, nbytes / seconds / 1e9


def _round(model: Path, out: Path, cold: bool) -> dict:
    """raw read, quantize, raw read again: this VM's disk speed drifts within minutes, so each
    quantization is compared with the reads on either side of it."""
    nbytes, before = _read_gbs(model, cold)
    if cold:
        evict(model)
    else:
        raw_read(model)  # the quantization sees the same warm cache
    q = _quantize(model, out)
    _, after = _read_gbs(model, cold)
    q.update(raw_before_gbs=before, raw_after_gbs=after, nbytes=nbytes)
    return q


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", choices=sorted(PRESETS), default="1b")
    p.add_argument("--workdir", type=Path, default=None, help=f"where models are cached (default {_cache_root()})")
    p.add_argument("--cache", choices=("cold", "warm"), default="cold")
    p.add_argument("--rounds", type=int, default=1, help="raw read / quantize / raw read rounds (default 1)")
    p.add_argument("--keep-output", action="store_true")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        quantize_child(Path(args.child[0]), Path(args.child[1]))
        return 0

    root = args.workdir or _cache_root()
    model = generate(root / f"llama-{args.params}-bf16", args.params)
    out = root / f"llama-{args.params}-rtn-int4-g128"
    nbytes = sum(f.stat().st_size for f in _weight_files(model))
    print(f"model: llama {args.params} ({nbytes / 2 / 1e9:.2f} B params, bf16, {nbytes / GIB:.2f} GiB); "
          f"cache {args.cache}; torch threads {torch.get_num_threads()}")
    header = ("round", "raw read before", "quantize", "source GB/s", "raw read after", "x raw (before/after)",
              "peak RSS", "anon / file", "ru_maxrss")
    rows = []
    for i in range(args.rounds):
        q = _round(model, out, args.cache == "cold")
        src_gbs = q["nbytes"] / q["seconds"] / 1e9
        rows.append((str(i + 1), f"{q['raw_before_gbs']:.3f} GB/s", f"{q['seconds']:.1f} s", f"{src_gbs:.3f}",
                     f"{q['raw_after_gbs']:.3f} GB/s",
                     f"{src_gbs / q['raw_before_gbs']:.2f} / {src_gbs / q['raw_after_gbs']:.2f}",
                     f"{q['peak_rss_gib']:.2f} GiB", _split(q), f"{q['maxrss_gib']:.2f} GiB"))
        if not args.keep_output:
            shutil.rmtree(out, ignore_errors=True)
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    print(f"output {q['output_gib']:.2f} GiB, mean rel error {q['mean_rel_error']:.4f} "
          f"(RTN int4 g128 symmetric, compressed-tensors)")
    return 0


def _split(q: dict) -> str:
    """Sampled peaks of anonymous (what can exhaust RAM) and file-backed (mapped weights,
    reclaimable) resident memory; the two peaks need not be simultaneous."""
    if q.get("peak_anon_gib") is None:
        return "-"
    return f"{q['peak_anon_gib']:.2f} / {q['peak_file_gib']:.2f} GiB"


if __name__ == "__main__":
    sys.exit(main())
