"""Calibration text sources, the calibration/held-out split and random windows."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.calibration import (
    builtin_text,
    calibration_batches,
    calibration_text,
    load_text,
    split_corpus,
    tokenize,
)
from core.config import CalibConfig


def test_builtin_text_joins_all_pydoc_topics_in_sorted_order() -> None:
    from pydoc_data.topics import topics

    text = load_text("builtin")
    assert text == builtin_text()
    keys = sorted(topics)
    assert text.startswith(topics[keys[0]])
    assert text.endswith(topics[keys[-1]])
    assert len(text) == sum(len(topics[k]) for k in keys) + 2 * (len(keys) - 1)


def test_split_corpus_halves_cover_the_text_at_a_line_break() -> None:
    text = builtin_text()
    calib, held = split_corpus(text)
    assert calib + held == text
    assert held.startswith("\n")
    assert abs(len(calib) - len(held)) < 0.01 * len(text)
    assert split_corpus("abcdef") == ("abc", "def")


def test_builtin_calibration_uses_only_the_first_half() -> None:
    assert calibration_text("builtin") == split_corpus(builtin_text())[0]


def test_txt_file_is_read_whole(tmp_path: Path) -> None:
    f = tmp_path / "c.txt"
    f.write_text("line one\nline two\n", encoding="utf-8")
    assert load_text(f) == "line one\nline two\n"
    assert calibration_text(str(f)) == "line one\nline two\n"


def test_jsonl_joins_text_fields_and_skips_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"text": "first", "id": 1}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    assert load_text(f) == "first\n\nsecond"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "", "contains no text"),
        ("blank.txt", "  \n\n ", "contains no text"),
        ("empty.jsonl", "\n", "contains no text"),
        ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', "bad.jsonl:2: invalid JSON"),
        ("nofield.jsonl", '{"text": "ok"}\n{"content": "x"}\n', "nofield.jsonl:2: missing \"text\" field"),
        ("notstr.jsonl", '{"text": 5}\n', "notstr.jsonl:1: \"text\" must be a string"),
    ],
)
def test_bad_text_files_raise_clear_errors(tmp_path: Path, name: str, content: str, message: str) -> None:
    f = tmp_path / name
    f.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        load_text(f)


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_text(f)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        load_text(tmp_path / "nope.txt")


def test_calibration_windows_are_deterministic_per_seed_and_come_from_the_text(tiny_tokenizer) -> None:
    cfg = CalibConfig(samples=6, seq_len=32, seed=3)
    a = calibration_batches(tiny_tokenizer, cfg)
    b = calibration_batches(tiny_tokenizer, cfg)
    c = calibration_batches(tiny_tokenizer, CalibConfig(samples=6, seq_len=32, seed=4))
    assert a.shape == (6, 32) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    ids = tokenize(tiny_tokenizer, calibration_text("builtin"))
    assert int(a.min()) >= 0 and int(a.max()) < len(tiny_tokenizer)
    # Every window is a contiguous slice of the tokenized calibration half.
    windows = ids.unfold(0, 32, 1)
    for row in a:
        assert bool((windows == row).all(dim=1).any())


def test_calibration_text_too_short_for_one_window(tmp_path: Path, tiny_tokenizer) -> None:
    f = tmp_path / "short.txt"
    f.write_text("a few words only", encoding="utf-8")
    with pytest.raises(ValueError, match="fewer than one window of 64"):
        calibration_batches(tiny_tokenizer, CalibConfig(source=str(f), samples=2, seq_len=64))


def test_explicit_text_overrides_the_source(tiny_tokenizer) -> None:
    text = "def f(x):\n    return x + 1\n" * 50
    batch = calibration_batches(tiny_tokenizer, CalibConfig(samples=3, seq_len=16), text=text)
    ids = tokenize(tiny_tokenizer, text)
    assert set(batch.unique().tolist()) <= set(ids.unique().tolist())
