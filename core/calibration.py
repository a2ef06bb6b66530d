"""Calibration and evaluation text: sources, the calibration/held-out split, tokenization and
random calibration windows.

Sources: "builtin" (Python's `pydoc_data.topics`, present on every Python install), a UTF-8 text
file, or a JSONL file whose lines are objects with a `text` field. The built-in corpus is split in
two halves so that benchmarks calibrate on the first half and evaluate on the second.

Files up to LARGE_FILE_BYTES are tokenized whole and windows drawn from the token sequence (the
batches every earlier result was computed with). Larger files are never read whole: each window
is tokenized from a seeded random byte offset (from the next line start) on its own, so a 25 MB
file costs a few kilobytes per window instead of gigabytes of token lists.
"""
from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import BinaryIO
from typing import Any

import torch

from core.config import CalibConfig

BUILTIN = "builtin"
_JSONL_SUFFIXES = (".jsonl", ".ndjson")

# Above this a calibration file is sampled by byte offset instead of tokenized whole: tokenizing
# everything costs about 150 bytes of RSS per byte of text (a 25 MB file peaked at 3.7 GB) to use
# a few hundred thousand tokens. Small enough to bound that cost, large enough that the usual
# calibration files (and every test text) keep their exact batches.
LARGE_FILE_BYTES = 2 * 1024 * 1024


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
    is `calibration_text(calib.source)`. A source file larger than LARGE_FILE_BYTES is sampled
    by byte offset instead (see `sampled_file_windows`).
    """
    if text is None:
        path = Path(str(calib.source)).expanduser()
        if str(calib.source) != BUILTIN and path.is_file() and path.stat().st_size > LARGE_FILE_BYTES:
            return sampled_file_windows(tokenizer, path, calib)
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


def sampled_file_windows(tokenizer: Any, path: Path, calib: CalibConfig) -> torch.Tensor:
    """`calib.samples` windows of `calib.seq_len` tokens from a large text/JSONL file without
    reading it whole, LongTensor [samples, seq_len].

    Byte offsets are drawn uniformly by a generator seeded with `calib.seed`; each window is the
    first seq_len tokens of the text from the next line start (text files: the next space when a
    line is longer than what is read), tokenized without special tokens. Only the bytes a window
    needs are read (about 8 per token, doubled until enough), so memory stays at a few kilobytes
    per window whatever the file size. JSONL lines are checked as they are read."""
    size = path.stat().st_size
    jsonl = path.suffix.lower() in _JSONL_SUFFIXES
    first_read = 8 * calib.seq_len + 256
    gen = torch.Generator().manual_seed(calib.seed)
    # Offsets leave room for a window's worth of bytes, so few windows run into the end of the file.
    starts = torch.randint(0, max(1, size - 4 * first_read), (calib.samples,), generator=gen)
    rows: list[list[int]] = []
    with open(path, "rb") as f:
        for offset in starts.tolist():
            ids = _window_from(f, path, int(offset), first_read, calib.seq_len, tokenizer, jsonl)
            if ids is None and offset > 0:
                ids = _window_from(f, path, 0, first_read, calib.seq_len, tokenizer, jsonl)
            if ids is None:
                raise ValueError(
                    f"calibration text ({path}) has fewer than {calib.seq_len} tokens of text around byte {offset}; "
                    "use a file with more prose or code in it, or a smaller --seq-len"
                )
            rows.append(ids)
    return torch.tensor(rows, dtype=torch.long)


def _window_from(f: BinaryIO, path: Path, offset: int, nbytes: int, seq_len: int, tokenizer: Any,
                 jsonl: bool) -> list[int] | None:
    """The first seq_len token ids of the text from the first line start at or after `offset`,
    reading `nbytes` and doubling it until there are enough tokens; None when the file ends first."""
    while True:
        text, at_end = (_jsonl_from if jsonl else _text_from)(f, path, offset, nbytes)
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] if text.strip() else []
        # One token to spare: the block's last token may be a word cut off by the block's end.
        if len(ids) > seq_len or (at_end and len(ids) == seq_len):
            return list(ids[:seq_len])
        if at_end:
            return None
        nbytes *= 2


def _text_from(f: BinaryIO, path: Path, offset: int, nbytes: int) -> tuple[str, bool]:
    """(about nbytes of UTF-8 text starting at a line start at or after `offset`, whether the
    file ended). A line longer than the block is entered at its next space instead."""
    f.seek(offset)
    block = f.read(nbytes)
    at_end = len(block) < nbytes
    cut = 0
    if offset > 0:
        newline = block.find(b"\n")
        space = block.find(b" ")
        if newline >= 0:
            cut = newline + 1
        elif space >= 0:
            cut = space + 1
        else:  # no boundary at all: at least do not start inside a UTF-8 sequence
            while cut < len(block) and 0x80 <= block[cut] < 0xC0:
                cut += 1
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        # final=at_end: an incomplete character at the end of the block is held back, not an error.
        return decoder.decode(block[cut:], final=at_end), at_end
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {offset + cut + exc.start} cannot be decoded); convert it to UTF-8 first"
        ) from None


def _jsonl_from(f: BinaryIO, path: Path, offset: int, nbytes: int) -> tuple[str, bool]:
    """(the `text` fields of the JSONL records starting at or after `offset`, about nbytes of
    them, joined by blank lines as `load_text` does; whether the file ended)."""
    f.seek(offset)
    if offset > 0:
        f.readline()  # the record the offset fell into
    texts: list[str] = []
    read = 0
    while read < nbytes:
        where = f.tell()
        line = f.readline()
        if not line:
            return "\n\n".join(texts), True
        read += len(line)
        try:
            decoded = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path} is not UTF-8 text (byte {where + exc.start} cannot be decoded); "
                             "convert it to UTF-8 first") from None
        if not decoded.strip():
            continue
        try:
            record = json.loads(decoded)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line at byte {where}: invalid JSON ({exc.msg}); "
                             "fix or remove that line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}: line at byte {where}: needs a string \"text\" field; every line must be an "
                             "object like {\"text\": \"...\"}")
        if record["text"].strip():
            texts.append(record["text"])
    return "\n\n".join(texts), False
