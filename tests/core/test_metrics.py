"""Perplexity and KL divergence over consecutive windows, checked against hand computations."""
from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

from core.metrics import consecutive_windows, kl_divergence, perplexity, weight_error, window_stats


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 50, (130,), generator=torch.Generator().manual_seed(1))


def _hand_nll(model: torch.nn.Module, window: torch.Tensor) -> list[float]:
    with torch.no_grad():
        logits = model(window[None]).logits[0].double()
    out = []
    for t in range(len(window) - 1):
        p = torch.softmax(logits[t], dim=0)
        out.append(-math.log(float(p[window[t + 1]])))
    return out


def test_perplexity_equals_exp_of_mean_nll_computed_by_hand(tiny_model, ids) -> None:
    nll: list[float] = []
    for w in range(3):
        nll += _hand_nll(tiny_model, ids[w * 20 : (w + 1) * 20])
    ppl, tokens = perplexity(tiny_model, ids, seq_len=20, windows=3, batch_size=2)
    assert tokens == 3 * 19 == len(nll)
    assert ppl == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    # A random 50-token model is close to uniform, so perplexity is near the vocabulary size.
    assert 30 < ppl < 80


def test_batch_size_does_not_change_the_result(tiny_model, ids) -> None:
    a = perplexity(tiny_model, ids, seq_len=16, windows=5, batch_size=1)
    b = perplexity(tiny_model, ids, seq_len=16, windows=5, batch_size=5)
    assert a[1] == b[1] == 75
    assert a[0] == pytest.approx(b[0], rel=1e-5)


def test_windows_are_consecutive_from_the_start_and_capped_by_the_text(ids, caplog) -> None:
    w = consecutive_windows(ids, 40, 2)
    assert torch.equal(w, ids[:80].reshape(2, 40))
    with caplog.at_level(logging.WARNING):
        w = consecutive_windows(ids, 40, 10)
    assert w.shape == (3, 40)
    assert "only 3 windows" in caplog.text
    with pytest.raises(ValueError, match="fewer than one window of 200"):
        consecutive_windows(ids, 200, 1)


def test_kl_of_a_model_against_itself_is_zero(tiny_model, ids) -> None:
    assert kl_divergence(tiny_model, tiny_model, ids, seq_len=32, windows=2) == pytest.approx(0.0, abs=1e-6)


def test_kl_against_a_perturbed_copy_is_positive_and_matches_a_hand_computation(tiny_model, ids) -> None:
    other = copy.deepcopy(tiny_model)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kl = kl_divergence(other, tiny_model, ids, seq_len=32, windows=2)
    with torch.no_grad():
        total, n = 0.0, 0
        for w in range(2):
            win = ids[w * 32 : (w + 1) * 32][None]
            p = torch.softmax(tiny_model(win).logits[0].double(), -1)[:-1]
            q = torch.softmax(other(win).logits[0].double(), -1)[:-1]
            total += float((p * (p / q).log()).sum())
            n += p.shape[0]
    assert kl > 1e-4
    assert kl == pytest.approx(total / n, rel=1e-4)


def test_window_stats_reports_progress_per_batch(tiny_model, ids) -> None:
    seen: list[tuple[int, int]] = []
    stats = window_stats(tiny_model, ids, 16, 5, batch_size=2, on_batch=lambda d, n: seen.append((d, n)))
    assert seen == [(2, 5), (4, 5), (5, 5)]
    assert stats.windows == 5 and stats.tokens == 75 and stats.kl_divergence is None


def test_weight_error_is_unchanged() -> None:
    w = torch.tensor([[3.0, 4.0]])
    m = weight_error(w, torch.tensor([[3.0, 3.0]]))
    assert m["mse"] == pytest.approx(0.5)
    assert m["rel_error"] == pytest.approx(0.2)
    assert m["sqnr_db"] == pytest.approx(10 * math.log10(25.0))
