"""Results tab's "Verify export" button (the written folder loaded by its real consumer, off the
UI thread) and the Quantize tab's resume prompt for a run that was killed mid-way."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import interrupted
from core.events import Log
from gui_steps import start_rtn

pytestmark = pytest.mark.timeout(300)


def _start_rtn(window: Any, model: Path, out: Path) -> None:
    start_rtn(window, model, out, group_size=32)


def test_verify_export_button_loads_the_output_with_transformers(
        window: Any, qtbot: Any, tiny_llama_dir: Path, tmp_path: Path, dialogs: list) -> None:
    from PySide6.QtCore import Qt

    view = window.results_view
    assert not view.verify_button.isEnabled()  # nothing written yet
    with qtbot.waitSignal(window.quantize_view.job_finished, timeout=120000):
        _start_rtn(window, tiny_llama_dir, tmp_path / "tiny-rtn")
    assert view.verify_button.isEnabled()
    with qtbot.waitSignal(view.verify_runner.finished, timeout=180000) as blocker:
        qtbot.mouseClick(view.verify_button, Qt.MouseButton.LeftButton)
    assert dialogs == []
    report = blocker.args[0]
    assert report.ok and report.loader.startswith("transformers")
    text = view.verify_status.text()
    assert text.startswith("OK") and "transformers" in text and "MISMATCH" not in text
    assert f"{report.ppl_loader:.3f}" in text and f"{report.ppl_quantscope:.3f}" in text
    assert view.verify_status.property("verifyState") == "ok"
    assert view.verify_button.isEnabled()


def test_verify_failure_is_shown_as_an_error(window: Any, qtbot: Any, tiny_llama_dir: Path, tmp_path: Path,
                                             dialogs: list, monkeypatch: pytest.MonkeyPatch) -> None:
    from app import backend
    from core.export.verify import VerifyError

    def mismatch(*, path: Any, sink: Any, cancel: Any, source: Any = None) -> Any:
        raise VerifyError(f"{path}: logits differ by 3.5 (tolerance 0.01)")

    with qtbot.waitSignal(window.quantize_view.job_finished, timeout=120000):
        _start_rtn(window, tiny_llama_dir, tmp_path / "tiny-rtn")
    monkeypatch.setattr(backend, "verify_export", mismatch)
    view = window.results_view
    with qtbot.waitSignal(view.verify_runner.failed, timeout=60000):
        assert view.verify()
    assert view.verify_status.text().startswith("MISMATCH")
    assert view.verify_status.property("verifyState") == "error"
    assert dialogs and dialogs[-1][0] == "Export verification failed"


def _kill_after_first_layer(model: Path, out: Path) -> None:
    """A real interrupted partial folder that nothing cleaned up: one layer journaled."""
    args = ["quantize", "--model", str(model), "--method", "rtn", "--bits", "4", "--group-size", "32",
            "--out", str(out)]
    interrupted.kill_after_layers(args, out, 1, delay=1.0)


def test_run_offers_to_resume_an_interrupted_job(window: Any, qtbot: Any, tiny_model_factory: Any,
                                                 tmp_path: Path, dialogs: list,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from PySide6.QtWidgets import QMessageBox

    from core.engine import find_interrupted

    model = tiny_model_factory(layers=4)
    out = tmp_path / "resumed"
    _kill_after_first_layer(model, out)
    found = find_interrupted(out)
    assert found is not None and 1 <= found.layers_done < found.total_layers == 4

    asked: list[tuple[str, str]] = []

    def yes(_parent: Any, title: str, text: str, *args: Any, **kwargs: Any) -> QMessageBox.StandardButton:
        asked.append((title, text))
        return QMessageBox.StandardButton.Yes

    monkeypatch.setattr(QMessageBox, "question", yes)
    q = window.quantize_view
    logs: list[str] = []
    q.runner.event.connect(lambda ev: logs.append(ev.message) if isinstance(ev, Log) else None)
    with qtbot.waitSignal(q.job_finished, timeout=120000):
        _start_rtn(window, model, out)
    assert dialogs == []
    assert len(asked) == 1
    assert asked[0][0] == "Resume interrupted job?"
    assert found.describe() in asked[0][1] and "Resume from the last finished layer?" in asked[0][1]
    assert q.last_job.resume
    assert out.is_dir() and (out / "config.json").is_file()
    assert any("reused from the interrupted run" in m for m in logs)
    assert "reused from the interrupted run" in q.log.toPlainText()


def test_declining_resume_starts_afresh(window: Any, qtbot: Any, tiny_model_factory: Any, tmp_path: Path,
                                        dialogs: list, monkeypatch: pytest.MonkeyPatch) -> None:
    from PySide6.QtWidgets import QMessageBox

    model = tiny_model_factory(layers=4)
    out = tmp_path / "fresh"
    _kill_after_first_layer(model, out)
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.No)
    q = window.quantize_view
    with qtbot.waitSignal(q.job_finished, timeout=120000):
        _start_rtn(window, model, out)
    assert not q.last_job.resume
    assert out.is_dir()
    assert "reused from the interrupted run" not in q.log.toPlainText()


def test_verify_passes_the_source_model_of_the_output(window: Any, qtbot: Any, tiny_llama_dir: Path,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from app import backend

    with qtbot.waitSignal(window.quantize_view.job_finished, timeout=120000):
        _start_rtn(window, tiny_llama_dir, tmp_path / "tiny-rtn")
    out = tmp_path / "tiny-rtn"
    # The output's report records the folder it was made from, so a result without its job has it too.
    assert backend.recorded_source(out) == tiny_llama_dir
    seen: list[dict[str, Any]] = []

    def capture(**kwargs: Any) -> Any:
        seen.append(kwargs)
        raise ValueError("not loaded in this test")

    monkeypatch.setattr(backend, "verify_export", capture)
    view = window.results_view
    with qtbot.waitSignal(view.verify_runner.failed, timeout=60000):
        assert view.verify()
    assert Path(seen[-1]["source"]) == tiny_llama_dir and Path(seen[-1]["path"]) == out
    view.job = SimpleNamespace()  # no job model: the report's record is used
    with qtbot.waitSignal(view.verify_runner.failed, timeout=60000):
        assert view.verify()
    assert Path(seen[-1]["source"]) == tiny_llama_dir


def test_verifying_a_gguf_checks_its_tokenization_against_the_source(window: Any, qtbot: Any, tiny_llama_dir: Path,
                                                                     tmp_path: Path, dialogs: list) -> None:
    from types import SimpleNamespace

    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from core.export.gguf import export_gguf

    gguf = export_gguf(tiny_llama_dir, tmp_path / "tiny.gguf", "F16")
    view = window.results_view
    view.set_job(SimpleNamespace(model=tiny_llama_dir), SimpleNamespace(output=gguf, method="rtn", export="gguf"), [])
    with qtbot.waitSignal(view.verify_runner.finished, timeout=180000) as blocker:
        assert view.verify()
    report = blocker.args[0]
    assert report.ok and report.tokenizer_check  # None when the check was skipped for want of a source
    assert "tokenization agrees" in view.verify_status.text()
    assert view.verification["tokenizer_check"] == report.tokenizer_check
    assert dialogs == []
