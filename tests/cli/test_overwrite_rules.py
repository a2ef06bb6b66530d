"""Issue 13 from the command line: export never touches its source, --overwrite replaces only
Quantscope's own output, one run per --out at a time (two real processes), SIGTERM/SIGHUP
cancel like Ctrl-C, symbolic links are refused, and eval names a damaged output file."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import interrupted
from core.cli import main
from core.outlock import OutputLock, lock_path
from core.output import partial_dir

ROOT = Path(__file__).resolve().parents[2]
LAYERS = 6


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _quantize(model: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", "--model", str(model), "--method", "rtn", "--bits", "4", "--group-size", "32",
            "--out", str(out), *extra]


def _one_line_error(capsys: pytest.CaptureFixture[str], command: str, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"quantscope {command}: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def model(tiny_model_factory) -> Path:
    return tiny_model_factory(layers=LAYERS)


# -- 1 ----------------------------------------------------------------------------------------------

def test_export_overwrite_never_deletes_the_source_or_what_is_beside_it(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parent = tmp_path / "P"
    parent.mkdir()
    assert main(_quantize(tiny_llama_dir, parent / "q")) == 0
    (parent / "notes.txt").write_text("unrelated")
    shutil.copytree(tiny_llama_dir, parent / "another-model")
    before = _tree(parent)
    capsys.readouterr()
    for out, word in ((parent, "contains"), (parent / "q", "is"), (parent / "q" / "sub", "is inside")):
        for fmt, target in (("gptq", out), ("gguf", out / "m.gguf")):
            if fmt == "gguf" and out == parent:
                continue  # writing a new file beside the source is allowed (and replaces nothing)
            rc = main(["export", "--model", str(parent / "q"), "--format", fmt, "--out", str(target), "--overwrite"])
            assert rc == 2
            _one_line_error(capsys, "export", "the model folder")
    assert _tree(parent) == before


# -- 2 ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["quantize", "export"])
def test_overwrite_of_a_folder_quantscope_did_not_write_is_refused(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    source = tiny_llama_dir
    if command == "export":
        source = tmp_path / "q"
        assert main(_quantize(tiny_llama_dir, source)) == 0
    out = tmp_path / "docs"
    (out / "photos").mkdir(parents=True)
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (out / name).write_text(name)
    before = _tree(out)
    capsys.readouterr()
    args = (_quantize(source, out, "--overwrite") if command == "quantize" else
            ["export", "--model", str(source), "--format", "gptq", "--out", str(out), "--overwrite"])
    assert main(args) == 2
    _one_line_error(capsys, command, f"--out {out.absolute()} holds 5 entries that Quantscope did not write "
                                     "(a.txt, b.txt, c.txt, ...)", "choose another --out")
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == (["docs", "q"] if command == "export" else ["docs"])
    # Its own earlier output it does replace.
    shutil.rmtree(out)
    assert main(args[:-1]) == 0 and main(args) == 0


# -- 3: two real processes ----------------------------------------------------------------------------

def test_a_second_run_to_a_busy_out_fails_at_once_naming_the_first(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, QUANTSCOPE_TEST_LAYER_DELAY="0.4", PYTHONPATH=str(ROOT))
    first = subprocess.Popen([sys.executable, "-m", "core", *_quantize(model, out)], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while interrupted.journaled_layers(out) < 1:
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        journal = (partial_dir(out) / "quantscope_journal.json").read_bytes()
        for extra in ((), ("--overwrite",), ("--resume",), ("--overwrite", "--resume")):
            t0 = time.monotonic()
            assert main(_quantize(model, out, "--bits", "8", *extra)) == 2
            assert time.monotonic() - t0 < 10
            _one_line_error(capsys, "quantize", f"in use by another Quantscope run (pid {first.pid}, ",
                            "-m core quantize", "started ")
        assert partial_dir(out).is_dir() and (partial_dir(out) / "quantscope_journal.json").read_bytes() != b""
        assert first.wait(180) == 0, first.stderr.read().decode()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        first.stderr.close()
    assert journal
    report = json.loads((out / "quantscope_report.json").read_text())
    assert report["settings"]["bits"] == 4 and len(report["layers"]) == LAYERS * 7  # the first run's, whole
    assert main(["eval", "--model", str(out), "--windows", "1", "--seq-len", "16"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_gguf_export_to_a_busy_out_fails_at_once(tiny_llama_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    target = (tmp_path / "m.gguf").absolute()
    with OutputLock(target):  # another run holds it (tests/core/test_output_safety.py races two real exports)
        rc = main(["export", "--model", str(tiny_llama_dir), "--format", "gguf", "--out", str(target)])
        assert rc == 2
        _one_line_error(capsys, "export", "in use by another Quantscope run", f"pid {os.getpid()}")
    assert list(tmp_path.iterdir()) == []


# -- 13: SIGTERM and SIGHUP ----------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_cancel_like_ctrl_c(model: Path, tmp_path: Path, sig: signal.Signals) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, QUANTSCOPE_TEST_LAYER_DELAY="0.4", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "core", *_quantize(model, out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while interrupted.journaled_layers(out) < 1:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(sig)
        rc = proc.wait(60)
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert rc == 128 + sig, err
    assert err.splitlines()[-1] == f"quantscope quantize: stopped by {sig.name}; nothing unfinished was left behind"
    assert list(tmp_path.iterdir()) == []  # no output, no temporary folder, no lock file


def test_symlinked_out_is_refused_without_leaving_anything(tiny_llama_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    real = tmp_path / "real"
    assert main(_quantize(tiny_llama_dir, real)) == 0
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    before = _tree(real)
    capsys.readouterr()
    assert main(_quantize(tiny_llama_dir, link, "--overwrite")) == 2
    _one_line_error(capsys, "quantize", "is a symbolic link", str(real))
    gguf_link = tmp_path / "m.gguf"
    gguf_link.symlink_to(tmp_path / "elsewhere.gguf")
    assert main(["export", "--model", str(tiny_llama_dir), "--format", "gguf", "--out", str(gguf_link),
                 "--overwrite"]) == 2
    _one_line_error(capsys, "export", "is a symbolic link")
    assert _tree(real) == before and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "m.gguf", "real"]


# -- 14: a damaged output is named by eval ----------------------------------------------------------

def test_eval_names_a_damaged_shard_and_a_damaged_gguf(tiny_llama_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(_quantize(tiny_llama_dir, out)) == 0
    gguf_file = tmp_path / "m.gguf"
    assert main(["export", "--model", str(tiny_llama_dir), "--format", "gguf", "--out", str(gguf_file)]) == 0
    eval_args = ["--windows", "1", "--seq-len", "16"]
    assert main(["eval", "--model", str(out), *eval_args]) == 0
    capsys.readouterr()
    shard = sorted(out.glob("model-*.safetensors"))[1]
    for victim in (shard, gguf_file):
        data = bytearray(victim.read_bytes())
        data[-7] ^= 0x10  # inside the last tensor: the file still parses
        victim.write_bytes(bytes(data))
    assert main(["eval", "--model", str(out), *eval_args]) == 2
    _one_line_error(capsys, "eval", f"{shard} is damaged", "CRC-32", "again")
    assert main(["eval", "--model", str(gguf_file), *eval_args]) == 2
    _one_line_error(capsys, "eval", f"{gguf_file} is damaged", "again")
