"""Llama-like decoders: Llama, Mistral, Qwen2, Qwen3 (pre-norm, separate q/k/v/o and
gate/up/down linears, one rotary table, plain RMSNorm)."""
from __future__ import annotations

from core.arch.base import ArchAdapter

ADAPTER = ArchAdapter(
    family="Llama/Mistral/Qwen2/Qwen3",
    architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"),
    sequential=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)
