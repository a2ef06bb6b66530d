"""Calibration and output folder are remembered per model and come back when it is reopened,
also after a restart (issue 17, workflow: persistence)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest


def test_output_folder_and_calibration_come_back_per_model(qtbot: Any, tmp_path: Path, dialogs: list,
                                                           tiny_llama_dir: Path, tiny_model_factory: Any,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from PySide6.QtCore import QSettings

    from app import backend
    from app.main import make_application
    from app.main_window import MainWindow
    from app.settings import AppSettings

    def instant(*, job: Any, sink: Any, cancel: Any) -> Any:
        return SimpleNamespace(output=job.out, method=job.method.method, export="gptq", seconds=0.1,
                               peak_rss_gib=0.1, source_gib=0.0, output_gib=0.0)

    monkeypatch.setattr(backend, "run_quantization", instant)
    make_application()
    ini = str(tmp_path / "settings.ini")
    calib = tmp_path / "domain.txt"
    calib.write_text("domain text " * 200)
    first = MainWindow(AppSettings(QSettings(ini, QSettings.Format.IniFormat)))
    qtbot.addWidget(first)
    first.results_view.auto.setChecked(False)
    first.open_model_folder(tiny_llama_dir)
    q = first.quantize_view
    q.set_method("gptq")
    q.calib_source.blockSignals(True)
    q.calib_source.setCurrentIndex(q.calib_source.findData("file"))
    q.calib_source.blockSignals(False)
    q.calib_file.setEnabled(True)
    q.calib_file.setText(str(calib))
    out = tmp_path / "mine" / "tiny-gptq-domain"
    out.parent.mkdir()
    q.out_dir.setText(str(out))
    with qtbot.waitSignal(q.runner.finished, timeout=30000):
        assert q.run()
    other = tiny_model_factory(hidden_size=96, intermediate_size=256)
    first.open_model_folder(other)
    assert q.out_dir.text() != str(out)  # another model: its own proposal
    first.open_model_folder(tiny_llama_dir)
    assert q.out_dir.text() == str(out) and q.calib_file.text() == str(calib)
    first.close()

    second = MainWindow(AppSettings(QSettings(ini, QSettings.Format.IniFormat)))
    qtbot.addWidget(second)
    second.open_model_folder(tiny_llama_dir)
    q2 = second.quantize_view
    assert q2.out_dir.text() == str(out)
    assert q2.calib_source.currentData() == "file" and q2.calib_file.text() == str(calib)
    assert q2.calib_file.isEnabled()
    second.close()
