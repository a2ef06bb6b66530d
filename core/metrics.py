"""Quality metrics: per-layer weight error, perplexity, KL divergence."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

logger = logging.getLogger(__name__)


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


# --- model-level quality: perplexity and KL divergence over consecutive windows -------------------

# Windows per forward pass. Logits are [batch, seq_len, vocab] float32, so 2 × 512 × 49152 × 4 B
# ≈ 200 MB for a SmolLM2-sized vocabulary (a few copies live at once with KL); bigger batches buy
# little on CPU.
DEFAULT_BATCH = 2


@dataclass
class WindowStats:
    """Sums over the evaluated windows; `tokens` is the number of predicted positions."""

    windows: int
    seq_len: int
    tokens: int = 0
    nll_sum: float = 0.0
    kl_sum: float | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens)

    @property
    def kl_divergence(self) -> float | None:
        return None if self.kl_sum is None else self.kl_sum / self.tokens


def consecutive_windows(token_ids: torch.Tensor, seq_len: int, windows: int) -> torch.Tensor:
    """Non-overlapping windows of `seq_len` tokens from the start of a 1-D id tensor,
    LongTensor [n, seq_len] with n = min(windows, len // seq_len). Raises ValueError when not even
    one window fits; logs a warning when fewer than asked fit."""
    ids = token_ids.reshape(-1)
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 tokens to predict anything, got {seq_len}")
    if windows <= 0:
        raise ValueError(f"windows must be positive, got {windows}")
    available = int(ids.numel()) // seq_len
    if available == 0:
        raise ValueError(
            f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}; "
            f"use a longer text or a smaller --seq-len (at most {ids.numel()})"
        )
    n = min(windows, available)
    if n < windows:
        logger.warning("text has only %d windows of %d tokens; evaluating %d instead of %d", available, seq_len, n, windows)
    return ids[: n * seq_len].reshape(n, seq_len)


def _logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(input_ids=batch.to(device), use_cache=False)
    return out.logits.float()


def window_stats(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    seq_len: int,
    windows: int,
    *,
    reference: torch.nn.Module | None = None,
    batch_size: int = DEFAULT_BATCH,
    on_batch: Callable[[int, int], None] | None = None,
) -> WindowStats:
    """Run `model` (and `reference`, if given) over consecutive windows and sum the next-token NLL
    of the model and, with a reference, KL(reference ‖ model) per predicted position. Positions
    0..seq_len−2 of each window are predicted (the last one has no target inside the window).
    `on_batch(done_windows, total_windows)` runs after each batch (progress, cancellation)."""
    chunks = consecutive_windows(token_ids, seq_len, windows)
    n = chunks.shape[0]
    stats = WindowStats(windows=n, seq_len=seq_len, kl_sum=0.0 if reference is not None else None)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            batch = chunks[start : start + batch_size]
            logits = _logits(model, batch)[:, :-1]
            targets = batch[:, 1:].to(logits.device)
            logp = torch.log_softmax(logits, dim=-1)
            stats.nll_sum -= float(logp.gather(-1, targets.unsqueeze(-1)).double().sum())
            stats.tokens += targets.numel()
            if reference is not None:
                ref_logits = _logits(reference, batch)[:, :-1].to(logits.device)
                if ref_logits.shape != logits.shape:
                    raise ValueError(
                        f"the reference model's vocabulary ({ref_logits.shape[-1]}) differs from the model's "
                        f"({logits.shape[-1]}); compare models that share a tokenizer"
                    )
                ref_logp = torch.log_softmax(ref_logits, dim=-1)
                kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
                stats.kl_sum += float(kl.double().sum())
            if on_batch is not None:
                on_batch(min(start + batch_size, n), n)
    return stats


def perplexity(
    model: torch.nn.Module, token_ids: torch.Tensor, seq_len: int, windows: int, *, batch_size: int = DEFAULT_BATCH
) -> tuple[float, int]:
    """(perplexity, predicted tokens) = exp(mean next-token NLL) over `windows` consecutive
    non-overlapping windows of `seq_len` tokens from the start of `token_ids` (fewer if the text
    is shorter; a warning is logged)."""
    stats = window_stats(model, token_ids, seq_len, windows, batch_size=batch_size)
    return stats.perplexity, stats.tokens


def kl_divergence(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    token_ids: torch.Tensor,
    seq_len: int,
    windows: int,
    *,
    batch_size: int = DEFAULT_BATCH,
) -> float:
    """Mean over predicted positions of KL(reference ‖ model) between the next-token
    distributions, in nats, on the same windows as `perplexity`."""
    stats = window_stats(model, token_ids, seq_len, windows, reference=reference, batch_size=batch_size)
    return float(stats.kl_divergence)
