"""A LayerContext around one random Llama decoder layer, as the engine builds it, for testing the
calibrated methods without a model folder."""
from __future__ import annotations

import copy

import torch
from torch import nn

from core.methods.base import LayerContext

ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_layer(hidden: int = 64, inter: int = 128, heads: int = 4, kv_heads: int = 2, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, num_hidden_layers=1, attn_implementation="sdpa")
    torch.manual_seed(seed)
    layer = LlamaDecoderLayer(cfg, 0).eval()
    with torch.no_grad():
        for m in layer.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 0.05)
        layer.input_layernorm.weight.uniform_(0.5, 1.5)
        layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    layer.rotary_config = cfg
    return layer


def make_inputs(hidden: int = 64, batches: int = 2, batch: int = 4, seq: int = 32, outliers: tuple[int, ...] = (3, 17),
                scale: float = 20.0, seed: int = 0) -> list[torch.Tensor]:
    """Hidden states [batch, seq, hidden] with a few channels much louder than the rest (LLM-like)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        x = torch.randn(batch, seq, hidden, generator=g)
        for c in outliers:
            x[..., c] *= scale
        out.append(x)
    return out


def forward_fn(layer: nn.Module, seq: int):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rot = LlamaRotaryEmbedding(layer.rotary_config)
    positions = torch.arange(seq)[None]
    with torch.no_grad():
        cos, sin = rot(torch.zeros(1, seq, 1), positions)
    mask = torch.full((seq, seq), torch.finfo(torch.float32).min).triu(1)[None, None]

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        s = hidden.shape[1]
        with torch.no_grad():
            out = layer(hidden, attention_mask=mask[:, :, :s, :s], position_ids=positions[:, :s],
                        position_embeddings=(cos[:, :s], sin[:, :s]))
        return out[0] if isinstance(out, tuple) else out

    return forward


def linears_of(layer: nn.Module) -> dict[str, nn.Linear]:
    found = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    return {n: found[n] for leaf in ORDER for n in found if n.endswith(leaf)}


def make_ctx(layer: nn.Module | None = None, inputs: list[torch.Tensor] | None = None, **kw) -> LayerContext:
    layer = layer if layer is not None else make_layer(**kw)
    inputs = inputs if inputs is not None else make_inputs(hidden=layer.input_layernorm.weight.numel())
    return LayerContext(index=0, num_layers=1, prefix="model.layers.0", module=layer, linears=linears_of(layer),
                        inputs=inputs, forward=forward_fn(layer, inputs[0].shape[1]))


def clone_ctx(ctx: LayerContext) -> LayerContext:
    layer = copy.deepcopy(ctx.module)
    return make_ctx(layer, ctx.inputs)


def quantized_forward(ctx: LayerContext, weights: dict) -> list[torch.Tensor]:
    """Outputs of the layer on its inputs with the linears replaced by the dequantized weights
    (and activation fake-quant when a weight carries `act`)."""
    layer = copy.deepcopy(ctx.module)
    lins = linears_of(layer)
    for name, q in weights.items():
        lin = lins[name]
        lin.weight.data = q.dequantize().float()
        act = getattr(q, "act", None)
        if act is not None:
            def fwd(x: torch.Tensor, lin: nn.Linear = lin, act=act) -> torch.Tensor:
                return nn.functional.linear(act.fake_quant(x), lin.weight, lin.bias)
            lin.forward = fwd
    f = forward_fn(layer, ctx.inputs[0].shape[1])
    return [f(x) for x in ctx.inputs]
