"""What the engine needs to know about a decoder family that the config alone does not say.

An `ArchAdapter` describes one family of dense decoder-only checkpoints: the linears of a
decoder layer in execution order, how its RMSNorm scales (Gemma's `x·(1 + w)` matters when a
method folds scales into a norm), the embedding multiplier, which layers attend through a
sliding window and with which rotary table, and the attention kernel transformers runs it with.
The forward itself is always transformers' own decoder layer; the adapter only tells the engine
how to call it layer by layer exactly as the full model would.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@dataclass(frozen=True)
class ArchAdapter:
    """One family. `sequential` names the linears' leaf names in the order a decoder layer runs
    them (true-sequential GPTQ quantizes in this order); linears reading one tensor (q/k/v,
    gate/up, or a fused qkv_proj) are found by the methods from a hooked forward, so fused
    layouts need no list of their own."""

    family: str
    architectures: tuple[str, ...]
    sequential: tuple[str, ...]
    # RMSNorm output = normalised x · (norm_offset + weight): 0 for Llama, 1 for Gemma.
    norm_offset: float = 0.0
    # Attention kernel the meta model is built with; Gemma 2's softcapped attention is eager-only.
    attn_implementation: str = "sdpa"
    # Embeddings are multiplied by sqrt(hidden_size) before layer 0 (Gemma).
    scales_embeddings: bool = False
    # The rotary module takes the layer type (Gemma 3: a local base frequency for sliding layers).
    rotary_per_layer_type: bool = False
    # Norms of a decoder layer (relative names); Gemma adds pre/post-feedforward norms.
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    # Fused linears as stored (Phi-3): one qkv_proj for q/k/v, one gate_up_proj for gate/up.
    fused_qkv: bool = False
    fused_gate_up: bool = False
    # On-disk names (the Hugging Face layout, which is also what loaders of the outputs expect).
    embed_name: str = "model.embed_tokens.weight"
    layers_prefix: str = "model.layers."
    head_prefixes: tuple[str, ...] = ("lm_head.", "model.norm.")

    def layer_shapes(self, hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int
                     ) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
        """(required, optional) tensor shapes of one decoder layer, by name relative to the
        layer; optional ones (biases, q/k norms) are checked when stored."""
        H, q, kv = hidden, heads * head_dim, kv_heads * head_dim
        required: dict[str, tuple[int, ...]] = {f"{n}.weight": (H,) for n in self.norms}
        optional: dict[str, tuple[int, ...]] = {"self_attn.q_norm.weight": (head_dim,),
                                                "self_attn.k_norm.weight": (head_dim,),
                                                "self_attn.o_proj.bias": (H,), "mlp.down_proj.bias": (H,)}
        if self.fused_qkv:
            required["self_attn.qkv_proj.weight"] = (q + 2 * kv, H)
            optional["self_attn.qkv_proj.bias"] = (q + 2 * kv,)
        else:
            for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                required[f"self_attn.{name}.weight"] = (rows, H)
                optional[f"self_attn.{name}.bias"] = (rows,)
        required["self_attn.o_proj.weight"] = (H, q)
        if self.fused_gate_up:
            required["mlp.gate_up_proj.weight"] = (2 * inter, H)
            optional["mlp.gate_up_proj.bias"] = (2 * inter,)
        else:
            for name in ("gate_proj", "up_proj"):
                required[f"mlp.{name}.weight"] = (inter, H)
                optional[f"mlp.{name}.bias"] = (inter,)
        required["mlp.down_proj.weight"] = (H, inter)
        return required, optional

    def embed_scale(self, hf_config: Any) -> torch.Tensor | None:
        """The float32 factor the embeddings are multiplied by, as transformers computes it
        (a float32 tensor of sqrt(hidden_size)), or None."""
        if not self.scales_embeddings:
            return None
        return torch.tensor(math.sqrt(hf_config.hidden_size), dtype=torch.float32)

    def layer_types(self, hf_config: Any) -> list[str]:
        """Attention type of every decoder layer ("full_attention" / "sliding_attention")."""
        n = int(hf_config.num_hidden_layers)
        types = getattr(hf_config, "layer_types", None)
        if types:
            return [str(t) for t in types[:n]]
        # Mistral and Phi-3 configs give one sliding window for every layer.
        window = getattr(hf_config, "sliding_window", None)
        return [SLIDING_ATTENTION if window else FULL_ATTENTION] * n

    def window(self, hf_config: Any, layer_type: str) -> int | None:
        """Tokens a query of this layer type sees (itself included), or None for all before it."""
        if layer_type != SLIDING_ATTENTION:
            return None
        window = getattr(hf_config, "sliding_window", None)
        return int(window) if window else None

    def position_embeddings(self, rotary: nn.Module, x: torch.Tensor, positions: torch.Tensor,
                            layer_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for layers of this type, from the model's own rotary module."""
        if self.rotary_per_layer_type:
            return rotary(x, positions, layer_type)
        return rotary(x, positions)
