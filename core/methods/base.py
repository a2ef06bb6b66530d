"""The method protocol and the registry mapping a config class to its quantizer."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol

import torch
from torch import nn

from core.events import CancelToken, Sink, null_sink
from core.qtensors import QuantizedWeight


@dataclass
class LayerContext:
    """What a method may use to quantize one decoder layer.

    module: the decoder layer with real float32 weights on `device`. Methods that fold scales
        (SmoothQuant, AWQ) edit its norms/linears in place; the engine writes the module's
        remaining parameters as they are afterwards.
    linears: relative name -> nn.Linear, in true-sequential order
        (q/k/v → o → gate/up → down), already filtered by the job's skip list.
    inputs: calibration hidden states entering this layer, a list of [batch, seq, hidden]
        float32 tensors, or None for methods that need no calibration.
    forward: calls the layer on one input batch and returns its output hidden states, with
        rotary embeddings and the causal mask handled by the engine.
    """

    index: int
    num_layers: int
    prefix: str
    module: nn.Module
    linears: dict[str, nn.Linear]
    inputs: list[torch.Tensor] | None = None
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None
    cancel: CancelToken | None = None
    sink: Sink = null_sink
    extra: dict[str, Any] = field(default_factory=dict)


class Quantizer(Protocol):
    needs_calibration: ClassVar[bool]

    def __init__(self, config: Any) -> None: ...

    def quantize_layer(self, ctx: LayerContext) -> dict[str, QuantizedWeight]:
        """Return {relative linear name: quantized weight} for every linear in ctx.linears."""
        ...


_REGISTRY: dict[type, type] = {}

# Config class name -> module that registers its quantizer; imported lazily so that a broken or
# slow optional method never breaks the others.
_MODULES = {
    "RTNConfig": "core.methods.rtn",
    "FourBitConfig": "core.methods.fourbit",
    "FP8Config": "core.methods.fp8",
    "GPTQConfig": "core.methods.gptq",
    "AWQConfig": "core.methods.awq",
    "SmoothQuantConfig": "core.methods.smoothquant",
    "LLMInt8Config": "core.methods.llm_int8",
}


def register(config_cls: type) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        _REGISTRY[config_cls] = cls
        return cls

    return deco


def get_quantizer(config: Any) -> Quantizer:
    cls = type(config)
    if cls not in _REGISTRY and cls.__name__ in _MODULES:
        importlib.import_module(_MODULES[cls.__name__])
    if cls not in _REGISTRY:
        raise ValueError(f"no quantizer registered for {cls.__name__}")
    return _REGISTRY[cls](config)
