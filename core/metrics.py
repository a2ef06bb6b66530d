"""Quality metrics: per-layer weight error, perplexity, KL divergence."""
from __future__ import annotations

import math

import torch


def weight_error(w: torch.Tensor, w_hat: torch.Tensor) -> dict[str, float]:
    """Reconstruction error of a quantized weight.

    mse = mean((w − ŵ)²); rel_error = ‖w − ŵ‖_F / ‖w‖_F; sqnr_db = 10·log10(Σw² / Σ(w − ŵ)²)
    (inf when exact). Both tensors any shape, computed in float64 to stay exact for large layers.
    """
    w64 = w.detach().to(torch.float64)
    diff = w64 - w_hat.detach().to(torch.float64)
    noise = float(diff.square().sum())
    signal = float(w64.square().sum())
    mse = noise / max(w64.numel(), 1)
    rel = math.sqrt(noise / signal) if signal > 0 else (0.0 if noise == 0 else math.inf)
    sqnr = math.inf if noise == 0 else (10.0 * math.log10(signal / noise) if signal > 0 else -math.inf)
    return {"mse": mse, "rel_error": rel, "sqnr_db": sqnr}
