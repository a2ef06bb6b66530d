"""FP8 (E4M3 / E5M2) weight quantization with per-tensor or per-channel scales, no calibration."""
from __future__ import annotations

from typing import ClassVar

from core.config import FP8Config
from core.fp8 import quantize_fp8
from core.methods.base import LayerContext, register
from core.methods.rtn import quantize_each_linear
from core.qtensors import QuantizedWeight


@register(FP8Config)
class FP8Quantizer:
    needs_calibration: ClassVar[bool] = False

    def __init__(self, config: FP8Config) -> None:
        self.config = config

    def quantize_layer(self, ctx: LayerContext) -> dict[str, QuantizedWeight]:
        cfg = self.config
        return quantize_each_linear(
            ctx, lambda w, dtype, _name: quantize_fp8(w.float(), cfg.fmt, cfg.granularity, dtype=dtype))
