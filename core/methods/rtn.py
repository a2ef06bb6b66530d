"""Round-to-nearest affine integer quantization (no calibration)."""
from __future__ import annotations

from typing import ClassVar

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


@register(RTNConfig)
class RTNQuantizer:
    needs_calibration: ClassVar[bool] = False

    def __init__(self, config: RTNConfig) -> None:
        self.config = config

    def quantize_layer(self, ctx: LayerContext) -> dict[str, QuantizedWeight]:
        cfg = self.config
        out: dict[str, QuantizedWeight] = {}
        for name, linear in ctx.linears.items():
            check_cancel(ctx.cancel)
            w = linear.weight.detach()
            out[name] = quantize_to_intweight(
                w.float(),
                cfg.bits,
                cfg.sym,
                cfg.granularity,
                cfg.group_size,
                clip_search=cfg.clip_search,
                dtype=source_dtype(ctx, w),
                name=f"{ctx.prefix}.{name}" if ctx.prefix else name,
            )
        return out
