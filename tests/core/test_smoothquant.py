from __future__ import annotations

import copy

import pytest
import torch

from core.config import Granularity, SmoothQuantConfig
from core.methods import get_quantizer
from core.events import Log
from core.methods import smoothquant as sq
from core.methods.smoothquant import ALPHA_GRID, smooth_layer, smoothing_scales
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


# ---------------------------------------------------------------- α searched per group ("auto")

GROUPS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
          "gate/up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


def _linear_inputs(ctx) -> dict[str, torch.Tensor]:
    """Every linear's input over all calibration batches [tokens, in], from the layer as it is now."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in ctx.linears}
    handles = [lin.register_forward_pre_hook(lambda _m, a, n=n: got[n].append(a[0].reshape(-1, a[0].shape[-1])))
               for n, lin in ctx.linears.items()]
    for x in ctx.inputs:
        ctx.forward(x)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def _group_objective(layer, inputs, cfg: SmoothQuantConfig) -> tuple[dict[str, float], dict]:
    """Σ_readers ‖X Wᵀ − Q_a(X/s) Q_w(W·s)ᵀ‖² of each group, from what the quantizer really produced
    (its int8 weights and activation quantizers, the folded layer's own inputs) on all tokens.
    v_proj and up_proj also produce the next group's input, so their rows were divided by that
    group's scales afterwards; each output channel is scaled back by the factor d that maps the
    folded float output onto the original one (1 elsewhere)."""
    float_ctx = make_ctx(copy.deepcopy(layer), inputs)
    x, w = _linear_inputs(float_ctx), {n: lin.weight.detach().clone() for n, lin in float_ctx.linears.items()}
    ctx = make_ctx(copy.deepcopy(layer), inputs)
    q = get_quantizer(cfg).quantize_layer(ctx)
    xs = _linear_inputs(ctx)
    err = dict.fromkeys(GROUPS, 0.0)
    for g, names in GROUPS.items():
        for n in names:
            ref = x[n] @ w[n].t()
            folded = xs[n] @ ctx.linears[n].weight.detach().t()
            d = (ref * folded).sum(dim=0) / folded.square().sum(dim=0)
            approx = q[n].act.fake_quant(xs[n]) @ q[n].dequantize().t()
            err[g] += float((ref - d * approx).square().sum())
    return err, ctx.extra["metrics"]


@pytest.mark.parametrize("scheme", ["dynamic", "static"])
@pytest.mark.parametrize("seed", [1, 2])
def test_auto_alpha_is_never_worse_than_half_on_the_objective_it_searches(scheme: str, seed: int):
    layer = make_layer(seed=seed)
    inputs = make_inputs(outliers=(2, 30, 50), scale=60.0, seed=seed)
    half, _ = _group_objective(layer, inputs, SmoothQuantConfig(alpha=0.5, act_scheme=scheme))
    auto, metrics = _group_objective(layer, inputs, SmoothQuantConfig(alpha="auto", act_scheme=scheme))
    for g in GROUPS:
        assert auto[g] <= half[g] * (1 + 1e-4), (g, auto[g], half[g])
    assert sum(auto.values()) < 0.9 * sum(half.values())
    assert all(m["sq_alpha"] in ALPHA_GRID for m in metrics.values())


@pytest.mark.parametrize("scheme", ["dynamic", "static"])
def test_the_search_scores_what_the_quantizer_then_produces(scheme: str, monkeypatch: pytest.MonkeyPatch):
    # Here the sample holds every calibration token, so the error the search saw for an α is the
    # error of the layer quantized with it.
    scored: list[list[float]] = []
    real = sq.alpha_errors

    def spy(*args, **kw):
        scored.append(real(*args, **kw))
        return scored[-1]

    layer, inputs = make_layer(seed=3), make_inputs(outliers=(4, 40), scale=50.0, seed=3)
    half, _ = _group_objective(layer, inputs, SmoothQuantConfig(alpha=0.5, act_scheme=scheme))
    monkeypatch.setattr(sq, "alpha_errors", spy)
    auto, metrics = _group_objective(layer, inputs, SmoothQuantConfig(alpha="auto", act_scheme=scheme))
    assert len(scored) == len(GROUPS)  # q/k/v, o, gate/up, down: one search each
    for errors, (g, names) in zip(scored, GROUPS.items()):
        assert errors[ALPHA_GRID.index(0.5)] == pytest.approx(half[g], rel=1e-3)
        assert errors[ALPHA_GRID.index(metrics[names[0]]["sq_alpha"])] == pytest.approx(auto[g], rel=1e-3)
        assert min(errors) == errors[ALPHA_GRID.index(metrics[names[0]]["sq_alpha"])]


def test_static_search_takes_the_activation_scale_from_the_whole_calibration_set(monkeypatch: pytest.MonkeyPatch):
    calls = []
    real = sq.alpha_errors
    monkeypatch.setattr(sq, "alpha_errors", lambda x, w, act_absmax, *a, **kw: calls.append((x, act_absmax))
                        or real(x, w, act_absmax, *a, **kw))
    monkeypatch.setattr(sq, "SEARCH_TOKENS", 16)
    ctx = make_ctx(inputs=make_inputs(outliers=(5, 9), scale=40.0))
    full = _linear_inputs(ctx)
    get_quantizer(SmoothQuantConfig(alpha="auto", act_scheme="static")).quantize_layer(ctx)
    x, act_absmax = calls[0]  # the q/k/v group
    assert x.shape[0] == 16 < full["self_attn.q_proj"].shape[0]
    torch.testing.assert_close(act_absmax, full["self_attn.q_proj"].abs().amax(dim=0))
    assert (x.abs().amax(dim=0) <= act_absmax).all() and not torch.equal(x.abs().amax(dim=0), act_absmax)


def test_auto_alpha_differs_between_groups_and_is_logged_per_layer():
    ctx = make_ctx(make_layer(seed=1), make_inputs(outliers=(2, 30, 50), scale=60.0, seed=1))
    events = []
    ctx.sink = events.append
    get_quantizer(SmoothQuantConfig(alpha="auto")).quantize_layer(ctx)
    alphas = {n: m["sq_alpha"] for n, m in ctx.extra["metrics"].items()}
    assert set(alphas) == set(ctx.linears)
    # One α per smoothing group (readers of one tensor share it), not one for the whole layer.
    for names in GROUPS.values():
        assert len({alphas[n] for n in names}) == 1
    assert len({alphas[names[0]] for names in GROUPS.values()}) > 1, alphas
    logs = [e.message for e in events if isinstance(e, Log) and "α" in e.message]
    assert len(logs) == 1 and "model.layers.0" in logs[0]
    assert f"q/k/v {alphas['self_attn.q_proj']:.2f}" in logs[0] and f"down {alphas['mlp.down_proj']:.2f}" in logs[0]


@pytest.mark.parametrize("scheme", ["dynamic", "static"])
def test_auto_smoothing_preserves_the_float_function(scheme: str):
    ctx = make_ctx(inputs=make_inputs(outliers=(5, 9), scale=40.0))
    ref = [ctx.forward(x) for x in ctx.inputs]
    norm_before = ctx.module.input_layernorm.weight.detach().clone()
    smooth_layer(ctx, "auto", scheme)
    for a, r in zip((ctx.forward(x) for x in ctx.inputs), ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ctx.module.input_layernorm.weight, norm_before)  # scales really were folded


@pytest.mark.parametrize("alpha", ["Auto", "best", "0.5", 1.5, -0.1, float("nan"), True, None])
def test_config_refuses_alpha_outside_0_1_or_auto(alpha):
    with pytest.raises(ValueError, match=r"alpha must be a number between 0 and 1.*'auto'"):
        SmoothQuantConfig(alpha=alpha)


def test_config_accepts_auto_and_numbers_in_range():
    assert SmoothQuantConfig(alpha="auto").alpha == "auto"
    assert SmoothQuantConfig(alpha=0).alpha == 0 and SmoothQuantConfig(alpha=1.0).alpha == 1.0


def test_auto_alpha_end_to_end_reports_the_chosen_alpha_per_linear(tiny_llama_dir, tmp_path):
    import json

    from core.config import CalibConfig, QuantJob
    from core.engine import run_quantization
    from core.events import LayerDone

    events = []
    job = QuantJob(model=tiny_llama_dir, out=tmp_path / "sq", method=SmoothQuantConfig(alpha="auto"),
                   calib=CalibConfig(samples=4, seq_len=32))
    result = run_quantization(job, sink=events.append)
    done = [e for e in events if isinstance(e, LayerDone)]
    assert len(done) == 14 and all(e.metrics["sq_alpha"] in ALPHA_GRID for e in done)
    report = json.loads((tmp_path / "sq" / "quantscope_report.json").read_text())
    assert report["settings"]["alpha"] == "auto"
    assert [r["sq_alpha"] for r in report["layers"]] == [e.metrics["sq_alpha"] for e in done]
    assert all(r["output_rel_error"] < 0.05 for r in result.layers)
