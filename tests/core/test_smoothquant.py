from __future__ import annotations

import copy

import pytest
import torch

from core.config import Granularity, SmoothQuantConfig
from core.methods import get_quantizer
from core.methods.smoothquant import smooth_layer, smoothing_scales
from core.primitives import quantize_to_intweight
from core.qtensors import ActQuant
from layer_ctx import make_ctx, make_inputs, make_layer, quantized_forward


def _error(ctx, weights, ref) -> float:
    return sum(float((o - r).square().sum()) for o, r in zip(quantized_forward(ctx, weights), ref))


def test_smoothing_scales_follow_the_formula():
    a = torch.tensor([16.0, 1.0, 0.25])
    w = torch.tensor([0.5, 2.0, 1.0])
    s = smoothing_scales(a, w, 0.5)
    torch.testing.assert_close(s, torch.sqrt(a) / torch.sqrt(w))
    torch.testing.assert_close(smoothing_scales(a, w, 1.0), a)


def test_smoothing_preserves_the_float_function_and_flattens_outliers():
    ctx = make_ctx(inputs=make_inputs(outliers=(5, 9), scale=40.0))
    ref = [ctx.forward(x) for x in ctx.inputs]
    _, absmax = smooth_layer(ctx, 0.5)
    for a, r in zip((ctx.forward(x) for x in ctx.inputs), ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
    m = ctx.extra["metrics"]["self_attn.q_proj"]
    assert m["act_absmax_after"] < 0.5 * m["act_absmax_before"]
    # Every linear was smoothed, o_proj through v_proj despite GQA (4 heads, 2 kv heads).
    assert set(ctx.extra["metrics"]) == set(ctx.linears)


def test_w8a8_with_smoothing_beats_plain_w8a8_on_channel_outliers():
    layer = make_layer(seed=1)
    inputs = make_inputs(outliers=(2, 30, 50), scale=60.0, seed=1)
    plain_ctx = make_ctx(copy.deepcopy(layer), inputs)
    ref = [plain_ctx.forward(x) for x in inputs]
    plain = {}
    for n, lin in plain_ctx.linears.items():
        q = quantize_to_intweight(lin.weight.detach(), 8, True, Granularity.CHANNEL, -1)
        q.act = ActQuant(bits=8, scheme="dynamic")
        plain[n] = q
    sq_ctx = make_ctx(copy.deepcopy(layer), inputs)
    sq = get_quantizer(SmoothQuantConfig(alpha=0.5)).quantize_layer(sq_ctx)
    e_plain, e_sq = _error(plain_ctx, plain, ref), _error(sq_ctx, sq, ref)
    assert e_sq < 0.7 * e_plain, (e_sq, e_plain)


@pytest.mark.parametrize("scheme", ["dynamic", "static"])
def test_static_and_dynamic_activation_schemes(scheme: str):
    ctx = make_ctx(seed=2)
    ref = [ctx.forward(x) for x in ctx.inputs]
    q = get_quantizer(SmoothQuantConfig(act_scheme=scheme)).quantize_layer(ctx)
    for name, w in q.items():
        assert w.bits == 8 and w.sym and w.scale.shape == (w.shape[0], 1)
        assert w.act is not None and w.act.scheme == scheme
        if scheme == "static":
            # The calibrated scale covers the largest smoothed input exactly: no clipping there.
            x = []
            lin = ctx.linears[name]
            h = lin.register_forward_pre_hook(lambda _m, a: x.append(a[0].abs().max()))
            for b in ctx.inputs:
                ctx.forward(b)
            h.remove()
            assert float(w.act.scale) == pytest.approx(float(max(x)) / 127.0, rel=1e-5)
    rel = _error(ctx, q, ref) / sum(float(r.square().sum()) for r in ref)
    assert rel < 1e-3


@pytest.mark.parametrize("scheme", ["dynamic", "static"])
def test_smoothquant_end_to_end_runs_activation_quantization_when_evaluated(tiny_llama_dir, tmp_path, scheme):
    from core.config import CalibConfig, QuantJob
    from core.engine import run_quantization
    from core.evaluate import evaluate_model
    from core.loader import load_model
    from core.qlinear import QuantLinear

    out = tmp_path / scheme
    job = QuantJob(model=tiny_llama_dir, out=out, method=SmoothQuantConfig(act_scheme=scheme),
                   calib=CalibConfig(samples=4, seq_len=32))
    result = run_quantization(job)
    assert all(r["output_rel_error"] < 0.05 for r in result.layers)
    model, tok = load_model(out)
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 14
    assert all(m.qweight.act is not None and m.qweight.act.scheme == scheme for m in qls)
    # The evaluation really quantizes activations: switching it off changes the logits.
    ids = tok("def quantize(x): return round(x)", return_tensors="pt").input_ids
    with torch.no_grad():
        with_act = model(input_ids=ids).logits
        saved = [m.qweight.act for m in qls]
        for m in qls:
            m.qweight.act = None
        without_act = model(input_ids=ids).logits
        for m, a in zip(qls, saved):
            m.qweight.act = a
    assert not torch.equal(with_act, without_act)
    ref, _ = load_model(tiny_llama_dir)
    res = evaluate_model(model, tok, seq_len=32, windows=2, reference=ref)
    assert 0 <= res["kl_divergence"] < 0.05


def test_smoothquant_on_qwen3_with_qk_norms(tiny_model_factory, tmp_path):
    from core.config import CalibConfig, QuantJob
    from core.engine import run_quantization
    from core.evaluate import evaluate_model
    from core.loader import load_model

    src = tiny_model_factory("qwen3")
    out = tmp_path / "sq"
    events = []
    run_quantization(QuantJob(model=src, out=out, method=SmoothQuantConfig(),
                              calib=CalibConfig(samples=2, seq_len=32)), sink=events.append)
    # Every input found a producer to fold into (no "left unsmoothed" message).
    assert not [e for e in events if "unsmoothed" in str(getattr(e, "message", ""))]
    model, tok = load_model(out)
    ref, _ = load_model(src)
    assert 0 <= evaluate_model(model, tok, seq_len=32, windows=2, reference=ref)["kl_divergence"] < 0.05
