"""Calibration and evaluation text: sources, the calibration/held-out split, tokenization and
random calibration windows.

Sources: "builtin" (Python's `pydoc_data.topics`, present on every Python install), a UTF-8 text
file, or a JSONL file whose lines are objects with a `text` field. The built-in corpus is split in
two halves so that benchmarks calibrate on the first half and evaluate on the second.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from core.config import CalibConfig

BUILTIN = "builtin"
_JSONL_SUFFIXES = (".jsonl", ".ndjson")


def builtin_text() -> str:
    """All topic texts of Python's `pydoc_data.topics`, joined in sorted key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded); convert it to UTF-8 first"
        ) from None


def _read_jsonl(path: Path) -> str:
    texts: list[str] = []
    for lineno, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg}); fix or remove that line") from None
        if not isinstance(record, dict) or "text" not in record:
            raise ValueError(f"{path}:{lineno}: missing \"text\" field; every line must be an object like {{\"text\": \"...\"}}")
        if not isinstance(record["text"], str):
            raise ValueError(f"{path}:{lineno}: \"text\" must be a string, got {type(record['text']).__name__}")
        if record["text"].strip():
            texts.append(record["text"])
    return "\n\n".join(texts)


def load_text(source: str | Path) -> str:
    """The whole text of a source: "builtin", a .jsonl/.ndjson file (the `text` fields joined by
    blank lines) or any other file read as UTF-8 text. Raises ValueError for a missing, empty or
    undecodable file and for bad JSONL lines (with the line number)."""
    if str(source) == BUILTIN:
        return builtin_text()
    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"text file not found: {path} (use 'builtin' or a .txt/.jsonl file)")
    text = _read_jsonl(path) if path.suffix.lower() in _JSONL_SUFFIXES else _read_utf8(path)
    if not text.strip():
        raise ValueError(f"{path} contains no text; give a file with some prose or code in it")
    return text


def split_corpus(text: str) -> tuple[str, str]:
    """(calibration part, held-out part): the first and second half of `text`, cut at the first
    line break at or after the middle (the exact middle when there is none) so no line is split."""
    middle = len(text) // 2
    cut = text.find("\n", middle)
    if cut < 0:
        cut = middle
    return text[:cut], text[cut:]


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of `text` as a 1-D LongTensor, with the tokenizer's usual special tokens (e.g. a
    leading BOS for Llama tokenizers). The whole text is encoded at once; models never see more
    than one window of it, so the tokenizer's max-length warning does not apply."""
    ids = tokenizer(text, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_text(source: str | Path) -> str:
    """The text calibration windows are drawn from: the first half of the built-in corpus (the
    second half is held out for evaluation), or the whole of a user's file."""
    text = load_text(source)
    return split_corpus(text)[0] if str(source) == BUILTIN else text


def calibration_batches(tokenizer: Any, calib: CalibConfig, text: str | None = None) -> torch.Tensor:
    """`calib.samples` random windows of `calib.seq_len` tokens, LongTensor [samples, seq_len].

    Window starts are drawn uniformly (with replacement) by a generator seeded with `calib.seed`,
    so the same config gives the same batches. `text` overrides the config's source; by default it
    is `calibration_text(calib.source)`.
    """
    if text is None:
        text = calibration_text(calib.source)
    ids = tokenize(tokenizer, text)
    n = int(ids.numel())
    if n < calib.seq_len:
        raise ValueError(
            f"calibration text ({calib.source}) has {n} tokens, fewer than one window of {calib.seq_len}; "
            f"use a longer text or a smaller --seq-len (at most {n})"
        )
    gen = torch.Generator().manual_seed(calib.seed)
    starts = torch.randint(0, n - calib.seq_len + 1, (calib.samples,), generator=gen)
    offsets = torch.arange(calib.seq_len)
    return ids[starts[:, None] + offsets[None, :]]
