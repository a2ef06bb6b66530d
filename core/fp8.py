"""FP8 weight quantization with torch's float8 dtypes: E4M3 (float8_e4m3fn, max 448) and E5M2
(float8_e5m2, max 57344), with one float32 scale per tensor or per output channel.

x̂ = fp8(x / s) · s with s = absmax / fmt_max, so the largest magnitude lands on the format's
maximum. Values are clamped to ±fmt_max before the cast, so the result saturates whatever the
cast itself does with overflow on a given torch version and device.
"""
from __future__ import annotations

import torch

from core.config import Granularity
from core.primitives import exact_divisor
from core.qtensors import Fp8Weight

FP8_DTYPES: dict[str, torch.dtype] = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX: dict[str, float] = {fmt: float(torch.finfo(dt).max) for fmt, dt in FP8_DTYPES.items()}


def _dtype(fmt: str) -> torch.dtype:
    if fmt not in FP8_DTYPES:
        raise ValueError(f"fp8 format must be 'e4m3' or 'e5m2', got {fmt!r}")
    return FP8_DTYPES[fmt]


def cast_saturating(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """x float (any shape) → float8 of `fmt`, clamping to ±max instead of overflowing."""
    dtype = _dtype(fmt)
    limit = FP8_MAX[fmt]
    return x.float().clamp(-limit, limit).to(dtype)


def fp8_scale(w: torch.Tensor, fmt: str, granularity: Granularity | str) -> torch.Tensor:
    """float32 scale for w [out, in]: [1] per-tensor, [out, 1] per-channel. An all-zero tensor or
    row gets scale 1 (it decodes to 0 whatever the scale)."""
    _dtype(fmt)
    granularity = Granularity(granularity)
    wf = w.float().abs()
    if granularity is Granularity.TENSOR:
        amax = wf.amax().reshape(1)
    elif granularity is Granularity.CHANNEL:
        amax = wf.amax(dim=1, keepdim=True)
    else:
        raise ValueError("FP8 supports granularity 'tensor' or 'channel', not 'group'")
    return torch.where(amax > 0, amax / exact_divisor(amax, FP8_MAX[fmt]), torch.ones_like(amax))


def quantize_fp8(
    w: torch.Tensor,
    fmt: str = "e4m3",
    granularity: Granularity | str = Granularity.CHANNEL,
    dtype: torch.dtype | None = None,
) -> Fp8Weight:
    """w float [out, in] → Fp8Weight (weight float8 [out, in], scale float32 [1] or [out, 1]).
    `dtype` records the source precision (default: w.dtype)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    scale = fp8_scale(w, fmt, granularity)
    q = cast_saturating(w.float() / scale, fmt)
    return Fp8Weight(weight=q, scale=scale, fmt=fmt, dtype=dtype or w.dtype)
