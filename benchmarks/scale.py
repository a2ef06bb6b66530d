"""GPTQ at scale: seconds per decoder layer, extrapolated whole-model time and peak host and device
memory of `run_quantization` on a Llama-3.1-8B-shaped model, on the CPU (1, 2, … threads) or a GPU.

    python benchmarks/scale.py [--model llama-3.1-8b] [--layers K] [--samples 128] [--seq-len 2048]
                               [--device cpu|cuda|cuda:N] [--threads N] [--reference] [--json]

The model is built from the catalog config (resources/models.json) with random bf16 weights
written as safetensors, one shard per decoder layer, and only its first K decoder layers
(--layers, default 2): every decoder layer of the architecture has the same shapes, so the
whole-model time is the calibration set-up plus the number of layers × the steady per-layer time
(layers after the first, which also pays one-off costs; the first when K = 1). The vocabulary is
that of a small byte-level BPE tokenizer trained on the built-in calibration text (embedding and
lm_head are copied, not quantized: they change the copy time, not the per-layer time).

Method: GPTQ W4, group 128, symmetric, static groups (the engine's defaults), builtin
calibration text, `--samples` × `--seq-len` tokens (default 128 × 2048, the usual setting).

Memory: peak host RSS is sampled every 20 ms from /proc/self/status and split into RssAnon
(heap and tensors: what can run a machine out of RAM) and RssFile (memory-mapped weight pages:
page cache the kernel reclaims); peak device memory is torch.cuda.max_memory_allocated.

--reference adds a side-by-side on decoder layer 0, same inputs and device: the engine's GPTQ
layer step (its staged true-sequential pass: Hessians, solves and the layer's output) against a
compact re-implementation of the reference IST-DASLab gptq.py loop (`add_batch` per linear via
hooks, `fasterquant` per linear, true-sequential groups as its llama.py runs them, then the
layer's output), timed the same way.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core import devices  # noqa: E402
from core.events import Log  # noqa: E402

GIB = 2**30


# -- the model ---------------------------------------------------------------------------------

def _tokenizer(folder: Path, vocab: int = 512) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from core.calibration import calibration_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = calibration_text("builtin")
    tok.train_from_iterator([text[i:i + 100_000] for i in range(0, len(text), 100_000)], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def build_model(folder: Path, catalog_id: str, layers: int) -> dict[str, Any]:
    """Write the first `layers` decoder layers of the catalog model `catalog_id` (random bf16
    weights, std 0.02) into `folder`; returns the full config (with the real layer count)."""
    from safetensors.torch import save_file

    from core.catalog import models

    entry = next((m for m in models() if m.id == catalog_id), None)
    if entry is None:
        raise SystemExit(f"no catalog model {catalog_id!r}; see `quantscope catalog models`")
    full = dict(entry.config)
    folder.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(folder)
    h, inter = full["hidden_size"], full["intermediate_size"]
    heads, kv = full["num_attention_heads"], full["num_key_value_heads"]
    hd = full.get("head_dim", h // heads)
    cfg = dict(full, num_hidden_layers=layers, vocab_size=len(tok), tie_word_embeddings=False, head_dim=hd,
               max_position_embeddings=max(4096, int(full.get("max_position_embeddings", 4096))),
               rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu", bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, torch_dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    shapes = {"self_attn.q_proj.weight": (heads * hd, h), "self_attn.k_proj.weight": (kv * hd, h),
              "self_attn.v_proj.weight": (kv * hd, h), "self_attn.o_proj.weight": (h, heads * hd),
              "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h), "mlp.down_proj.weight": (h, inter)}
    groups: list[dict[str, torch.Tensor]] = [{"model.embed_tokens.weight": rnd(len(tok), h)}]
    files: list[str] = []
    weight_map: dict[str, str] = {}
    total = layers + 2
    for k in range(total):
        if k == 0:
            tensors = groups[0]
        elif k <= layers:
            p = f"model.layers.{k - 1}."
            tensors = {p + n: rnd(*s) for n, s in shapes.items()}
            tensors[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
            tensors[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        else:
            tensors = {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16), "lm_head.weight": rnd(len(tok), h)}
        name = f"model-{k + 1:05d}-of-{total:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({n: name for n in tensors})
        files.append(name)
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return full


# -- memory ------------------------------------------------------------------------------------

class RssSampler:
    """Peak RssAnon / RssFile / total of this process, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.02) -> None:
        self.peak = {"RssAnon": 0, "RssFile": 0, "total": 0}
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True, name="scale-rss")

    def sample(self) -> None:
        r = devices.rss_breakdown()
        if not r:
            return
        total = r.get("RssAnon", 0) + r.get("RssFile", 0) + r.get("RssShmem", 0)
        for k, v in (("RssAnon", r.get("RssAnon", 0)), ("RssFile", r.get("RssFile", 0)), ("total", total)):
            self.peak[k] = max(self.peak[k], v)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# -- the engine run ----------------------------------------------------------------------------

def run_engine(model: Path, out: Path, samples: int, seq_len: int, device: str, threads: int | None,
               full_layers: int) -> dict[str, Any]:
    from core.config import CalibConfig, GPTQConfig, QuantJob
    from core.engine import run_quantization

    job = QuantJob(model, out, GPTQConfig(bits=4, group_size=128), calib=CalibConfig(samples=samples, seq_len=seq_len),
                   device=device, threads=threads, overwrite=True)
    stamps: list[float] = []
    calib_done: list[float] = []
    t0 = time.perf_counter()

    def sink(e: Any) -> None:
        if isinstance(e, Log):
            if e.message.startswith("calibration:"):
                calib_done.append(time.perf_counter())
            elif e.message.startswith("layer ") and e.message.endswith(" done"):
                stamps.append(time.perf_counter())
            print(f"  [{time.perf_counter() - t0:7.1f}s] {e.message}", file=sys.stderr, flush=True)

    with RssSampler() as rss:
        result = run_quantization(job, sink=sink)
    total = time.perf_counter() - t0
    start = calib_done[0] if calib_done else t0
    per_layer = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    steady = per_layer[1:] or per_layer
    layer_s = sum(steady) / len(steady)
    setup = start - t0
    return {
        "device": result.device, "threads": result.threads, "layers_run": len(per_layer),
        "first_layer_s": per_layer[0], "layer_s": layer_s, "setup_s": setup,
        "whole_model_s": setup + full_layers * layer_s, "run_s": total,
        "peak_rss_gib": rss.peak["total"] / GIB, "peak_rss_anon_gib": rss.peak["RssAnon"] / GIB,
        "peak_rss_file_gib": rss.peak["RssFile"] / GIB, "peak_device_gib": result.peak_device_gib,
        "mean_rel_error": sum(r["rel_error"] for r in result.layers) / max(len(result.layers), 1),
    }


# -- reference side by side ------------------------------------------------------------------

class ReferenceGPTQ:
    """The reference gptq.py algorithm (DESIGN notes: H = 2/n Σ x xᵀ, dead columns, damp 1 % of
    mean diag, upper Cholesky of H⁻¹, blocks of 128 columns, lazy batch updates, per-group grid
    found when a group's first column comes up), written compactly for timing."""

    def __init__(self, layer: torch.nn.Linear) -> None:
        self.layer = layer
        self.columns = layer.weight.shape[1]
        self.H = torch.zeros(self.columns, self.columns, device=layer.weight.device)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        inp = inp.reshape(-1, inp.shape[-1]).t().float()
        tmp = inp.shape[1]
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = math.sqrt(2 / self.nsamples) * inp
        self.H += inp.matmul(inp.t())

    @staticmethod
    def _params(x: torch.Tensor, maxq: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
        zero_t = torch.zeros(x.shape[0], device=x.device)
        xmin = torch.minimum(x.min(1).values, zero_t)
        xmax = torch.maximum(x.max(1).values, zero_t)
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        both = (xmin == 0) & (xmax == 0)
        xmin[both], xmax[both] = -1, 1
        scale = (xmax - xmin) / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
        return scale.unsqueeze(1), zero.unsqueeze(1)

    def fasterquant(self, bits: int = 4, groupsize: int = 128, blocksize: int = 128, percdamp: float = 0.01,
                    sym: bool = True) -> torch.Tensor:
        maxq = 2**bits - 1
        W = self.layer.weight.data.clone().float()
        H = self.H
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        Q = torch.zeros_like(W)
        damp = percdamp * torch.mean(torch.diag(H))
        idx = torch.arange(self.columns, device=W.device)
        H[idx, idx] += damp
        H = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(H)
        Hinv = torch.linalg.cholesky(H, upper=True)
        scale, zero = self._params(W, maxq, sym)
        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                w = W1[:, i]
                d = Hinv1[i, i]
                if groupsize != -1 and (i1 + i) % groupsize == 0:
                    scale, zero = self._params(W[:, i1 + i:i1 + i + groupsize], maxq, sym)
                q = torch.clamp(torch.round(w.unsqueeze(1) / scale) + zero, 0, maxq)
                q = (scale * (q - zero)).flatten()
                Q1[:, i] = q
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            Q[:, i1:i2] = Q1
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        self.layer.weight.data = Q.to(self.layer.weight.dtype)
        self.H = torch.empty(0, device=W.device)
        return Q


def reference_layer(layer: torch.nn.Module, inputs: list[torch.Tensor], forward: Any) -> list[torch.Tensor]:
    """gptq.py's llama.py step for one decoder layer: true-sequential groups, hooks feeding
    add_batch over every calibration batch, fasterquant per linear; then the layer's outputs."""
    groups = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    for names in groups:
        gptq = {n: ReferenceGPTQ(layer.get_submodule(n)) for n in names}
        handles = [layer.get_submodule(n).register_forward_hook(
            lambda _m, args, _out, g=gptq[n]: g.add_batch(args[0].data)) for n in names]
        for x in inputs:
            forward(x)
        for h in handles:
            h.remove()
        for g in gptq.values():
            g.fasterquant()
    return [forward(x) for x in inputs]


def side_by_side(model: Path, samples: int, seq_len: int, device: str, threads: int | None) -> dict[str, Any]:
    """Engine GPTQ layer step vs the reference loop on decoder layer 0, same inputs and device."""
    from core.config import CalibConfig, GPTQConfig
    from core.engine import _build_calibration, materialise, meta_model
    from core.methods.base import LayerContext, get_quantizer
    from core.model_io import open_model

    src = open_model(model)
    dev = devices.resolve_device(device).device
    out: dict[str, Any] = {}
    with devices.thread_scope(threads), torch.no_grad():
        job_calib = CalibConfig(samples=samples, seq_len=seq_len)

        class _Job:
            calib = job_calib

        for impl in ("quantscope", "reference"):
            m, hf_config = meta_model(src)
            calib = _build_calibration(_Job, src, m, hf_config, lambda e: None, device=dev)
            layer = m.model.layers[0]
            materialise(layer, src.layer_prefix(0), src.load_tensors(src.layer_tensor_names(0)), src, device=dev)
            devices.reset_peak(dev)
            devices.synchronize(dev)
            t0 = time.perf_counter()
            if impl == "quantscope":
                linears = {n: mod for n, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)}
                extra: dict[str, Any] = {"metrics": {}}
                ctx = LayerContext(index=0, num_layers=1, prefix="model.layers.0", module=layer, linears=linears,
                                   inputs=calib.hidden, forward=calib.forward_fn(layer), extra=extra)
                get_quantizer(GPTQConfig(bits=4, group_size=128)).quantize_layer(ctx)
                if "propagated" not in extra:
                    [calib.forward_fn(layer)(h) for h in calib.hidden]
            else:
                reference_layer(layer, list(calib.hidden), calib.forward_fn(layer))
            devices.synchronize(dev)
            out[f"{impl}_layer_s"] = time.perf_counter() - t0
            out[f"{impl}_peak_device_gib"] = devices.device_memory_stats(dev).get("peak_allocated_gib")
            del layer, m, calib
    out["device"] = str(dev)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b", help="catalog id whose decoder shapes are used")
    p.add_argument("--layers", type=int, default=2, help="decoder layers to build and run (default 2)")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reference", action="store_true", help="also time the reference gptq.py loop on layer 0")
    p.add_argument("--workdir", type=Path, default=None, help="where the model is written (default: a temp dir)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.layers < 1:
        p.error("--layers must be at least 1")
    with tempfile.TemporaryDirectory(prefix="quantscope-scale-", dir=args.workdir) as tmp:
        folder = Path(tmp) / "model"
        t0 = time.perf_counter()
        full = build_model(folder, args.model, args.layers)
        print(f"built {args.layers} of {full['num_hidden_layers']} layers of {args.model} in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
        row = run_engine(folder, Path(tmp) / "out", args.samples, args.seq_len, args.device, args.threads,
                         int(full["num_hidden_layers"]))
        row.update(model=args.model, full_layers=int(full["num_hidden_layers"]), samples=args.samples,
                   seq_len=args.seq_len, cpu=_cpu_name(), gpu=_gpu_name(row["device"]))
        if args.reference:
            row["side_by_side"] = side_by_side(folder, args.samples, args.seq_len, args.device, args.threads)
    if args.json:
        json.dump(row, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    dev_mem = f"{row['peak_device_gib']:.2f}" if row["peak_device_gib"] is not None else "-"
    print(f"{'model':<14} {'device':<8} {'thr':>3} {'tokens':>11} {'layer s':>8} {'1st s':>7} {'setup s':>7} "
          f"{'whole model':>11} {'RSS anon':>8} {'RSS file':>8} {'dev GiB':>7}")
    print(f"{row['model']:<14} {row['device']:<8} {row['threads']:>3} {row['samples']:>4}x{row['seq_len']:<6} "
          f"{row['layer_s']:>8.2f} {row['first_layer_s']:>7.2f} {row['setup_s']:>7.2f} "
          f"{_hms(row['whole_model_s']):>11} {row['peak_rss_anon_gib']:>8.2f} {row['peak_rss_file_gib']:>8.2f} "
          f"{dev_mem:>7}")
    print(f"(whole model = setup + {row['full_layers']} layers x {row['layer_s']:.2f} s; "
          f"{row['layers_run']} layer(s) run; CPU {row['cpu']}; GPU {row['gpu'] or '-'})")
    if "side_by_side" in row:
        s = row["side_by_side"]
        print(f"layer 0 on {s['device']}: quantscope {s['quantscope_layer_s']:.2f} s, reference gptq.py loop "
              f"{s['reference_layer_s']:.2f} s ({s['reference_layer_s'] / s['quantscope_layer_s']:.2f}x)")
    return 0


def _hms(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({devices.available_threads()} cores usable)"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


def _gpu_name(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    return torch.cuda.get_device_name(torch.device(device))


if __name__ == "__main__":
    sys.exit(main())
