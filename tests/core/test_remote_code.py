"""No code from a model folder ever runs: every transformers `from_pretrained` in core/ and app/
passes `trust_remote_code=False`, and a folder whose tokenizer config points at its own Python
file never gets that file imported — not even when the user answers "y" on stdin."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _from_pretrained_calls(path: Path) -> list[tuple[int, str]]:
    """(line, verdict) of every `X.from_pretrained(...)` call in `path` that does not pass the
    literal keyword `trust_remote_code=False`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "from_pretrained"):
            continue
        kw = {k.arg: k.value for k in node.keywords if k.arg is not None}
        value = kw.get("trust_remote_code")
        if not (isinstance(value, ast.Constant) and value.value is False):
            bad.append((node.lineno, ast.unparse(node)[:120]))
    return bad


def test_every_from_pretrained_in_core_and_app_refuses_remote_code():
    files = sorted((ROOT / "core").rglob("*.py")) + sorted((ROOT / "app").rglob("*.py"))
    offenders = [f"{f.relative_to(ROOT)}:{line}: {text}" for f in files for line, text in _from_pretrained_calls(f)]
    # The scan must see the calls it guards, or it proves nothing.
    seen = sum(f.read_text(encoding="utf-8").count(".from_pretrained(") for f in files)
    assert seen >= 8
    assert offenders == [], "from_pretrained without trust_remote_code=False:\n" + "\n".join(offenders)


def test_scan_flags_a_call_without_the_keyword(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("from transformers import AutoTokenizer as A\n"
                      "A.from_pretrained('x')\n"
                      "A.from_pretrained('x', trust_remote_code=False)\n"
                      "A.from_pretrained('x', trust_remote_code=flag)\n")
    assert [line for line, _ in _from_pretrained_calls(sample)] == [2, 4]


@pytest.fixture()
def booby_trapped(tiny_llama_dir, tmp_path):
    """A copy of the tiny model whose tokenizer config names a class in the folder's own evil.py,
    which writes a marker file when imported."""
    folder = tmp_path / "trap"
    shutil.copytree(tiny_llama_dir, folder)
    marker = tmp_path / "MARKER"
    (folder / "evil.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('foreign code ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n"
    )
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    cfg["tokenizer_class"] = "EvilTokenizer"
    cfg_path.write_text(json.dumps(cfg))
    return folder, marker


def _cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_MODULES_CACHE=str(tmp_path / "hf-modules"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # A careless user answers "y" to anything asked; nothing may be asked.
    return subprocess.run([sys.executable, "-m", "core", *args], input="y\ny\ny\n", capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300, check=False)


def test_gguf_export_never_runs_the_folders_tokenizer_code(booby_trapped, tmp_path):
    folder, marker = booby_trapped
    out = tmp_path / "m.gguf"
    proc = _cli(["export", "--model", str(folder), "--format", "gguf", "--out", str(out)], tmp_path)
    assert not marker.exists(), "the folder's evil.py was imported"
    assert "[y/N]" not in proc.stdout + proc.stderr
    if proc.returncode == 0:  # the built-in tokenizer (tokenizer.json) was used
        assert out.is_file()
    else:
        assert proc.returncode == 2
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("quantscope export: error: ") and str(folder) in last, proc.stderr
        assert "never runs a model's own code" in last and "Traceback" not in proc.stderr


def test_loading_a_folder_never_runs_its_tokenizer_code(booby_trapped, tmp_path):
    folder, marker = booby_trapped
    proc = _cli(["eval", "--model", str(folder), "--windows", "1", "--seq-len", "32"], tmp_path)
    assert not marker.exists(), "the folder's evil.py was imported"
    assert "[y/N]" not in proc.stdout + proc.stderr
    assert proc.returncode in (0, 2), proc.stderr
