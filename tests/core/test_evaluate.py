"""evaluate(): results, events, KL against a reference, held-out text, cancellation."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from core.calibration import builtin_text, split_corpus, tokenize
from core.evaluate import evaluate, evaluate_model
from core.events import CancelToken, Cancelled, Progress, StageStarted


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir: Path):
    from core.loader import load_model

    return load_model(tiny_llama_dir)


def test_evaluate_matches_perplexity_computed_on_the_transformers_model(tiny_llama_dir: Path, loaded) -> None:
    from transformers import AutoModelForCausalLM

    events: list = []
    result = evaluate(tiny_llama_dir, seq_len=48, windows=3, sink=events.append)
    assert result["windows"] == 3 and result["seq_len"] == 48 and result["tokens"] == 3 * 47
    assert "kl_divergence" not in result and result["seconds"] > 0

    _, tok = loaded
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = tokenize(tok, builtin_text())[: 3 * 48].reshape(3, 48)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert result["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-5)

    stages = [e.stage for e in events if isinstance(e, StageStarted)]
    assert stages == ["load", "evaluate"]
    progress = [(e.done, e.total) for e in events if isinstance(e, Progress)]
    assert progress[-1] == (3, 3) and all(t == 3 for _, t in progress)


def test_kl_against_itself_is_zero_and_against_a_quantized_copy_positive(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from core.config import QuantJob, RTNConfig
    from core.engine import run_quantization

    same = evaluate(tiny_llama_dir, seq_len=32, windows=2, reference=tiny_llama_dir)
    assert same["kl_divergence"] == pytest.approx(0.0, abs=1e-7)
    out = tmp_path / "w3"
    run_quantization(QuantJob(model=tiny_llama_dir, out=out, method=RTNConfig(bits=3, group_size=32)))
    q = evaluate(out, seq_len=32, windows=2, reference=tiny_llama_dir)
    assert q["kl_divergence"] > 1e-4
    assert q["perplexity"] != pytest.approx(same["perplexity"], rel=1e-6)


def test_heldout_evaluates_the_second_half(loaded) -> None:
    model, tok = loaded
    full = evaluate_model(model, tok, seq_len=32, windows=1)
    held = evaluate_model(model, tok, seq_len=32, windows=1, heldout=True)
    ids = tokenize(tok, split_corpus(builtin_text())[1])[:32]
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1]
    expected = math.exp(float(torch.nn.functional.cross_entropy(logits, ids[1:])))
    assert held["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert held["perplexity"] != pytest.approx(full["perplexity"], rel=1e-3)


def test_short_text_evaluates_fewer_windows_and_says_so(loaded, tmp_path: Path) -> None:
    model, tok = loaded
    f = tmp_path / "t.txt"
    f.write_text("for i in range(10):\n    print(i)\n" * 8, encoding="utf-8")
    n = len(tokenize(tok, f.read_text()))
    events: list = []
    result = evaluate_model(model, tok, text=str(f), seq_len=32, windows=100, sink=events.append)
    assert result["windows"] == n // 32 < 100
    assert any("instead of 100" in getattr(e, "message", "") for e in events)
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluate_model(model, tok, text=str(f), seq_len=n + 1, windows=1)


def test_cancel_between_windows_raises_cancelled(loaded) -> None:
    model, tok = loaded
    token = CancelToken()
    seen: list = []

    def sink(event) -> None:
        seen.append(event)
        if isinstance(event, Progress):
            token.cancel()

    with pytest.raises(Cancelled):
        evaluate_model(model, tok, seq_len=16, windows=4, batch_size=1, sink=sink, cancel=token)
    assert [e.done for e in seen if isinstance(e, Progress)] == [1]


def test_bad_arguments_raise_value_errors(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        evaluate(tiny_llama_dir, text=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="windows must be positive"):
        evaluate(tiny_llama_dir, windows=0)
    with pytest.raises(ValueError, match="config.json"):
        evaluate(tmp_path)


@pytest.mark.gpu
def test_evaluate_on_cuda_matches_cpu(tiny_llama_dir: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cpu = evaluate(tiny_llama_dir, seq_len=32, windows=2, reference=tiny_llama_dir)
    gpu = evaluate(tiny_llama_dir, seq_len=32, windows=2, reference=tiny_llama_dir, device="cuda")
    assert gpu["perplexity"] == pytest.approx(cpu["perplexity"], rel=1e-3)
    assert gpu["kl_divergence"] == pytest.approx(0.0, abs=1e-6)
