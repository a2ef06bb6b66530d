"""Resume after a crash (in-process): a run stopped between layers with its temporary folder left
behind, as SIGKILL or a power loss would leave it, continues from the journal and produces exactly
the tensors of an uninterrupted run; anything that makes the journal untrustworthy starts fresh."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import interrupted
from core.config import CalibConfig, GPTQConfig, QuantJob, RTNConfig
from core.engine import find_interrupted, run_quantization
from core.events import LayerDone, Log
from core.output import JOURNAL_FILE, OutputWriter, partial_dir

LAYERS = 4
LINEARS_PER_LAYER = 7
CALIB = CalibConfig(samples=4, seq_len=32)


def read_output(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            tensors.update({k: sf.get_tensor(k) for k in sf.keys()})
    return tensors


def assert_same_output(a: Path, b: Path) -> None:
    ta, tb = read_output(a), read_output(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def crash_after(job: QuantJob, layers_done: int) -> None:
    """Run `job` and die once `layers_done` decoder layers were journaled (see
    interrupted.crash_once_journaled), leaving the temporary folder in place (the crash case:
    nothing could clean up)."""
    with interrupted.crash_once_journaled(layers_done, LINEARS_PER_LAYER) as hook:
        with pytest.raises(interrupted.Crash):
            run_quantization(job, sink=hook)
    journal = json.loads((partial_dir(job.out) / JOURNAL_FILE).read_text())
    assert sorted(journal["layers"], key=int) == [str(i) for i in range(layers_done)]


def run_logged(job: QuantJob) -> list[str]:
    logs: list[str] = []
    run_quantization(job, sink=lambda e: logs.append(f"{e.level}: {e.message}") if isinstance(e, Log) else None)
    return logs


@pytest.fixture(scope="module")
def model6(tiny_model_factory: Any) -> Path:
    return tiny_model_factory(layers=LAYERS)


@pytest.mark.parametrize("method", [RTNConfig(bits=4, group_size=32), GPTQConfig(bits=4, group_size=32)],
                         ids=["rtn", "gptq"])
def test_resumed_run_equals_an_uninterrupted_one(model6: Path, tmp_path: Path, method: Any) -> None:
    calib = CALIB if method.method == "gptq" else None
    ref = tmp_path / "ref"
    run_quantization(QuantJob(model=model6, out=ref, method=method, calib=calib))
    out = tmp_path / "out"
    crash_after(QuantJob(model=model6, out=out, method=method, calib=calib), 2)
    found = find_interrupted(out)
    assert found is not None and (found.layers_done, found.total_layers, found.method) == (2, LAYERS, method.method)
    logs = run_logged(QuantJob(model=model6, out=out, method=method, calib=calib, resume=True))
    assert f"info: resuming: 2/{LAYERS} layers reused from the interrupted run" in logs
    assert not any(line.startswith("warning") for line in logs), logs
    assert_same_output(ref, out)
    assert not partial_dir(out).exists() and find_interrupted(out) is None
    assert not list(out.glob("calib-after-layer-*"))


def test_the_crash_point_waits_for_a_writer_that_lags_behind(model6: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # A loaded machine, made reproducible: the writer thread journals every layer 0.3 s late, so at
    # layer 2's first LayerDone layer 1 is still queued. The crash must still come after layer 1.
    record_layer = OutputWriter.record_layer

    def late(writer: OutputWriter, *args: Any, **kwargs: Any) -> None:
        time.sleep(0.3)
        record_layer(writer, *args, **kwargs)

    monkeypatch.setattr(OutputWriter, "record_layer", late)
    out = tmp_path / "out"
    crash_after(QuantJob(model=model6, out=out, method=RTNConfig(bits=4, group_size=32)), 2)
    found = find_interrupted(out)
    assert found is not None and found.layers_done == 2


def test_changed_settings_start_fresh_and_say_why(model6: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    crash_after(QuantJob(model=model6, out=out, method=RTNConfig(bits=4, group_size=32)), 2)
    changed = QuantJob(model=model6, out=out, method=RTNConfig(bits=8, group_size=32), resume=True)
    logs = run_logged(changed)
    assert any(line.startswith("warning: not resuming, starting fresh") and "settings" in line for line in logs)
    assert not any("resuming:" in line for line in logs)
    ref = tmp_path / "ref"
    run_quantization(QuantJob(model=model6, out=ref, method=RTNConfig(bits=8, group_size=32)))
    assert_same_output(ref, out)


def test_a_touched_model_file_changes_the_fingerprint(model6: Path, tmp_path: Path) -> None:
    import shutil

    model = Path(shutil.copytree(model6, tmp_path / "model"))
    out = tmp_path / "out"
    method = RTNConfig(bits=4, group_size=32)
    crash_after(QuantJob(model=model, out=out, method=method), 1)
    weights = next(model.glob("*.safetensors"))
    st = weights.stat()
    import os

    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    logs = run_logged(QuantJob(model=model, out=out, method=method, resume=True))
    assert any(line.startswith("warning: not resuming, starting fresh") for line in logs)


def test_a_corrupted_shard_is_detected_and_the_run_starts_fresh(model6: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    method = RTNConfig(bits=4, group_size=32)
    crash_after(QuantJob(model=model6, out=out, method=method), 2)
    journal = json.loads((partial_dir(out) / JOURNAL_FILE).read_text())
    shard = partial_dir(out) / journal["layers"]["1"]["shard"]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # same size, valid header: only the checksum can tell
    shard.write_bytes(bytes(data))
    logs = run_logged(QuantJob(model=model6, out=out, method=method, resume=True))
    assert any(line.startswith("warning: not resuming") and shard.name in line and "checksum" in line for line in logs)
    ref = tmp_path / "ref"
    run_quantization(QuantJob(model=model6, out=ref, method=method))
    assert_same_output(ref, out)


def test_a_truncated_shard_and_a_garbled_journal_are_detected(model6: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    method = RTNConfig(bits=4, group_size=32)
    crash_after(QuantJob(model=model6, out=out, method=method), 2)
    journal = json.loads((partial_dir(out) / JOURNAL_FILE).read_text())
    shard = partial_dir(out) / journal["layers"]["0"]["shard"]
    shard.write_bytes(shard.read_bytes()[:100])
    logs = run_logged(QuantJob(model=model6, out=out, method=method, resume=True))
    assert any("starting fresh" in line and shard.name in line and "damaged" in line for line in logs)

    out2 = tmp_path / "out2"
    crash_after(QuantJob(model=model6, out=out2, method=method), 1)
    (partial_dir(out2) / JOURNAL_FILE).write_text('{"layers": {"0": ')
    assert find_interrupted(out2) is None
    logs = run_logged(QuantJob(model=model6, out=out2, method=method, resume=True))
    assert any("starting fresh" in line and "journal" in line for line in logs)


def test_a_leftover_without_resume_is_reported_and_replaced(model6: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    method = RTNConfig(bits=4, group_size=32)
    crash_after(QuantJob(model=model6, out=out, method=method), 1)
    logs = run_logged(QuantJob(model=model6, out=out, method=method))
    assert any(line.startswith("warning: an interrupted job was found") and f"1/{LAYERS} layers" in line
               and "replaced" in line for line in logs)
    assert not any("resuming:" in line for line in logs)
    assert not partial_dir(out).exists()


def test_cancelled_run_leaves_nothing_to_resume(model6: Path, tmp_path: Path) -> None:
    from core.events import CancelToken, Cancelled

    token = CancelToken()
    seen = {"n": 0}

    def sink(event: Any) -> None:
        if isinstance(event, LayerDone):
            seen["n"] += 1
            if seen["n"] == 10:
                token.cancel()

    out = tmp_path / "out"
    with pytest.raises(Cancelled):
        run_quantization(QuantJob(model=model6, out=out, method=RTNConfig(bits=4, group_size=32)), sink=sink,
                         cancel=token)
    assert list(tmp_path.iterdir()) == [] and find_interrupted(out) is None


def test_calibration_file_content_is_part_of_the_fingerprint(model6: Path, tmp_path: Path) -> None:
    from core.engine import job_fingerprint
    from core.model_io import open_model

    text = tmp_path / "calib.txt"
    text.write_text("some calibration text " * 50)
    src = open_model(model6)
    job = QuantJob(model=model6, out=tmp_path / "o", method=GPTQConfig(),
                   calib=CalibConfig(source=str(text), samples=4, seq_len=32))
    first = job_fingerprint(job, src, "compressed-tensors")
    assert job_fingerprint(job, src, "compressed-tensors") == first
    assert job_fingerprint(job, src, "gptq") != first
    text.write_text("other calibration text " * 50)
    assert job_fingerprint(job, src, "compressed-tensors") != first
