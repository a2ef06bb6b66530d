"""LLM.int8() (Dettmers et al., 2022): int8 weights with one absmax scale per output row. At
inference (`core.qlinear.llm_int8_matmul`) input columns holding any |x| ≥ threshold are multiplied
in 16-bit against the dequantized weight columns and the rest in int8 with row-wise absmax
activations, so quantization needs no calibration for the weights themselves; the calibration
pass only counts how many input columns are outliers, for the report."""
from __future__ import annotations

import torch

from core.config import LLMInt8Config
from core.events import check_cancel
from core.methods.base import LayerContext, register
from core.methods.capture import forward_with_hooks
from core.methods.rtn import source_dtype
from core.qtensors import Int8RowWeight


def quantize_rowwise_int8(w: torch.Tensor, threshold: float = 6.0, dtype: torch.dtype = torch.float16) -> Int8RowWeight:
    """w [out, in] float → int8 codes with codes · scb / 127 ≈ w, scb = max|w| per row (float32).
    An all-zero row keeps scb 0 and codes 0 (decodes exactly)."""
    w = w.detach().float()
    scb = w.abs().amax(dim=1)
    safe = torch.where(scb > 0, scb, torch.ones_like(scb))
    codes = torch.clamp(torch.round(w * (127.0 / safe[:, None])), -127, 127).to(torch.int8)
    return Int8RowWeight(codes=codes, scb=scb, threshold=threshold, dtype=dtype)


def outlier_columns(ctx: LayerContext, threshold: float) -> dict[str, dict[str, int]]:
    """For every linear: input columns with any |x| ≥ threshold over the calibration set, and the
    tokens that had at least one such value. One forward pass per batch."""
    counts: dict[str, dict[str, int]] = {}
    seen: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_m: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach()
            big = x.reshape(-1, x.shape[-1]).abs() >= threshold
            cols = big.any(dim=0)
            seen[name] = cols if name not in seen else seen[name] | cols
            c = counts.setdefault(name, {"tokens": 0, "outlier_tokens": 0})
            c["tokens"] += big.shape[0]
            c["outlier_tokens"] += int(big.any(dim=1).sum())

        return hook

    forward_with_hooks(ctx, [(lin, hook_for(n)) for n, lin in ctx.linears.items()])
    for n, cols in seen.items():
        counts[n]["columns"] = int(cols.sum())
        counts[n]["in_features"] = int(cols.numel())
    return counts


@register(LLMInt8Config)
class LLMInt8Quantizer:
    needs_calibration = True

    def __init__(self, config: LLMInt8Config) -> None:
        self.config = config

    def quantize_layer(self, ctx: LayerContext) -> dict[str, Int8RowWeight]:
        threshold = self.config.threshold
        counts = outlier_columns(ctx, threshold) if ctx.inputs and ctx.forward is not None else {}
        metrics = ctx.extra.setdefault("metrics", {})
        out: dict[str, Int8RowWeight] = {}
        for n, lin in ctx.linears.items():
            check_cancel(ctx.cancel)
            q = quantize_rowwise_int8(lin.weight, threshold, source_dtype(ctx, lin.weight))
            if n in counts:
                q.outlier_counts = dict(counts[n])
                metrics.setdefault(n, {})["outlier_columns"] = float(counts[n]["columns"])
            out[n] = q
        return out
