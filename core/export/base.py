"""Exporter protocol and registry."""
from __future__ import annotations

import importlib
import json
from typing import Any, Callable, ClassVar, Mapping, Protocol

import torch

from core.qtensors import QuantizedWeight


class Exporter(Protocol):
    name: ClassVar[str]  # e.g. "compressed-tensors"
    loaders: ClassVar[str]  # who can run it, for messages and docs: "transformers, vLLM"
    # Optional: why the layout cannot store a ragged last group (group_size not dividing a
    # linear's in_features), e.g. "transformers and vLLM refuse such checkpoints"; absent or None
    # when it can (GPTQ: ceil(in/group_size) scale rows).
    ragged_reason: ClassVar[str | None]

    def accepts(self, method_config: Any) -> str | None:
        """None if this layout can represent the method's output, else the reason it cannot."""
        ...

    def tensors(self, name: str, q: QuantizedWeight) -> dict[str, torch.Tensor]:
        """Tensors to store for linear `name` (full module name, e.g. "model.layers.0.mlp.up_proj"),
        keyed by full tensor name."""
        ...

    def quantization_config(self, method_config: Any, quantized: list[str], ignored: list[str]) -> dict:
        """The `quantization_config` block of config.json, as the consuming library defines it."""
        ...

    @classmethod
    def detect(cls, quantization_config: dict) -> bool:
        """Whether a config.json `quantization_config` is in this layout."""
        ...

    def read_weight(
        self, name: str, get: Callable[[str], torch.Tensor | None], quantization_config: dict
    ) -> QuantizedWeight | None:
        """Rebuild linear `name` from stored tensors (`get(tensor_name)` returns None when absent);
        None when the module was stored unquantized."""
        ...


def json_sidecar(filename: str, doc: dict[str, Any]) -> dict[str, str]:
    """An `extra_files` entry: `doc` as indented JSON with a trailing newline, the one way every
    layout writes its sidecar config so that all of them read and diff alike."""
    return {filename: json.dumps(doc, indent=2) + "\n"}


def read_packed(
    name: str, get: Callable[[str], torch.Tensor | None], layout: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`qweight`, `qzeros`, `scales` of linear `name` in the packed-int32 layouts (GPTQ, AWQ),
    which name their tensors alike; None when the module was stored unquantized. A qweight
    without its zeros or scales is refused rather than read as a float module."""
    qweight = get(f"{name}.qweight")
    if qweight is None:
        return None
    qzeros, scales = get(f"{name}.qzeros"), get(f"{name}.scales")
    if qzeros is None or scales is None:
        raise ValueError(f"{name}: {layout} qweight without qzeros/scales; the checkpoint is incomplete")
    return qweight, qzeros, scales


_REGISTRY: dict[str, type] = {}
_MODULES = {
    "compressed-tensors": "core.export.compressed_tensors",
    "bitsandbytes": "core.export.bnb",
    "gptq": "core.export.gptq",
    "awq": "core.export.awq",
}


def register_exporter(cls: type) -> type:
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    for module in _MODULES.values():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:  # a format whose writer is not present yet
            if exc.name != module:
                raise


def get_exporter(name: str) -> Exporter:
    if name not in _REGISTRY and name in _MODULES:
        importlib.import_module(_MODULES[name])
    if name not in _REGISTRY:
        raise ValueError(f"unknown export format {name!r} (known: {', '.join(sorted(_MODULES))}, gguf)")
    return _REGISTRY[name]()


def exporters_accepting(method_config: Any) -> list[str]:
    _load_all()
    return sorted(n for n, cls in _REGISTRY.items() if cls().accepts(method_config) is None)


def _default_layout(method_config: Any) -> str:
    method = method_config.method
    if method in ("nf4", "fp4", "llm_int8"):
        return "bitsandbytes"
    if method in ("rtn", "gptq", "awq") and not method_config.sym:
        return "awq" if method == "awq" and method_config.bits == 4 else "gptq"
    if method == "gptq" and method_config.act_order and not getattr(method_config, "static_groups", True):
        # compressed-tensors no longer stores a g_idx, so a non-monotonic (act-order without static
        # groups) column-to-group map only fits the GPTQ layout.
        return "gptq"
    return "compressed-tensors"


def default_export(method_config: Any, in_features: Mapping[str, int] | None = None) -> str:
    """The layout a method's output is written in when the user names none.

    `in_features` ({linear name: in_features} of the linears to quantize), when given, lets the
    choice see the model: a group size that leaves a ragged last group in some linear moves a
    default that cannot store it (compressed-tensors, AWQ) to the GPTQ layout, which can."""
    name = _default_layout(method_config)
    if in_features and ragged_linears(method_config, in_features) and ragged_refusal_reason(name) is not None:
        if get_exporter("gptq").accepts(method_config) is None:
            return "gptq"
    return name


def ragged_linears(method_config: Any, in_features: Mapping[str, int]) -> dict[str, int]:
    """{linear: in_features} of the linears whose last group is ragged under the method's grid
    (per-group granularity with a group size that does not divide in_features)."""
    from core.config import Granularity
    from core.primitives import ragged_tail

    granularity = getattr(method_config, "granularity", None)
    group_size = getattr(method_config, "group_size", None)
    if granularity is None or group_size is None or Granularity(granularity) is not Granularity.GROUP:
        return {}
    return {n: w for n, w in in_features.items() if ragged_tail(int(w), int(group_size))}


def ragged_refusal_reason(export_name: str) -> str | None:
    """Why layout `export_name` cannot store a ragged last group, or None when it can."""
    try:
        cls = type(get_exporter(export_name))
    except (ValueError, ModuleNotFoundError):
        return None
    return getattr(cls, "ragged_reason", None)


def ragged_refusal(
    export_name: str, linear: str, in_features: int, group_size: int, widths: Any = (), *,
    flag: str = "--export", requantize: bool = False, gptq_ok: bool = True,
) -> str | None:
    """The one-line refusal for writing `linear` (whose last group of `group_size` columns is
    ragged) in layout `export_name`, or None when the layout stores ragged groups. The fix names
    the GPTQ layout (`flag` gptq, when `gptq_ok`) and group sizes that divide every width in
    `widths` (re-quantizing first when `requantize`)."""
    from core.primitives import common_divisor_hint

    reason = ragged_refusal_reason(export_name)
    if reason is None:
        return None
    hint = common_divisor_hint(set(widths) or {in_features}, group_size)
    fixes = [f"{flag} gptq"] if gptq_ok else []
    if hint:
        fixes.append(("quantize again with " if requantize else "") + f"--group-size {hint}")
    fix = ", or ".join(fixes) if fixes else "--group-size -1 (per-channel)"
    return (f"{export_name} needs group_size to divide in_features ({in_features} % {group_size} ≠ 0 in "
            f"{linear}; {reason}): use {fix}")


def detect_exporter(quantization_config: dict) -> Exporter:
    _load_all()
    for cls in _REGISTRY.values():
        if cls.detect(quantization_config):
            return cls()
    method = quantization_config.get("quant_method", "?")
    raise ValueError(f"unsupported quantization_config (quant_method={method!r}); known: {', '.join(sorted(_REGISTRY))}")
