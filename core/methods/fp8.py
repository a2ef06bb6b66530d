"""FP8 (E4M3 / E5M2) weight quantization with per-tensor or per-channel scales, no calibration."""
from __future__ import annotations

from typing import ClassVar

from core.config import FP8Config
from core.events import check_cancel
from core.fp8 import quantize_fp8
from core.methods.base import LayerContext, register
from core.methods.rtn import source_dtype
from core.qtensors import QuantizedWeight


@register(FP8Config)
class FP8Quantizer:
    needs_calibration: ClassVar[bool] = False

    def __init__(self, config: FP8Config) -> None:
        self.config = config

    def quantize_layer(self, ctx: LayerContext) -> dict[str, QuantizedWeight]:
        out: dict[str, QuantizedWeight] = {}
        for name, linear in ctx.linears.items():
            check_cancel(ctx.cancel)
            w = linear.weight.detach()
            out[name] = quantize_fp8(w.float(), self.config.fmt, self.config.granularity, dtype=source_dtype(ctx, w))
        return out
