"""The device pickers of the Quantize and Results tabs: Auto, CPU and each detected CUDA GPU,
following the GPU panel until the user chooses, reaching the job, and kept in the settings. This
machine has no GPU: detection is replaced by two fake cards."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gui_steps import start_rtn

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """backend.detected_gpus reports two GPUs (cuda:0, cuda:1) built from a catalog card."""
    from app import backend

    card = backend.catalog_gpus()[0]
    fakes = [dataclasses.replace(card, key=f"detected:{i}:{card.spec.id}", detected=True, index=i, free_gib=100.0,
                                 label=f"GPU {i}: Fake {card.spec.name} — 100.0 GiB free") for i in (0, 1)]
    monkeypatch.setattr(backend, "detected_gpus", lambda: list(fakes))
    return fakes


@pytest.fixture
def gpu_window(two_gpus: list[Any], qtbot: Any, tmp_path: Path, dialogs: list) -> Any:
    from PySide6.QtCore import QSettings

    from app.main import make_application
    from app.main_window import MainWindow
    from app.settings import AppSettings

    make_application()
    win = MainWindow(AppSettings(QSettings(str(tmp_path / "gpu-settings.ini"), QSettings.Format.IniFormat)))
    qtbot.addWidget(win)
    win.results_view.auto.setChecked(False)
    yield win
    for runner in win.runners():
        runner.shutdown(60000)


def _reopen(win: Any, qtbot: Any) -> Any:
    from app.main_window import MainWindow

    win.save_controls()
    again = MainWindow(win.settings)
    qtbot.addWidget(again)
    return again


def test_pickers_list_auto_cpu_and_each_detected_gpu(gpu_window: Any) -> None:
    for picker in (gpu_window.quantize_view.device_picker, gpu_window.results_view.device_picker):
        assert picker.devices() == ["auto", "cpu", "cuda:0", "cuda:1"]
        assert [picker.itemText(i) for i in range(2)] == ["Auto", "CPU"]
        assert "cuda:1" in picker.itemText(3) and "Fake" in picker.itemText(3)
    tip = gpu_window.quantize_view.device_picker.toolTip()
    assert "Auto" in tip and "estimate" in tip and "free memory" in tip and "CPU" in tip
    assert "Auto" in gpu_window.results_view.device_picker.toolTip()


def test_picker_follows_the_gpu_panel_until_the_user_chooses(gpu_window: Any, two_gpus: list[Any]) -> None:
    from app import backend

    from app.gpu_picker import CUSTOM

    g, q, r = gpu_window.gpu_picker, gpu_window.quantize_view.device_picker, gpu_window.results_view.device_picker
    assert g.current_option().index == 0  # the first detected GPU is the panel's default
    assert q.device() == "cuda:0" and r.device() == "cuda:0"
    assert g.select(two_gpus[1].key)
    assert q.device() == "cuda:1" and r.device() == "cuda:1"
    assert g.select(CUSTOM)  # not a card of this machine
    assert q.device() == "auto" and r.device() == "auto"
    assert g.select(backend.DEFAULT_GPU)  # a catalog card
    assert q.device() == "auto"
    q.choose("cpu")
    assert g.select(two_gpus[0].key)
    assert q.device() == "cpu"  # the user's choice stays
    assert r.device() == "cuda:0"


def test_without_a_detected_gpu_the_default_is_auto(window: Any) -> None:
    picker = window.quantize_view.device_picker
    assert picker.devices()[:2] == ["auto", "cpu"]
    assert picker.device() == "auto"


def test_the_chosen_device_reaches_the_quantization_job(gpu_window: Any, tiny_llama_dir: Path,
                                                         tmp_path: Path) -> None:
    q = gpu_window.quantize_view
    gpu_window.open_model_folder(tiny_llama_dir)
    q.set_method("rtn")
    q.out_dir.setText(str(tmp_path / "out"))
    assert q.build_job().device == "cuda:0"  # the GPU panel's detected card
    q.device_picker.choose("cuda:1")
    assert q.build_job().device == "cuda:1"
    q.device_picker.choose("auto")
    assert q.build_job().device == "auto"


def test_the_chosen_device_reaches_the_evaluation(gpu_window: Any, qtbot: Any, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from app import backend

    calls: list[dict[str, Any]] = []

    def fake_evaluate(**kwargs: Any) -> dict[str, Any]:
        calls.append(kwargs)
        return {"perplexity_before": 10.0, "perplexity_after": 11.0, "perplexity_change_pct": 10.0,
                "kl_divergence": 0.01, "device": kwargs["device"]}

    monkeypatch.setattr(backend, "evaluate_before_after", fake_evaluate)
    view = gpu_window.results_view
    view.set_job(SimpleNamespace(model=tmp_path), SimpleNamespace(output=tmp_path / "q"), [])
    view.device_picker.choose("cuda:1")
    with qtbot.waitSignal(view.runner.finished, timeout=30000):
        assert view.evaluate()
    assert calls[-1]["device"] == "cuda:1"
    assert "cuda:1" in view.eval_progress.format()


def test_device_choices_survive_a_restart(gpu_window: Any, qtbot: Any) -> None:
    gpu_window.quantize_view.device_picker.choose("cuda:1")
    gpu_window.results_view.device_picker.choose("cpu")
    again = _reopen(gpu_window, qtbot)
    assert again.quantize_view.device_picker.device() == "cuda:1"
    assert again.results_view.device_picker.device() == "cpu"
    assert again.settings.device_choices() == {"quantize": "cuda:1", "evaluate": "cpu"}


def test_a_picker_left_alone_keeps_following_after_a_restart(gpu_window: Any, qtbot: Any,
                                                              two_gpus: list[Any]) -> None:
    again = _reopen(gpu_window, qtbot)
    assert again.settings.device_choices() == {}
    assert again.gpu_picker.select(two_gpus[1].key)
    assert again.quantize_view.device_picker.device() == "cuda:1"


def test_a_saved_gpu_that_is_gone_falls_back_to_the_default(window: Any, qtbot: Any) -> None:
    window.settings.set_device_choices({"quantize": "cuda:3"})
    from app.main_window import MainWindow

    again = MainWindow(window.settings)
    qtbot.addWidget(again)
    assert again.quantize_view.device_picker.device() == "auto"
    assert not again.quantize_view.device_picker.chosen


def test_a_real_quantization_with_cpu_chosen_runs_on_the_cpu(gpu_window: Any, qtbot: Any, tiny_llama_dir: Path,
                                                             tmp_path: Path) -> None:
    q = gpu_window.quantize_view
    assert q.device_picker.device() == "cuda:0"  # what it would ask for without the choice
    q.device_picker.choose("cpu")
    out = tmp_path / "tiny-rtn-cpu"
    with qtbot.waitSignal(q.job_finished, timeout=120000) as blocker:
        start_rtn(gpu_window, tiny_llama_dir, out, group_size=32)
    assert q.last_job.device == "cpu"
    assert blocker.args[0].device == "cpu"
    report = json.loads((out / "quantscope_report.json").read_text())
    assert report["device"] == "cpu"
