"""`quantscope eval`: JSON contract, human output and one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.cli import main


def test_eval_json_reports_perplexity_tokens_and_kl(tiny_llama_dir: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["eval", "--model", str(tiny_llama_dir), "--seq-len", "32", "--windows", "2",
               "--reference", str(tiny_llama_dir), "--json"])
    captured = capsys.readouterr()
    assert rc == 0
    doc = json.loads(captured.out)
    assert doc["tokens"] == 2 * 31 and doc["windows"] == 2 and doc["seq_len"] == 32
    assert 1.0 < doc["perplexity"] < 10_000
    assert doc["kl_divergence"] == pytest.approx(0.0, abs=1e-7)
    assert "evaluate" in captured.err  # progress goes to stderr, never into the JSON


def test_eval_plain_output_is_one_summary_line(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps({"text": "x = [i * i for i in range(20)]\n" * 10}) for _ in range(10)))
    rc = main(["eval", "--model", str(tiny_llama_dir), "--text", str(f), "--seq-len", "16", "--windows", "3"])
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0, captured.err
    assert out.count("\n") == 1 and "perplexity" in out and "3 windows of 16" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--windows", "0"], "--windows must be positive"),
        (["--seq-len", "1"], "--seq-len must be at least 2"),
        (["--text", "/nonexistent/file.txt"], "file not found"),
        (["--reference", "/nonexistent/folder"], "--reference /nonexistent/folder: not a model folder"),
    ],
)
def test_eval_bad_input_is_a_one_line_error(tiny_llama_dir: Path, capsys, extra: list[str], message: str) -> None:
    rc = main(["eval", "--model", str(tiny_llama_dir), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert err.strip().count("\n") == 0 and err.startswith("quantscope eval: error:")


def test_eval_text_shorter_than_one_window(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    f = tmp_path / "short.txt"
    f.write_text("tiny", encoding="utf-8")
    rc = main(["eval", "--model", str(tiny_llama_dir), "--text", str(f), "--seq-len", "64"])
    err = capsys.readouterr().err
    assert rc == 2 and "fewer than one window of 64" in err.strip().splitlines()[-1]


def test_eval_missing_model_folder(tmp_path: Path, capsys) -> None:
    assert main(["eval", "--model", str(tmp_path / "nope")]) == 2
    assert "not a model folder" in capsys.readouterr().err
