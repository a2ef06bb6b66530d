"""Plain facts about a model for the sidebar: architecture, parameters, dtype, size, layers.
No Qt here so it can be tested and reused by the report writer."""
from __future__ import annotations

from pathlib import Path
from typing import Any

GIB = 1024 ** 3


def human_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)}"


def human_bytes(n: float) -> str:
    for unit, div in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def folder_size(path: Path) -> int:
    """Bytes of all regular files under `path` (what the folder costs on disk)."""
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:
            continue
    return total


def describe_source(source: Any, path: Path | None = None) -> dict[str, str]:
    """Rows for the model panel. Works on a `ModelSource` (local folder) and on anything with a
    `config` dict (catalog entries), reading only what is present."""
    rows: dict[str, str] = {}
    config: dict = getattr(source, "config", None) or {}
    arch = getattr(source, "architecture", None) or (config.get("architectures") or [config.get("model_type", "?")])[0]
    rows["Architecture"] = str(arch)
    tensors = getattr(source, "tensors", None) or {}
    qc = getattr(source, "quantization_config", None)
    if tensors:
        params = sum(_numel(t) for t in tensors.values())
        if qc:
            # Packed tensors hold several values per element: count what the config describes.
            logical = _config_params(config)
            if logical:
                rows["Parameters"] = f"{human_count(logical)} (from config.json)"
        else:
            rows["Parameters"] = human_count(params)
        dtypes: dict[str, int] = {}
        for t in tensors.values():
            dtypes[str(t.dtype)] = dtypes.get(str(t.dtype), 0) + int(t.nbytes)
        rows["Dtype"] = ", ".join(d for d, _ in sorted(dtypes.items(), key=lambda kv: -kv[1]))
        rows["Tensor bytes"] = human_bytes(sum(int(t.nbytes) for t in tensors.values()))
    else:
        count = _catalog_params(source)
        if count:
            rows["Parameters"] = human_count(count)
        dt = config.get("torch_dtype") or config.get("dtype")
        if dt:
            rows["Dtype"] = str(dt)
    if path is not None:
        rows["Size on disk"] = human_bytes(folder_size(path))
    layers = getattr(source, "num_layers", None) or config.get("num_hidden_layers")
    if layers:
        rows["Layers"] = str(layers)
    hidden = config.get("hidden_size")
    if hidden:
        heads = config.get("num_attention_heads")
        kv = config.get("num_key_value_heads", heads)
        rows["Hidden / heads"] = f"{hidden} / {heads} (KV {kv})"
    ctx = config.get("max_position_embeddings")
    if ctx:
        rows["Max context"] = f"{int(ctx):,}"
    if qc:
        rows["Quantized"] = quantization_summary(qc)
    if not tensors and path is not None:
        rows["Weights"] = "none (config only: planning works, quantizing needs weights)"
    return rows


def _numel(t: Any) -> int:
    n = getattr(t, "numel", None)
    if callable(n):
        return int(n())
    if n is not None:
        return int(n)
    out = 1
    for d in t.shape:
        out *= int(d)
    return out


def _catalog_params(source: Any) -> int | None:
    for attr in ("total_params", "params", "num_params", "parameters"):
        value = getattr(source, attr, None)
        if callable(value):
            try:
                value = value()
            except TypeError:
                continue
        if isinstance(value, (int, float)) and value > 0:
            return int(value)
    return None


def _config_params(config: dict) -> int | None:
    from core.param_count import from_config

    try:
        return int(from_config({k: v for k, v in config.items() if k != "quantization_config"}).total_params)
    except (ValueError, KeyError, TypeError):
        return None


_METHOD_NAMES = {"gptq": "GPTQ", "awq": "AWQ", "compressed-tensors": "compressed-tensors",
                 "bitsandbytes": "bitsandbytes", "fp8": "FP8"}


def quantization_summary(qc: dict) -> str:
    """A checkpoint's `quantization_config` in words: method, bits, group size, symmetry
    ("GPTQ 4-bit, group 64, symmetric"), whichever of them the config states."""
    method = str(qc.get("quant_method", "?")).lower()
    name = _METHOD_NAMES.get(method, method)
    if method == "bitsandbytes":
        if qc.get("load_in_8bit"):
            return "bitsandbytes int8 (LLM.int8)"
        kind = str(qc.get("bnb_4bit_quant_type", "nf4"))
        return f"bitsandbytes 4-bit {kind}" + (", double quantization" if qc.get("bnb_4bit_use_double_quant") else "")
    bits, group, sym, kind = qc.get("bits"), qc.get("group_size"), qc.get("sym"), None
    if method == "compressed-tensors":
        for cg in (qc.get("config_groups") or {}).values():
            w = (cg or {}).get("weights") or {}
            bits, group, sym, kind = w.get("num_bits"), w.get("group_size"), w.get("symmetric"), w.get("type")
            break
    parts = [name + (f" {kind}{bits}" if kind and bits else f" {bits}-bit" if bits else "")]
    if group and int(group) > 0:
        parts.append(f"group {group}")
    elif bits:
        parts.append("per channel")
    if sym is not None:
        parts.append("symmetric" if sym else "asymmetric")
    if qc.get("desc_act"):
        parts.append("act-order")
    return ", ".join(parts)
