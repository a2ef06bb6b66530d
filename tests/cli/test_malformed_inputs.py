"""The malformed-input matrix: every broken model folder Quantscope knows of, through the real
commands. Each must exit 2 with exactly one stderr line that names the offending file and says
what to do, leave the source folder byte-for-byte as it was and write nothing beside --out."""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import malformed as bad
from core.cli import main

OPEN = ("quantize", "plan", "inspect", "eval")  # every command that opens the model folder

# case -> (damage, commands that must refuse it, file named in the message, words of the fix)
CASES: dict[str, tuple[Callable[[Path], None], tuple[str, ...], str, str]] = {
    # safetensors headers (issue 13, item 6)
    "overlapping offsets": (bad.overlapping_offsets, OPEN, bad.WEIGHTS, "re-download or re-save"),
    "gapped offsets": (bad.gapped_offsets, OPEN, bad.WEIGHTS, "re-download or re-save"),
    "negative offset": (bad.negative_offset, OPEN, bad.WEIGHTS, "re-download or re-save"),
    "uncovered bytes": (bad.uncovered_bytes, OPEN, bad.WEIGHTS, "re-download or re-save"),
    "trailing bytes": (bad.trailing_bytes, OPEN, bad.WEIGHTS, "re-download or re-save"),
    "negative shape dim": (bad.negative_dim, OPEN, bad.WEIGHTS, "re-download or re-save"),
    "shape x dtype != span": (bad.shape_span_mismatch, OPEN, bad.WEIGHTS, "re-download or re-save"),
    "integer dtype weight": (bad.integer_weight, OPEN, bad.WEIGHTS, "re-save it in float16/bfloat16/float32"),
    "truncated file": (bad.truncated_file, OPEN, bad.WEIGHTS, "fetch the file again"),
    "corrupt header JSON": (bad.corrupt_header_json, OPEN, bad.WEIGHTS, "re-download or re-save"),
    # config.json against the tensors (item 7)
    "hidden size 10^9": (bad.absurd_hidden_size, OPEN, "config.json", "fix the value in config.json"),
    "hidden size != stored": (bad.wrong_hidden_size, OPEN, bad.WEIGHTS, "fix config.json or re-download"),
    "zero attention heads": (bad.zero_heads, OPEN, "config.json", "must be a positive integer, fix config.json"),
    "more layers than stored": (bad.more_layers_than_stored, OPEN, "config.json", "set num_hidden_layers to 2"),
    "fewer layers than stored": (bad.fewer_layers_than_stored, OPEN, bad.WEIGHTS, "set num_hidden_layers to 2"),
    "q_proj stored [64, 256]": (bad.q_proj_wrong_shape, OPEN, bad.WEIGHTS, "fix config.json or re-download"),
    # the shard index (item 8)
    "index points to ../": (bad.index_pointing_outside, OPEN, "model.safetensors.index.json", "fix the weight_map"),
    "index with absolute path": (bad.index_with_absolute_path, OPEN, "model.safetensors.index.json",
                                 "fix the weight_map"),
    "tensor in two files": (bad.duplicate_tensor_without_index, OPEN, "extra.safetensors", "remove the stale file"),
    "missing shard": (bad.missing_shard, OPEN, "model.safetensors.index.json", "download all shards"),
    "corrupt index": (bad.corrupt_index, OPEN, "model.safetensors.index.json", "re-download or re-save"),
    # handled before issue 13
    "missing config.json": (bad.missing_config, OPEN, "model", "pass a Hugging Face model folder"),
    "pickle-only checkpoint": (bad.pickle_only, OPEN, "pytorch_model.bin", "Convert them to safetensors"),
    "NaN weight": (bad.nan_weight, ("quantize",), "model.layers.1.mlp.up_proj.weight", "re-download"),
    "unsupported architecture": (bad.unsupported_architecture, ("quantize",), "config.json", "supported:"),
    # a damaged tokenizer under --strict (item 12)
    "tokenizer.json not JSON": (bad.tokenizer_invalid_json, ("quantize --strict",), "tokenizer.json",
                                "copy a working tokenizer.json"),
    "tokenizer.json unloadable": (bad.tokenizer_unloadable, ("quantize --strict",), "tokenizer.json",
                                  "copy a working tokenizer.json"),
}


# Found only when the damaged layer is read (scanning every weight up front would read the model
# twice): progress lines precede the one error line there.
MID_RUN = {"NaN weight"}


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file's bytes (and every link's target) under root, by relative path."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link -> " + os.readlink(p)
            elif p.is_file():
                out[rel] = p.read_bytes()
            else:
                out[rel] = "dir"
    return out


def _argv(command: str, model: Path, out: Path) -> list[str]:
    name, *flags = command.split()
    if name == "quantize":
        return ["quantize", "--model", str(model), "--method", "rtn", "--out", str(out), *flags]
    if name == "plan":
        return ["plan", "--model", str(model), "--gpu", "rtx-4090"]
    if name == "inspect":
        return ["inspect", "--model", str(model)]
    return ["eval", "--model", str(model)]


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_model_is_refused_in_one_line_and_nothing_changes(
        case: str, tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    damage, commands, named, fix = CASES[case]
    source_root = tmp_path / "src"
    model = source_root / "model"
    shutil.copytree(tiny_llama_dir, model)
    damage(model)
    before = _snapshot(source_root)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    capsys.readouterr()
    for command in commands:
        rc = main(_argv(command, model, out))
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, (command, err)
        errors = [e for e in err if "error" in e]
        assert len(errors) == 1 and errors[0] == err[-1], (command, err)
        if case not in MID_RUN:
            assert len(err) == 1, (command, err)
        line = err[-1]
        assert line.startswith(f"quantscope {command.split()[0]}: error: "), line
        assert named in line and fix in line, (command, line)
        assert "Traceback" not in line
        assert _snapshot(source_root) == before, command
        assert list(work.iterdir()) == [], (command, list(work.iterdir()))


@pytest.mark.parametrize("damage", [bad.tokenizer_invalid_json, bad.tokenizer_unloadable])
def test_damaged_tokenizer_is_copied_with_a_warning_without_strict(
        damage: Callable[[Path], None], tiny_llama_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    damage(model)
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(model), "--method", "rtn", "--out", str(out)]) == 0
    warnings = [e for e in capsys.readouterr().err.splitlines() if e.startswith("warning:")]
    assert len(warnings) == 1 and str(model / "tokenizer.json") in warnings[0]
    assert "copied into the output as it is (--strict refuses it)" in warnings[0]
    assert (out / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()
