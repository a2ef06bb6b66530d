"""NF4 / FP4 blockwise quantization (bitsandbytes layout), no calibration."""
from __future__ import annotations

from typing import ClassVar

import torch

from core.config import FourBitConfig
from core.fourbit import quantize_4bit
from core.methods.base import LayerContext, register
from core.methods.rtn import quantize_each_linear
from core.qtensors import QuantizedWeight


@register(FourBitConfig)
class FourBitQuantizer:
    needs_calibration: ClassVar[bool] = False

    def __init__(self, config: FourBitConfig) -> None:
        self.config = config

    def quantize_layer(self, ctx: LayerContext) -> dict[str, QuantizedWeight]:
        cfg = self.config

        def quantize(w: torch.Tensor, dtype: torch.dtype, _name: str) -> QuantizedWeight:
            q = quantize_4bit(w.float(), cfg.quant_type, cfg.blocksize, cfg.double_quant)
            q.dtype = dtype  # quantize_4bit takes no dtype; the checkpoint's is recorded for export
            return q

        return quantize_each_linear(ctx, quantize)
