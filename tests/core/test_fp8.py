from __future__ import annotations

import pytest
import torch
from torch import nn

from core.config import FP8Config
from core.events import CancelToken, Cancelled
from core.fp8 import FP8_MAX, cast_saturating, quantize_fp8
from core.methods.base import LayerContext, get_quantizer


def _w(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 256, generator=g) * 0.02


def test_format_maxima() -> None:
    assert FP8_MAX == {"e4m3": 448.0, "e5m2": 57344.0}


# relative rounding error of a normal fp8 value is at most 2^-(mantissa bits + 1)
@pytest.mark.parametrize("fmt,mantissa", [("e4m3", 3), ("e5m2", 2)])
@pytest.mark.parametrize("gran", ["tensor", "channel"])
def test_round_trip_relative_error_bound(fmt: str, mantissa: int, gran: str) -> None:
    w = _w()
    q = quantize_fp8(w, fmt, gran)
    assert q.weight.dtype == {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]
    assert q.scale.dtype == torch.float32
    assert tuple(q.scale.shape) == ((1,) if gran == "tensor" else (64, 1))
    w_hat = q.dequantize()
    # normal range: elementwise bound; overall relative Frobenius error well below it
    big = w.abs() > w.abs().amax() / 16
    rel = ((w_hat - w).abs() / w.abs())[big]
    assert float(rel.max()) <= 2.0 ** -(mantissa + 1) + 1e-6
    assert float((w_hat - w).norm() / w.norm()) < 2.0 ** -(mantissa + 1)
    # the largest magnitude maps exactly onto the format maximum
    assert float(q.weight.float().abs().max()) == FP8_MAX[fmt]


def test_cast_saturates_instead_of_overflowing() -> None:
    x = torch.tensor([1e6, -1e6, 500.0, 448.0, 1.0])
    assert cast_saturating(x, "e4m3").float().tolist() == [448.0, -448.0, 448.0, 448.0, 1.0]
    assert cast_saturating(torch.tensor([1e9, -7e4]), "e5m2").float().tolist() == [57344.0, -57344.0]


def test_per_channel_beats_per_tensor_on_rows_with_different_ranges() -> None:
    # a few rows with a much larger range push the other rows into the subnormals of a shared scale
    for fmt, factor in (("e4m3", 1e5), ("e5m2", 1e10)):
        w = _w()
        w[:8] *= factor
        err_t = (quantize_fp8(w, fmt, "tensor").dequantize() - w)[8:].norm() / w[8:].norm()
        err_c = (quantize_fp8(w, fmt, "channel").dequantize() - w)[8:].norm() / w[8:].norm()
        assert err_c < 0.5 * err_t


def test_zero_rows_and_bad_input() -> None:
    w = torch.zeros(4, 16)
    w[0] = 1.0
    q = quantize_fp8(w, "e4m3", "channel")
    assert torch.isfinite(q.scale).all() and torch.equal(q.dequantize(), w)
    with pytest.raises(ValueError, match="e4m3"):
        quantize_fp8(w, "e3m4")
    with pytest.raises(ValueError, match="group"):
        quantize_fp8(w, "e4m3", "group")


def test_fp8_quantizer_quantizes_all_linears_and_honours_cancel() -> None:
    torch.manual_seed(0)
    m = nn.Module()
    m.q_proj = nn.Linear(32, 32, bias=False)
    m.o_proj = nn.Linear(32, 32, bias=False)
    lin = {"self_attn.q_proj": m.q_proj, "self_attn.o_proj": m.o_proj}
    ctx = LayerContext(index=0, num_layers=1, prefix="model.layers.0", module=m, linears=lin,
                       extra={"source_dtype": torch.bfloat16})
    quantizer = get_quantizer(FP8Config(fmt="e4m3"))
    assert quantizer.needs_calibration is False
    out = quantizer.quantize_layer(ctx)
    assert set(out) == set(lin)
    for name, q in out.items():
        w = lin[name].weight.detach()
        assert q.dtype == torch.bfloat16 and q.fmt == "e4m3"
        assert float((q.dequantize() - w).norm() / w.norm()) < 0.04
    token = CancelToken()
    token.cancel()
    ctx.cancel = token
    with pytest.raises(Cancelled):
        quantizer.quantize_layer(ctx)
