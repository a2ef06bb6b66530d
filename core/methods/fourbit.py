"""NF4 / FP4 blockwise quantization (bitsandbytes layout), no calibration."""
from __future__ import annotations

from typing import ClassVar

from core.config import FourBitConfig
from core.events import check_cancel
from core.fourbit import quantize_4bit
from core.methods.base import LayerContext, register
from core.methods.rtn import source_dtype
from core.qtensors import QuantizedWeight


@register(FourBitConfig)
class FourBitQuantizer:
    needs_calibration: ClassVar[bool] = False

    def __init__(self, config: FourBitConfig) -> None:
        self.config = config

    def quantize_layer(self, ctx: LayerContext) -> dict[str, QuantizedWeight]:
        cfg = self.config
        out: dict[str, QuantizedWeight] = {}
        for name, linear in ctx.linears.items():
            check_cancel(ctx.cancel)
            w = linear.weight.detach()
            q = quantize_4bit(w.float(), cfg.quant_type, cfg.blocksize, cfg.double_quant)
            q.dtype = source_dtype(ctx, w)
            out[name] = q
        return out
