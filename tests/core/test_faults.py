"""Fault tests: a `quantscope quantize` subprocess killed with SIGKILL mid-run is resumed with
`--resume` and gives exactly the tensors of an uninterrupted run; a full disk during the run
leaves no partial folder and says so; `--verify` and the exporters' extra files end to end."""
from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest

import interrupted
from core.cli import main
from core.output import partial_dir

LAYERS = 6

# GPTQ calibration kept tiny so a run takes seconds.
_CALIB_ARGS = ["--samples", "4", "--seq-len", "32"]


def _args(model: Path, out: Path, method: str, *extra: str) -> list[str]:
    args = ["quantize", "--model", str(model), "--method", method, "--bits", "4", "--group-size", "32",
            "--out", str(out), *extra]
    return args + (_CALIB_ARGS if method == "gptq" else [])


def kill_after_layers(args: list[str], out: Path, layers: int, timeout: float = 120.0) -> None:
    """SIGKILL a slowed-down quantize subprocess once `layers` layers are journaled, and check it
    left its temporary folder with fewer than all layers done."""
    interrupted.kill_after_layers(args, out, layers, delay=0.5, timeout=timeout)
    assert layers <= interrupted.journaled_layers(out) < LAYERS
    assert partial_dir(out).is_dir()


def assert_same_output(a: Path, b: Path) -> None:
    from safetensors import safe_open
    import torch

    def read(folder: Path) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as sf:
                tensors.update({k: sf.get_tensor(k) for k in sf.keys()})
        return tensors

    ta, tb = read(a), read(b)
    assert sorted(ta) == sorted(tb) and len(ta) > 0
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def crash_in_process(args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the CLI and die once layer 0 is journaled, leaving the temporary folder behind as a
    killed process would (cheaper than a subprocess for tests that only need the leftover)."""
    from core.cli import quantize as cli_quantize

    with interrupted.crash_once_journaled(1, 7) as crash_hook:
        class CrashingPrinter(cli_quantize.ProgressPrinter):
            def __call__(self, event: Any) -> None:
                crash_hook(event)
                super().__call__(event)

        with monkeypatch.context() as m:
            m.setattr(cli_quantize, "ProgressPrinter", CrashingPrinter)
            with pytest.raises(interrupted.Crash):
                main(args)


@pytest.fixture(scope="module")
def model(tiny_model_factory: Any) -> Path:
    return tiny_model_factory(layers=LAYERS)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_killed_quantize_resumes_to_identical_tensors(model: Path, tmp_path: Path, method: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    kill_after_layers(_args(model, out, method), out, 2)
    capsys.readouterr()
    # Without --resume the CLI names the interrupted job and how to continue it.
    from core.engine import find_interrupted

    found = find_interrupted(out)
    assert found is not None and found.total_layers == LAYERS and found.method == method
    assert main(_args(model, out, method, "--resume", "--json")) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    doc = json.loads(captured.out)
    assert len(doc["layers"]) == LAYERS * 7
    ref = tmp_path / "ref"
    assert main(_args(model, ref, method)) == 0
    assert_same_output(ref, out)
    assert not partial_dir(out).exists()


def test_leftover_of_a_crashed_run_is_reported_on_stderr_and_replaced(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_llama_dir
    out = tmp_path / "out"
    crash_in_process(_args(model, out, "rtn"), monkeypatch)
    capsys.readouterr()
    assert main(_args(model, out, "rtn")) == 0
    err = capsys.readouterr().err
    assert "an interrupted job was found" in err and "replaced" in err
    assert "pass --resume to continue from layer 2/2" in err
    assert (out / "config.json").is_file() and not partial_dir(out).exists()


def test_changed_settings_on_resume_are_reported_on_stderr(tiny_llama_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama_dir
    out = tmp_path / "out"
    crash_in_process(_args(model, out, "rtn"), monkeypatch)
    capsys.readouterr()
    args = _args(model, out, "rtn", "--resume")
    args[args.index("--group-size") + 1] = "64"
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "warning: not resuming, starting fresh" in err and "settings" in err


def test_disk_full_during_quantize_leaves_no_partial_folder(tiny_llama_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from core import output

    real = output.write_safetensors
    calls = {"n": 0}

    def fill_up(path: Path, tensors: Any, metadata: Any = None) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # stem, layer 0, then the disk is full on layer 1
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, tensors, metadata)

    monkeypatch.setattr(output, "write_safetensors", fill_up)
    out = tmp_path / "out"
    assert main(_args(tiny_llama_dir, out, "rtn")) == 2
    err = capsys.readouterr().err
    assert "disk full while writing" in err and "nothing was kept" in err
    assert list(tmp_path.iterdir()) == []


def test_gptq_act_order_defaults_to_the_gptq_layout_with_its_quantize_config(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from core.config import GPTQConfig
    from core.export import default_export

    assert default_export(GPTQConfig(act_order=True, static_groups=False)) == "gptq"
    assert default_export(GPTQConfig(act_order=True, static_groups=True)) == "compressed-tensors"
    out = tmp_path / "out"
    assert main(_args(tiny_llama_dir, out, "gptq", "--export", "gptq", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["export"] == "gptq"
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["bits"] == 4 and qc["group_size"] == 32
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4


def test_verify_report_goes_into_the_json_document(tiny_llama_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(_args(tiny_llama_dir, out, "rtn", "--verify", "--json")) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verify"]["ok"] is True and doc["verify"]["max_logit_diff"] < 1e-2


def test_verify_mismatch_exits_non_zero_and_keeps_the_output(tiny_llama_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from core.export import verify as verify_mod

    for key in list(verify_mod.TOLERANCE):
        monkeypatch.setitem(verify_mod.TOLERANCE, key, -1.0)
    out = tmp_path / "out"
    assert main(_args(tiny_llama_dir, out, "rtn", "--verify", "--json")) == 2
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["verify"]["ok"] is False and "does not match" in doc["verify"]["error"]
    assert "verification failed (output kept in" in captured.err
    assert (out / "config.json").is_file()


def test_out_inside_or_containing_the_model_folder_is_refused_even_with_overwrite(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    model = Path(shutil.copytree(tiny_llama_dir, tmp_path / "models" / "tiny"))
    before = sorted(p.name for p in model.iterdir())
    assert main(_args(model, model / "q4", "rtn")) == 2
    assert "is inside the model folder" in capsys.readouterr().err
    assert main(_args(model, tmp_path / "models", "rtn", "--overwrite")) == 2
    assert "contains the model folder" in capsys.readouterr().err
    assert sorted(p.name for p in model.iterdir()) == before


def test_home_folder_is_refused_as_output(tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_args(tiny_llama_dir, Path.home(), "rtn", "--overwrite")) == 2
    assert "system or home folder" in capsys.readouterr().err
