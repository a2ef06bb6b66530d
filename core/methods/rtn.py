"""Round-to-nearest affine integer quantization (no calibration)."""
from __future__ import annotations

from typing import Callable, ClassVar

import torch

from core.config import RTNConfig
from core.events import check_cancel
from core.methods.base import LayerContext, register
from core.primitives import quantize_to_intweight
from core.qtensors import QuantizedWeight


def source_dtype(ctx: LayerContext, weight: torch.Tensor) -> torch.dtype:
    """The precision the checkpoint stored this layer in. The engine hands methods float32
    weights and may record the original dtype as ctx.extra["source_dtype"]."""
    dtype = ctx.extra.get("source_dtype")
    return dtype if isinstance(dtype, torch.dtype) else weight.dtype


def quantize_each_linear(
    ctx: LayerContext, quantize: Callable[[torch.Tensor, torch.dtype, str], QuantizedWeight]
) -> dict[str, QuantizedWeight]:
    """The loop of every calibration-free method: each linear of the layer quantized on its own,
    with a cancel check between linears (one large linear can take seconds). `quantize` gets the
    detached weight as the engine handed it over (each method picks the precision it computes
    in), the dtype the checkpoint stored it in, and the qualified module name for messages."""
    out: dict[str, QuantizedWeight] = {}
    for name, linear in ctx.linears.items():
        check_cancel(ctx.cancel)
        w = linear.weight.detach()
        out[name] = quantize(w, source_dtype(ctx, w), f"{ctx.prefix}.{name}" if ctx.prefix else name)
    return out


@register(RTNConfig)
class RTNQuantizer:
    needs_calibration: ClassVar[bool] = False
    # The primitives read bf16/fp16 chunk by chunk with the same codes as a float32 copy, so the
    # engine hands the weights over as stored (no float32 copy of the layer).
    reads_source_dtype: ClassVar[bool] = True
    # quantize_to_intweight refuses NaN/Inf from each group's range (no separate pass needed).
    checks_finite: ClassVar[bool] = True

    def __init__(self, config: RTNConfig) -> None:
        self.config = config

    def quantize_layer(self, ctx: LayerContext) -> dict[str, QuantizedWeight]:
        cfg = self.config

        def quantize(w: torch.Tensor, dtype: torch.dtype, name: str) -> QuantizedWeight:
            # Handed over in its own dtype: the primitives read bf16/fp16 directly, converting
            # chunk by chunk, with the same codes as a float32 copy (no full-size copy here).
            return quantize_to_intweight(
                w,
                cfg.bits,
                cfg.sym,
                cfg.granularity,
                cfg.group_size,
                clip_search=cfg.clip_search,
                dtype=dtype,
                name=name,
                measure=True,  # the engine's weight error comes from the same pass
            )

        return quantize_each_linear(ctx, quantize)
