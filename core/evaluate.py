"""Evaluate a model folder: perplexity over consecutive windows of a text and, optionally, the KL
divergence of its next-token distributions against a reference model. Used by `quantscope eval`,
the GUI and the benchmarks."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from torch import nn

from core.calibration import BUILTIN, load_text, split_corpus, tokenize
from core.events import CancelToken, Log, Progress, Sink, StageStarted, check_cancel, null_sink
from core.metrics import DEFAULT_BATCH, window_stats

STAGE = "evaluate"


def evaluation_text(text: str | os.PathLike = BUILTIN, *, heldout: bool = False) -> str:
    """The text a model is evaluated on: a source ("builtin" or a file, see `load_text`), or
    with `heldout=True` its second half (the half calibration never draws from)."""
    full = load_text(text)
    return split_corpus(full)[1] if heldout else full


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    *,
    text: str = BUILTIN,
    heldout: bool = False,
    seq_len: int = 512,
    windows: int = 16,
    reference: nn.Module | None = None,
    batch_size: int = DEFAULT_BATCH,
    sink: Sink = null_sink,
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Like `evaluate` for models already in memory (e.g. a benchmark comparing several)."""
    if seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2 tokens, got {seq_len}")
    if windows <= 0:
        raise ValueError(f"--windows must be positive, got {windows}")
    start = time.perf_counter()
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        sink(Log("warning", f"--seq-len {seq_len} is longer than the model's context ({limit}); "
                            "perplexity past it is not meaningful"))
    ids = tokenize(tokenizer, evaluation_text(text, heldout=heldout))
    available = int(ids.numel()) // seq_len
    if available == 0:
        raise ValueError(
            f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}; "
            f"use a longer text or a smaller --seq-len (at most {ids.numel()})"
        )
    if available < windows:
        sink(Log("warning", f"the text has {ids.numel()} tokens: {available} windows of {seq_len} instead of {windows}"))
    total = min(windows, available)
    sink(StageStarted(STAGE, total=total, message=f"{total} windows of {seq_len} tokens"))

    def on_batch(done: int, n: int) -> None:
        sink(Progress(STAGE, done, n, f"window {done}/{n}"))
        if done < n:
            check_cancel(cancel)

    check_cancel(cancel)
    stats = window_stats(model, ids, seq_len, windows, reference=reference, batch_size=batch_size, on_batch=on_batch)
    result: dict[str, Any] = {
        "perplexity": stats.perplexity,
        "tokens": stats.tokens,
        "windows": stats.windows,
        "seq_len": seq_len,
    }
    if stats.kl_divergence is not None:
        result["kl_divergence"] = stats.kl_divergence
    result["seconds"] = time.perf_counter() - start
    return result


def evaluate(
    model_path: str | os.PathLike,
    *,
    text: str = BUILTIN,
    seq_len: int = 512,
    windows: int = 16,
    reference: str | os.PathLike | None = None,
    heldout: bool = False,
    batch_size: int = DEFAULT_BATCH,
    device: str = "cpu",
    sink: Sink = null_sink,
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Perplexity of the model in `model_path` (a plain or Quantscope-quantized folder) over
    `windows` consecutive non-overlapping windows of `seq_len` tokens from the start of `text`
    ("builtin" or a .txt/.jsonl file; `heldout=True` evaluates its second half), and with
    `reference` the mean KL(reference ‖ model) per predicted token.

    `device` is where both models run ("cpu", "cuda", "cuda:1", or "auto": the GPU when there is
    one, see core.devices.resolve_device); the result carries it as `device`.
    Returns {perplexity, tokens, windows, seq_len, kl_divergence (with a reference), seconds,
    model, reference}. Cancellation is checked between batches of windows and raises Cancelled.
    """
    from core.devices import resolve_device
    from core.loader import load_model
    from core.output import check_output

    device = str(resolve_device(device).device)
    start = time.perf_counter()
    if text != BUILTIN and not Path(text).expanduser().is_file():
        raise ValueError(f"text file not found: {text} (use 'builtin' or a .txt/.jsonl file)")
    if Path(model_path).expanduser().is_dir():
        # Headers only (milliseconds): a malformed folder is refused before any progress line.
        from core.model_io import open_model

        open_model(model_path, check_architecture=False)
    for path in (model_path, reference):
        if path is not None:
            check_output(path)  # a Quantscope output damaged since it was written: one line, the file
    sink(StageStarted("load", message=f"loading {model_path}"))
    model, tokenizer = load_model(model_path)
    model.to(device)
    check_cancel(cancel)
    ref_model = None
    if reference is not None:
        sink(StageStarted("load", message=f"loading reference {reference}"))
        ref_model, _ = load_model(reference, with_tokenizer=False)
        ref_model.to(device)
        check_cancel(cancel)
    result = evaluate_model(
        model, tokenizer, text=text, heldout=heldout, seq_len=seq_len, windows=windows, reference=ref_model,
        batch_size=batch_size, sink=sink, cancel=cancel,
    )
    result["seconds"] = time.perf_counter() - start
    result["model"] = str(model_path)
    result["device"] = device
    if reference is not None:
        result["reference"] = str(reference)
    return result
