from __future__ import annotations

import copy

import pytest
import torch

from core.config import AWQConfig, Granularity
from core.methods import get_quantizer
from core.methods.awq import search_and_fold
from core.primitives import quantize_to_intweight
from layer_ctx import clone_ctx, make_ctx, make_inputs, make_layer, quantized_forward


def _rtn(ctx, cfg: AWQConfig) -> dict:
    return {n: quantize_to_intweight(lin.weight.detach(), cfg.bits, cfg.sym, Granularity.GROUP, cfg.group_size)
            for n, lin in ctx.linears.items()}


def _layer_error(ctx, weights: dict, ref: list[torch.Tensor]) -> float:
    out = quantized_forward(ctx, weights)
    return sum(float((o - r).square().sum()) for o, r in zip(out, ref))


def test_folding_preserves_float_function_with_gqa():
    ctx = make_ctx()
    ref = [ctx.forward(x) for x in ctx.inputs]
    before = {n: lin.weight.clone() for n, lin in ctx.linears.items()}
    norm_before = ctx.module.input_layernorm.weight.clone()
    search_and_fold(ctx, AWQConfig(bits=3, group_size=32))
    after = [ctx.forward(x) for x in ctx.inputs]
    for a, r in zip(after, ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
    # Scales really were applied: norms, v (rows, for o) and up (rows, for down) changed.
    assert not torch.allclose(ctx.module.input_layernorm.weight, norm_before)
    ratios = ctx.extra["metrics"]
    assert set(ratios) == set(ctx.linears)
    changed = [n for n in before if not torch.allclose(before[n], ctx.linears[n].weight)]
    assert changed, "no weight was scaled"


def test_awq_layer_output_error_below_rtn_with_activation_outliers():
    layer = make_layer(seed=1)
    inputs = make_inputs(outliers=(3, 17, 40), scale=30.0, seed=1)
    awq_ctx = make_ctx(copy.deepcopy(layer), inputs)
    rtn_ctx = make_ctx(copy.deepcopy(layer), inputs)
    ref = [rtn_ctx.forward(x) for x in inputs]
    cfg = AWQConfig(bits=3, group_size=32)
    awq = get_quantizer(cfg).quantize_layer(awq_ctx)
    rtn = _rtn(rtn_ctx, cfg)
    e_awq, e_rtn = _layer_error(awq_ctx, awq, ref), _layer_error(rtn_ctx, rtn, ref)
    assert e_awq < 0.8 * e_rtn, (e_awq, e_rtn)
    for q in awq.values():
        assert q.bits == 3 and q.group_size == 32 and not q.sym and q.g_idx is None


def test_awq_never_worse_than_rtn_on_the_qkv_block_it_optimises():
    for seed in range(3):
        layer = make_layer(seed=seed)
        inputs = make_inputs(seed=seed, outliers=(seed + 1,), scale=5.0 + 10 * seed)
        ctx = make_ctx(copy.deepcopy(layer), inputs)
        # o_proj left unquantized so v_proj's rows are not rescaled for it afterwards.
        del ctx.linears["self_attn.o_proj"]
        orig = make_ctx(copy.deepcopy(layer), inputs)
        cfg = AWQConfig(bits=4, group_size=32, clip=False)
        awq = get_quantizer(cfg).quantize_layer(ctx)
        rtn = _rtn(orig, cfg)
        with torch.no_grad():
            x = torch.cat([orig.module.input_layernorm(i) for i in inputs]).reshape(-1, 64)
            x_scaled = torch.cat([ctx.module.input_layernorm(i) for i in inputs]).reshape(-1, 64)
        e_awq = e_rtn = 0.0
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            ref = x @ orig.linears[n].weight.detach().t()
            e_awq += float((x_scaled @ awq[n].dequantize().t() - ref).square().sum())
            e_rtn += float((x @ rtn[n].dequantize().t() - ref).square().sum())
        assert e_awq <= e_rtn * (1 + 1e-5), (seed, e_awq, e_rtn)
        assert ctx.extra["metrics"]["self_attn.q_proj"]["awq_ratio"] > 0  # scaling was chosen, not RTN


def test_clip_search_lowers_output_error():
    layer = make_layer(seed=2)
    inputs = make_inputs(seed=2)
    ref_ctx = make_ctx(copy.deepcopy(layer), inputs)
    ref = [ref_ctx.forward(x) for x in inputs]
    errors = {}
    for clip in (False, True):
        ctx = make_ctx(copy.deepcopy(layer), inputs)
        q = get_quantizer(AWQConfig(bits=3, group_size=32, clip=clip)).quantize_layer(ctx)
        errors[clip] = _layer_error(ctx, q, ref)
    assert errors[True] < errors[False]


def test_symmetric_and_per_channel_variants():
    ctx = make_ctx(seed=3)
    ref = [ctx.forward(x) for x in ctx.inputs]
    work = clone_ctx(ctx)
    q = get_quantizer(AWQConfig(bits=4, sym=True, granularity=Granularity.CHANNEL)).quantize_layer(work)
    assert all(w.sym and w.scale.shape[1] == 1 for w in q.values())
    rel = _layer_error(work, q, ref) / sum(float(r.square().sum()) for r in ref)
    assert rel < 0.05


def test_group_size_not_dividing_in_features_quantizes_with_a_ragged_last_group():
    ctx = make_ctx(seed=4)
    q = get_quantizer(AWQConfig(group_size=48)).quantize_layer(ctx)
    for name, w in q.items():
        n_in = w.shape[1]
        assert w.group_size == 48 and w.scale.shape[1] == -(-n_in // 48), name


def test_awq_end_to_end_on_tiny_llama_writes_folded_norms(tiny_llama_dir, tmp_path):
    from safetensors import safe_open

    from core.config import CalibConfig, QuantJob
    from core.engine import run_quantization
    from core.evaluate import evaluate_model
    from core.loader import load_model

    out = tmp_path / "awq"
    result = run_quantization(QuantJob(model=tiny_llama_dir, out=out, method=AWQConfig(bits=4, group_size=32),
                                       calib=CalibConfig(samples=4, seq_len=32)))
    assert len(result.layers) == 14 and all(r["output_rel_error"] < 0.5 for r in result.layers)
    norm = "model.layers.0.input_layernorm.weight"

    def read(folder):
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), "pt") as h:
                if norm in h.keys():
                    return h.get_tensor(norm)
        raise AssertionError(f"{norm} not in {folder}")

    assert not torch.allclose(read(out).float(), read(tiny_llama_dir).float())
    model, tok = load_model(out)
    ref, _ = load_model(tiny_llama_dir)
    res = evaluate_model(model, tok, seq_len=32, windows=2, reference=ref)
    assert 0 < res["kl_divergence"] < 0.2
