from __future__ import annotations

import math

import torch

from core.config import Granularity, LLMInt8Config
from core.methods import get_quantizer
from core.methods.llm_int8 import quantize_rowwise_int8
from core.primitives import quantize_to_intweight
from core.qlinear import int8_rowwise, llm_int8_matmul
from core.qtensors import ActQuant
from layer_ctx import make_ctx, make_inputs


def _mixed(x: torch.Tensor, q, threshold: float) -> tuple[torch.Tensor, int]:
    return llm_int8_matmul(x, q.codes, q.scb, q.dequantize(), threshold)


def _outlier_input(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 128, generator=g)
    x[:, [7, 70]] *= 40.0
    return x


def test_rowwise_codes_round_trip_within_half_a_step():
    w = torch.randn(32, 64)
    w[3] = 0.0
    q = quantize_rowwise_int8(w)
    assert q.codes.dtype == torch.int8 and int(q.codes.abs().max()) == 127
    step = (q.scb / 127.0)[:, None]
    assert torch.all((q.dequantize() - w).abs() <= step / 2 + 1e-7)
    assert torch.all(q.dequantize()[3] == 0)


def test_decomposition_is_exact_for_outlier_columns():
    x = _outlier_input()
    q = quantize_rowwise_int8(torch.randn(48, 128))
    y, n = _mixed(x, q, threshold=0.0)  # every column is an outlier: pure float path
    assert n == 128
    torch.testing.assert_close(y, x @ q.dequantize().t(), rtol=1e-6, atol=1e-5)
    # Only the two loud columns are outliers at the usual threshold.
    _, n = _mixed(x, q, threshold=6.0)
    assert n == 2


def test_infinite_threshold_equals_plain_int8():
    x = _outlier_input(1)
    q = quantize_rowwise_int8(torch.randn(48, 128))
    y, n = _mixed(x, q, threshold=math.inf)
    assert n == 0
    xq, sx = int8_rowwise(x)
    plain = (xq @ q.codes.float().t()) * sx * (q.scb / 127.0)[None, :]
    torch.testing.assert_close(y, plain, rtol=1e-5, atol=1e-4)


def test_mixed_precision_error_below_plain_w8a8_with_outliers():
    x = _outlier_input(2)
    w = torch.randn(48, 128)
    ref = x @ w.t()
    q = quantize_rowwise_int8(w)
    y, _ = _mixed(x, q, threshold=6.0)
    w8 = quantize_to_intweight(w, 8, True, Granularity.CHANNEL, -1)
    y_w8a8 = ActQuant(bits=8, scheme="dynamic").fake_quant(x) @ w8.dequantize().t()
    e_mixed = float((y - ref).square().sum())
    e_w8a8 = float((y_w8a8 - ref).square().sum())
    assert e_mixed < 0.25 * e_w8a8, (e_mixed, e_w8a8)


def test_layer_reports_outlier_columns_from_calibration():
    # One loud channel: after RMSNorm it reaches about sqrt(hidden) = 8 × the norm weight.
    ctx = make_ctx(inputs=make_inputs(outliers=(3,), scale=50.0))
    q = get_quantizer(LLMInt8Config(threshold=6.0)).quantize_layer(ctx)
    assert set(q) == set(ctx.linears)
    metrics = ctx.extra["metrics"]
    counts = q["self_attn.q_proj"].outlier_counts
    assert counts["in_features"] == 64 and counts["tokens"] == sum(b.shape[0] * b.shape[1] for b in ctx.inputs)
    assert metrics["self_attn.q_proj"]["outlier_columns"] == counts["columns"] >= 1
    # A threshold nothing reaches finds no outliers anywhere.
    q_inf = get_quantizer(LLMInt8Config(threshold=1e9)).quantize_layer(make_ctx(inputs=ctx.inputs))
    assert all(w.outlier_counts["columns"] == 0 for w in q_inf.values())
    assert all(torch.equal(q_inf[n].codes, q[n].codes) for n in q)


def test_llm_int8_end_to_end_loads_and_decomposes(tiny_llama_dir, tmp_path):
    from core.config import CalibConfig, QuantJob
    from core.engine import run_quantization
    from core.evaluate import evaluate_model
    from core.loader import load_model
    from core.qlinear import QuantLinear

    out = tmp_path / "int8"
    run_quantization(QuantJob(model=tiny_llama_dir, out=out, method=LLMInt8Config(threshold=0.5),
                              calib=CalibConfig(samples=4, seq_len=32)))
    model, tok = load_model(out)
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 14 and all(m.format == "int8_row" for m in qls)
    ref, _ = load_model(tiny_llama_dir)
    res = evaluate_model(model, tok, seq_len=32, windows=2, reference=ref)
    assert 0 <= res["kl_divergence"] < 0.05
    assert max(m.outlier_columns for m in qls) > 0  # threshold 0.5 sees outliers in this model
