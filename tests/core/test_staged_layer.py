"""The staged decoder layer behind fast true-sequential GPTQ: it must reproduce the layer exactly,
refuse layers it cannot reproduce, and give GPTQ the same result as the generic capture passes."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from core.config import GPTQConfig
from core.methods import gptq as gptq_module
from core.methods.capture import StagedLayer
from core.methods.gptq import GPTQQuantizer
from tests.core.layer_ctx import clone_ctx, make_ctx, quantized_forward


def _generic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gptq_module.StagedLayer, "build", classmethod(lambda cls, ctx: None))


def test_staged_stages_reproduce_the_layer_forward_exactly():
    ctx = make_ctx()
    staged = StagedLayer.build(ctx)
    assert staged is not None
    assert staged.groups() == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                               ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    h = ctx.inputs[1]
    with torch.no_grad():
        mid = h + staged.o_proj(staged.attn_input(staged.norm1(h)))
        out = mid + staged.down_proj(staged.mlp_input(staged.norm2(mid)))
    assert torch.equal(out, ctx.forward(h))


class _ExtraNorm(nn.Module):
    """A decoder layer with a norm after the MLP (Gemma-style): not the Llama residual pattern."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.inner = layer
        self.input_layernorm = layer.input_layernorm
        self.self_attn = layer.self_attn
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.mlp = layer.mlp
        self.post_mlp_scale = 0.5

    def forward(self, hidden: torch.Tensor, **kw) -> torch.Tensor:
        out = self.inner(hidden, **kw)
        return hidden + self.post_mlp_scale * (out - hidden)


def test_staged_refuses_a_layer_it_cannot_reproduce():
    ctx = make_ctx()
    wrapped = _ExtraNorm(ctx.module)
    ctx.module = wrapped
    inner_forward = ctx.forward

    def forward(h: torch.Tensor) -> torch.Tensor:
        return h + 0.5 * (inner_forward(h) - h)

    ctx.forward = forward
    assert StagedLayer.build(ctx) is None


@pytest.mark.parametrize("config", [
    GPTQConfig(bits=4, group_size=32, sym=False),
    GPTQConfig(bits=4, group_size=32, act_order=True),
    GPTQConfig(bits=3, granularity="tensor"),
])
def test_staged_gptq_equals_generic_passes_and_propagates_the_quantized_output(monkeypatch, config):
    ctx = make_ctx()
    generic_ctx = clone_ctx(ctx)
    staged = GPTQQuantizer(config).quantize_layer(ctx)
    propagated = ctx.extra["propagated"]
    errors = ctx.extra["output_rel_error"]
    with monkeypatch.context() as m:
        _generic(m)
        generic = GPTQQuantizer(config).quantize_layer(generic_ctx)
    assert "propagated" not in generic_ctx.extra
    for name, q in generic.items():
        assert torch.equal(staged[name].codes, q.codes), name
        assert torch.equal(staged[name].scale, q.scale), name
    expected = quantized_forward(generic_ctx, generic)
    for got, want in zip(propagated, expected):
        assert torch.equal(got, want)
    # the output error from the Hessian equals the one measured on the quantized layer's own inputs
    qctx = clone_ctx(generic_ctx)
    for name, q in generic.items():
        qctx.module.get_submodule(name).weight.data = q.dequantize().float()
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [qctx.module.get_submodule(n).register_forward_pre_hook(
        lambda _m, a, n=n: seen.setdefault(n, []).append(a[0].detach())) for n in generic]
    try:
        for h in ctx.inputs:
            qctx.forward(h)
    finally:
        for hd in hooks:
            hd.remove()
    for name, q in generic.items():
        w = generic_ctx.module.get_submodule(name).weight.detach()
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[name]])
        ref = x @ w.t()
        measured = float(torch.linalg.vector_norm(ref - x @ q.dequantize().float().t()) / torch.linalg.vector_norm(ref))
        assert math.isclose(errors[name], measured, rel_tol=1e-3), name


def test_staged_gptq_with_skipped_linears_still_propagates_exactly(monkeypatch):
    ctx = make_ctx()
    ctx.linears = {n: m for n, m in ctx.linears.items() if n not in ("mlp.down_proj", "self_attn.k_proj")}
    generic_ctx = clone_ctx(ctx)
    generic_ctx.linears = {n: m for n, m in generic_ctx.linears.items() if n in ctx.linears}
    config = GPTQConfig(bits=4, group_size=32)
    staged = GPTQQuantizer(config).quantize_layer(ctx)
    with monkeypatch.context() as m:
        _generic(m)
        generic = GPTQQuantizer(config).quantize_layer(generic_ctx)
    assert set(staged) == set(generic) == set(ctx.linears)
    for got, want in zip(ctx.extra["propagated"], quantized_forward(generic_ctx, generic)):
        assert torch.equal(got, want)
