"""Gemma 2: embeddings scaled by sqrt(hidden), RMSNorm computing x·(1 + w), pre- and
post-attention and pre- and post-feedforward norms, alternating sliding-window and global layers
(one rotary table), attention-logit softcapping inside the attention module (which only the eager
kernel implements) and final-logit softcapping in the LM head (applied by transformers' model
wherever logits are evaluated)."""
from __future__ import annotations

from core.arch.base import ArchAdapter

ADAPTER = ArchAdapter(
    family="Gemma 2",
    architectures=("Gemma2ForCausalLM",),
    sequential=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    norm_offset=1.0,
    attn_implementation="eager",
    scales_embeddings=True,
    norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
           "post_feedforward_layernorm"),
)
