"""The saved report carries the export check's outcome, and the GPU, Plan and method settings
survive a restart (issue 17, bug 9)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any


def _fake_run(window: Any, tmp_path: Path) -> None:
    from core.config import QuantJob, RTNConfig

    out = tmp_path / "out"
    out.mkdir()
    job = QuantJob(model=tmp_path / "model", out=out, method=RTNConfig(bits=4, group_size=64))
    result = SimpleNamespace(output=out, method="rtn", export="compressed-tensors", seconds=1.0,
                             peak_rss_gib=0.1, source_gib=0.2, output_gib=0.05)
    window.results_view.set_job(job, result, [])


def test_report_includes_the_export_verification(window: Any, tmp_path: Path) -> None:
    from core.export.verify import VerifyReport

    _fake_run(window, tmp_path)
    view = window.results_view
    paths = view.save_report(tmp_path / "r0")
    assert json.loads(paths["json"].read_text())["verification"] == {"status": "not verified"}

    view._on_verified(VerifyReport(loader="transformers 5", max_logit_diff=1e-4, rel_logit_diff=1e-5,
                                   ppl_loader=10.5, ppl_quantscope=10.5, tokens=512, tolerance=1e-2, ok=True))
    paths = view.save_report(tmp_path / "r1")
    doc = json.loads(paths["json"].read_text())
    assert doc["verification"]["status"] == "ok" and doc["verification"]["loader"] == "transformers 5"
    assert doc["verification"]["ppl_loader"] == 10.5
    assert "Export verification" in paths["html"].read_text() and "transformers 5" in paths["html"].read_text()

    view._on_verify_failed(RuntimeError("could not load"), "")
    doc = json.loads(view.save_report(tmp_path / "r2")["json"].read_text())
    assert doc["verification"] == {"status": "error", "output": str(tmp_path / "out"), "message": "could not load"}


def test_gpu_plan_and_method_settings_survive_a_restart(qtbot: Any, tmp_path: Path, dialogs: list) -> None:
    from PySide6.QtCore import QSettings

    from app.main import make_application
    from app.main_window import MainWindow
    from app.settings import AppSettings

    make_application()
    ini = str(tmp_path / "settings.ini")
    first = MainWindow(AppSettings(QSettings(ini, QSettings.Format.IniFormat)))
    qtbot.addWidget(first)
    first.gpu_picker.select("h20")
    first.gpu_picker.count.setValue(2)
    first.plan_view.context.setValue(32768)
    first.plan_view.engine.setCurrentIndex(first.plan_view.engine.findData("vllm"))
    q = first.quantize_view
    q.set_method("gptq")
    q.bits.setValue(3)
    q.group_size.setCurrentText("64")
    q.sym.setCurrentIndex(q.sym.findData(False))
    q.act_order.setChecked(True)
    first.close()

    second = MainWindow(AppSettings(QSettings(ini, QSettings.Format.IniFormat)))
    qtbot.addWidget(second)
    assert second.gpu_picker.combo.currentData() == "h20" and second.gpu_picker.count.value() == 2
    assert second.state.gpu.key == "h20" and second.state.num_gpus == 2
    assert second.plan_view.context.value() == 32768 and second.plan_view.engine.currentData() == "vllm"
    q2 = second.quantize_view
    assert q2.method_key() == "gptq" and q2.bits.value() == 3 and q2.group_size.currentText() == "64"
    assert q2.sym.currentData() is False and q2.act_order.isChecked()
    second.close()
