"""Phi-3 and Phi-4 (`Phi3ForCausalLM`): Llama-like, but q/k/v are one fused `qkv_proj` and gate/up
one fused `gate_up_proj` (stored fused on disk too, as loaders expect). The fused linears are
quantized as they are stored; scales cannot be folded into the v or up *halves* of a fused
linear, so AWQ and SmoothQuant leave o_proj and down_proj unscaled (they say so in the log)."""
from __future__ import annotations

from core.arch.base import ArchAdapter

ADAPTER = ArchAdapter(
    family="Phi-3/Phi-4",
    architectures=("Phi3ForCausalLM",),
    sequential=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    fused_qkv=True,
    fused_gate_up=True,
)
