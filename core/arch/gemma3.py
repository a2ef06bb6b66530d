"""Gemma 3 text model (`Gemma3ForCausalLM`): as Gemma 2 plus q/k norms, no softcapping, and a
rotary table per layer type (the sliding layers use the local base frequency)."""
from __future__ import annotations

from core.arch.base import ArchAdapter

ADAPTER = ArchAdapter(
    family="Gemma 3 (text)",
    architectures=("Gemma3ForCausalLM",),
    sequential=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    norm_offset=1.0,
    scales_embeddings=True,
    rotary_per_layer_type=True,
    norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
           "post_feedforward_layernorm"),
)
