"""Security: pickle checkpoints are refused without ever being unpickled, no code path loads
pickles or remote code, and outputs cannot be written over the model or into odd places."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from core import cli
from core.model_io import open_model

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = (ROOT / "core", ROOT / "app")

# Files allowed to pass a *non-constant* trust_remote_code (a user-ticked, warned option).
# Empty while no such option exists: every use is then a failure.
TRUST_REMOTE_CODE_ALLOWLIST: frozenset[str] = frozenset()

_TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 384,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "float32",
}


class _Payload:
    """Unpickling this runs `exec(code)`; here the code creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.code = f"open({str(marker)!r}, 'w').write('unpickled')"

    def __reduce__(self) -> tuple:
        return (exec, (self.code,))


def _malicious_model(folder: Path, weights_name: str = "pytorch_model.bin") -> tuple[Path, Path]:
    """A model folder whose only weights are a torch checkpoint that creates `marker` when loaded
    with plain pickle. Returns (folder, marker)."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder.parent / f"{folder.name}-UNPICKLED"
    (folder / "config.json").write_text(json.dumps(_TINY_CONFIG))
    torch.save({"model.embed_tokens.weight": torch.zeros(384, 64), "evil": _Payload(marker)}, folder / weights_name)
    return folder, marker


def test_malicious_checkpoint_really_runs_code_when_unpickled(tmp_path: Path) -> None:
    # Proves the fixture is live: if the refusals below were broken, the marker would appear.
    folder, marker = _malicious_model(tmp_path / "evil")
    code = f"import torch; torch.load({str(folder / 'pytorch_model.bin')!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
    assert marker.read_text() == "unpickled"


def test_weights_only_load_refuses_the_payload(tmp_path: Path) -> None:
    folder, marker = _malicious_model(tmp_path / "evil")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global|exec"):
        torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert not marker.exists()


@pytest.mark.parametrize("weights_name", ["pytorch_model.bin", "model.pt", "consolidated.pth"])
def test_open_model_refuses_pickle_only_folder_without_unpickling(tmp_path: Path, weights_name: str) -> None:
    folder, marker = _malicious_model(tmp_path / "evil", weights_name)
    with pytest.raises(ValueError, match="pickle") as info:
        open_model(folder)
    assert weights_name in str(info.value)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_open_model_refuses_a_pickle_file_passed_directly(tmp_path: Path) -> None:
    folder, marker = _malicious_model(tmp_path / "evil")
    with pytest.raises(ValueError, match="pickle"):
        open_model(folder / "pytorch_model.bin")
    assert not marker.exists()


def _registered_commands() -> set[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return set(sub.choices)


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = cli.main(args)
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def _assert_one_line_error(err: str, command: str, *needles: str) -> None:
    """The CLI's error contract: no traceback, and a final `quantscope CMD: error: ...` line
    (progress lines may come before it) holding every needle."""
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"quantscope {command}: error: "), err
    for needle in needles:
        assert needle in last, err


_CLI_CASES = {
    "quantize": lambda model, out: ["quantize", "--model", str(model), "--method", "rtn", "--bits", "4",
                                    "--out", str(out)],
    "eval": lambda model, out: ["eval", "--model", str(model)],
    "plan": lambda model, out: ["plan", "--model", str(model), "--gpu", "rtx-4090"],
    "inspect": lambda model, out: ["inspect", "--model", str(model)],
}


@pytest.mark.parametrize("command", sorted(_CLI_CASES))
def test_cli_refuses_pickle_model_and_never_unpickles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    if command not in _registered_commands():
        pytest.skip(f"`quantscope {command}` is not built yet")
    folder, marker = _malicious_model(tmp_path / "evil")
    code, err = _run_cli(_CLI_CASES[command](folder, tmp_path / "out"), capsys)
    assert code != 0
    _assert_one_line_error(err, command, "pickle")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


# --- source scan: pickles and remote code ---------------------------------------------------

def _is_const(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_calls(source: str) -> list[str]:
    """Unsafe deserialisation and remote-code patterns in a source file, as short descriptions."""
    problems = []
    tree = ast.parse(source)
    # Names bound to torch.load / pickle loaders by `from x import y [as z]`.
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle", "dill", "joblib", "cloudpickle"):
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                called = f"{func.value.id}.{func.attr}"
            elif isinstance(func, ast.Name):
                called = aliases.get(func.id, func.id)
            else:
                called = ""
            kw = {k.arg: k.value for k in node.keywords}
            line = node.lineno
            if called == "torch.load" and not _is_const(kw.get("weights_only"), True):
                problems.append(f"line {line}: torch.load without weights_only=True")
            if called in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "dill.loads",
                          "joblib.load", "cloudpickle.load", "cloudpickle.loads"):
                problems.append(f"line {line}: {called}")
            if called in ("np.load", "numpy.load") and _is_const(kw.get("allow_pickle"), True):
                problems.append(f"line {line}: {called}(allow_pickle=True)")
            if "trust_remote_code" in kw:
                value = kw["trust_remote_code"]
                if _is_const(value, True):
                    problems.append(f"line {line}: trust_remote_code=True")
                elif not _is_const(value, False):
                    problems.append(f"line {line}: trust_remote_code=<variable>")
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if _is_const(value, True) and isinstance(key, ast.Constant) and key.value == "trust_remote_code":
                    problems.append(f"line {node.lineno}: {{'trust_remote_code': True}}")
    return problems


def test_source_scan_catches_each_unsafe_pattern() -> None:
    snippet = textwrap.dedent(
        """
        import torch, pickle
        import numpy as np
        from torch import load as tload
        torch.load(p)
        torch.load(p, weights_only=False)
        torch.load(p, weights_only=flag)
        tload(p)
        pickle.loads(b)
        np.load(p, allow_pickle=True)
        AutoModel.from_pretrained(p, trust_remote_code=True)
        AutoModel.from_pretrained(p, trust_remote_code=user_ticked)
        kwargs = {"trust_remote_code": True}
        torch.load(p, weights_only=True, map_location="cpu")
        AutoModel.from_pretrained(p, trust_remote_code=False)
        np.load(p)
        """
    )
    assert unsafe_calls(snippet) == [
        "line 5: torch.load without weights_only=True",
        "line 6: torch.load without weights_only=True",
        "line 7: torch.load without weights_only=True",
        "line 8: torch.load without weights_only=True",
        "line 9: pickle.loads",
        "line 10: np.load(allow_pickle=True)",
        "line 11: trust_remote_code=True",
        "line 12: trust_remote_code=<variable>",
        "line 13: {'trust_remote_code': True}",
    ]


def test_no_source_loads_pickles_or_trusts_remote_code() -> None:
    sources = [p for d in SOURCE_DIRS if d.is_dir() for p in sorted(d.rglob("*.py"))]
    assert len(sources) >= 5
    offenders = {}
    for path in sources:
        rel = str(path.relative_to(ROOT))
        problems = unsafe_calls(path.read_text(encoding="utf-8"))
        if rel in TRUST_REMOTE_CODE_ALLOWLIST:
            problems = [p for p in problems if not p.endswith("trust_remote_code=<variable>")]
        if problems:
            offenders[rel] = problems
    assert offenders == {}


# --- output path validation -----------------------------------------------------------------

def _quantize_args(model: Path, out: Path | str, *extra: str) -> list[str]:
    return ["quantize", "--model", str(model), "--method", "rtn", "--bits", "4", "--out", str(out), *extra]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture
def own_model(tiny_model_factory, tmp_path: Path) -> Path:
    """A private copy of the 1-layer tiny model: a broken refusal may replace or delete it."""
    if "quantize" not in _registered_commands():
        pytest.skip("`quantscope quantize` is not built yet")
    return Path(shutil.copytree(tiny_model_factory(layers=1), tmp_path / "model"))


def test_quantize_refuses_to_write_into_the_model_folder(
    own_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _snapshot(own_model)
    code, err = _run_cli(_quantize_args(own_model, own_model), capsys)
    assert code != 0
    _assert_one_line_error(err, "quantize", str(own_model))
    assert _snapshot(own_model) == before


def test_quantize_with_overwrite_still_refuses_the_model_folder(
    own_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _snapshot(own_model)
    code, err = _run_cli(_quantize_args(own_model, own_model, "--overwrite"), capsys)
    assert code != 0
    _assert_one_line_error(err, "quantize", str(own_model))
    assert _snapshot(own_model) == before


def test_quantize_refuses_an_output_whose_parent_is_a_file(
    own_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file")
    code, err = _run_cli(_quantize_args(own_model, blocker / "out"), capsys)
    assert code != 0
    _assert_one_line_error(err, "quantize", "not-a-dir")
    assert blocker.read_text() == "a file"


def test_quantize_refuses_the_filesystem_root(own_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(os.listdir("/"))
    code, err = _run_cli(_quantize_args(own_model, "/"), capsys)
    assert code != 0
    _assert_one_line_error(err, "quantize")
    assert sorted(os.listdir("/")) == before


def test_output_writer_refuses_a_file_as_parent(tmp_path: Path) -> None:
    from core.output import OutputWriter

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file")
    with pytest.raises(ValueError, match="not-a-dir"):
        OutputWriter(blocker / "out", num_shards=1).check_target()
    assert blocker.read_text() == "a file"


def test_output_writer_refuses_the_filesystem_root_even_with_overwrite() -> None:
    from core.output import OutputWriter

    # check_target only inspects paths; nothing is created or removed.
    with pytest.raises(ValueError, match="/"):
        OutputWriter("/", num_shards=1, overwrite=True).check_target()
