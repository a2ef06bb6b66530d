"""The main window end to end, offscreen: open a model → plan; quantize through the worker;
cancel; bad folders; closing during a run."""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest

import gui_steps
from gui_steps import job_processes, start_rtn

from core.events import LayerDone, Log

pytestmark = pytest.mark.timeout(240)

TINY_LINEARS = 2 * 7  # tiny_llama_dir: 2 decoder layers × q/k/v/o/gate/up/down


def _totals(win: Any) -> dict[str, float]:
    return {r["format"]: r["total_gib"] for r in win.plan_view.rows}


def test_opening_a_model_folder_fills_the_plan_table(window: Any, tiny_llama_dir: Path) -> None:
    choice = window.open_model_folder(tiny_llama_dir)
    assert choice is not None and window.state.model is choice
    table = window.plan_view.table
    assert table.rowCount() == len(window.plan_view.rows) >= 5
    for r in range(table.rowCount()):
        for c in range(table.columnCount()):
            assert table.item(r, c).text() != ""
    # The sidebar shows facts read from the headers.
    facts = {window.model_picker.facts.itemAt(i, window.model_picker.facts.ItemRole.LabelRole).widget().text():
             window.model_picker.facts.itemAt(i, window.model_picker.facts.ItemRole.FieldRole).widget().text()
             for i in range(window.model_picker.facts.rowCount())
             if window.model_picker.facts.itemAt(i, window.model_picker.facts.ItemRole.LabelRole) is not None}
    assert facts["Layers"] == "2"
    assert facts["Architecture"] == "LlamaForCausalLM"
    assert str(tiny_llama_dir) in window.settings.recent_models()


def test_changing_the_context_length_changes_the_totals(window: Any, tiny_llama_dir: Path) -> None:
    window.open_model_folder(tiny_llama_dir)
    window.plan_view.context.setValue(1024)
    small = _totals(window)
    kv_small = {r["format"]: r["kv_cache_gib"] for r in window.plan_view.rows}
    window.plan_view.context.setValue(65536)
    large = _totals(window)
    kv_large = {r["format"]: r["kv_cache_gib"] for r in window.plan_view.rows}
    assert small.keys() == large.keys()
    assert all(large[f] > small[f] for f in small)
    # KV by hand for the tiny GQA config: 2 (K,V) · 2 layers · 2 KV heads · head_dim 32 · context · 2 B.
    fmt = next(iter(kv_small))
    assert kv_large[fmt] == pytest.approx(2 * 2 * 2 * 32 * 65536 * 2 / 2**30, abs=0.001)
    assert kv_small[fmt] < kv_large[fmt] / 32
    # The table shows the new totals.
    total_col = [t for t, _ in __import__("app.views.plan_view", fromlist=["COLUMNS"]).COLUMNS].index("Total")
    shown = window.plan_view.table.item(0, total_col).text()
    assert shown == f"{window.plan_view.rows[0]['total_gib']:.2f} GiB"


def test_offload_slider_moves_layers_to_the_cpu(window: Any, tiny_llama_dir: Path) -> None:
    window.open_model_folder(tiny_llama_dir)
    view = window.plan_view
    view.table.selectRow(0)
    view.slider.setValue(0)
    assert "GPU: 0 layers" in view.offload_text.text()
    assert "CPU: 2 layers" in view.offload_text.text()
    view.slider.setValue(2)
    assert "GPU: 2 layers" in view.offload_text.text()


@pytest.fixture
def gated_engine(window: Any, monkeypatch: pytest.MonkeyPatch) -> Callable[[], bool]:
    """Runs the real engine in the job process but holds it there after the first LayerDone until
    the job is cancelled (gui_steps.gated_quantization), so "mid-run" is certain however fast the
    machine is. Returns a check that the held layer's point reached the window."""
    from app import backend

    monkeypatch.setattr(backend, "quantize_here", gui_steps.gated_quantization)
    return lambda: len(window.quantize_view.plot.points) >= 1


def _start_rtn(window: Any, model: Path, out: Path) -> None:
    start_rtn(window, model, out, group_size=64)


def test_rtn_quantization_through_the_worker_plots_one_point_per_linear(
        window: Any, qtbot: Any, tiny_llama_dir: Path, tmp_path: Path, dialogs: list) -> None:
    out = tmp_path / "tiny-rtn"
    events: list[LayerDone] = []
    logs: list[str] = []
    window.quantize_view.runner.event.connect(lambda ev: events.append(ev) if isinstance(ev, LayerDone) else None)
    window.quantize_view.runner.event.connect(lambda ev: logs.append(ev.message) if isinstance(ev, Log) else None)
    with qtbot.waitSignal(window.quantize_view.job_finished, timeout=120000) as blocker:
        _start_rtn(window, tiny_llama_dir, out)
    assert dialogs == []
    # The engine ran in a job process of its own (the GUI's GIL stays free), which has ended.
    pids = [int(m.rsplit(" ", 1)[1]) for m in logs if m.startswith("running in job process ")]
    assert len(pids) == 1 and pids[0] != os.getpid()
    assert job_processes() == []
    result = blocker.args[0]
    assert out.is_dir() and (out / "config.json").is_file()
    assert any(out.glob("*.safetensors"))
    assert len(events) == TINY_LINEARS
    plot = window.quantize_view.plot
    assert len(plot.points) == TINY_LINEARS
    assert plot.point_count() == TINY_LINEARS
    assert [p.name for p in plot.points] == [e.name for e in events]
    # The plot shows what the engine measured: 4-bit RTN of a random Gaussian weight is a few % off.
    assert all(0.01 < p.metrics["rel_error"] < 0.3 for p in plot.points)
    assert len(result.layers) == TINY_LINEARS
    # The Results tab took over the job.
    assert window.tabs.currentWidget() is window.results_view
    assert len(window.results_view.plot.points) == TINY_LINEARS


def test_results_view_evaluates_before_after_and_saves_a_report(
        window: Any, qtbot: Any, tiny_llama_dir: Path, tmp_path: Path, dialogs: list) -> None:
    import json

    window.results_view.auto.setChecked(True)
    window.results_view.windows.setValue(2)
    window.results_view.seq_len.setValue(64)
    with qtbot.waitSignal(window.results_view.evaluated, timeout=180000) as blocker:
        _start_rtn(window, tiny_llama_dir, tmp_path / "tiny-rtn")
    assert dialogs == []
    ev = blocker.args[0]
    assert ev["perplexity_before"] > 1 and ev["perplexity_after"] > 1
    assert ev["kl_divergence"] is not None and ev["kl_divergence"] >= 0
    assert window.results_view.ppl_after.text() == f"{ev['perplexity_after']:.3f}"
    paths = window.results_view.save_report(tmp_path / "report")
    assert paths is not None
    doc = json.loads(paths["json"].read_text())
    assert len(doc["layers"]) == TINY_LINEARS
    assert doc["evaluation"]["perplexity_after"] == pytest.approx(ev["perplexity_after"])
    assert doc["settings"]["bits"] == 4 and doc["settings"]["group_size"] == 64
    assert paths["png"].stat().st_size > 1000
    assert "Quantscope report" in paths["html"].read_text()


def test_cancel_mid_run_leaves_no_output(window: Any, qtbot: Any, tiny_model_factory: Any, tmp_path: Path,
                                         gated_engine: Callable[[], bool]) -> None:
    model = tiny_model_factory(layers=6)
    out_parent = tmp_path / "outs"
    out_parent.mkdir()
    out = out_parent / "cancelled"
    q = window.quantize_view
    _start_rtn(window, model, out)
    qtbot.waitUntil(gated_engine, timeout=120000)
    assert q.cancel_button.isEnabled()
    (child,) = job_processes()
    assert child.pid != os.getpid()
    with qtbot.waitSignal(q.runner.cancelled, timeout=60000):
        q.cancel_button.click()
    assert not child.is_running() and job_processes() == []
    assert not out.exists()
    assert list(out_parent.iterdir()) == []  # no partial folder beside it either
    assert 1 <= len(q.plot.points) < 6 * 7
    assert "Cancelled" in q.stage.text()
    assert q.run_button.isEnabled() and not q.cancel_button.isEnabled()


def test_bad_input_found_in_the_job_process_shows_the_engines_own_message(
        window: Any, qtbot: Any, tiny_llama_dir: Path, tmp_path: Path, dialogs: list) -> None:
    from core.config import QuantJob, RTNConfig
    from core.engine import run_quantization

    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("not a model")
    with pytest.raises(ValueError) as in_process:
        run_quantization(QuantJob(tiny_llama_dir, out, RTNConfig(bits=4, group_size=64)))
    # The Quantize tab refuses an existing folder before Run; the engine's check still matters
    # when the folder appears after Run was pressed (the job process needs seconds to start).
    shutil.move(str(out), str(tmp_path / "aside"))
    q = window.quantize_view
    with qtbot.waitSignal(q.runner.failed, timeout=120000) as blocker:
        _start_rtn(window, tiny_llama_dir, out)
        shutil.move(str(tmp_path / "aside"), str(out))
    exc, tb = blocker.args
    assert type(exc) is ValueError and str(exc) == str(in_process.value)
    assert dialogs == [("Quantization failed", q.gui_words(str(in_process.value)))]
    assert "--overwrite" not in dialogs[0][1]
    assert "Traceback" in tb and "core/" in tb  # the job process's own traceback, for the details
    assert (out / "keep.txt").read_text() == "not a model" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert q.stage.text() == "Failed" and not q.run_button.isEnabled()  # the folder exists now
    assert "already exists" in q.run_blocked.text()
    assert job_processes() == []


def test_bad_folder_shows_an_error_dialog_not_a_traceback(window: Any, tmp_path: Path, dialogs: list) -> None:
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    assert window.open_model_folder(empty) is None
    assert len(dialogs) == 1
    title, text = dialogs[0]
    assert title == "Cannot open model"
    assert "config.json" in text and "Traceback" not in text
    assert window.state.model is None

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    assert window.open_model_folder(corrupt) is None
    assert "corrupt" in dialogs[1][1]


def test_unknown_catalog_id_shows_close_names(window: Any, dialogs: list) -> None:
    assert window.model_picker.open_catalog("lama-3.1-8b") is None
    assert dialogs and "catalog" in dialogs[0][1]


def test_catalog_model_plans_without_weights(window: Any) -> None:
    from app import backend

    model_id = next(i for i in backend.catalog_model_ids() if "8b" in i.lower())
    choice = window.model_picker.open_catalog(model_id)
    assert choice is not None and window.plan_view.table.rowCount() >= 5
    weights = {r["format"]: r["weights_gib"] for r in window.plan_view.rows}
    assert weights["bf16"] > 2.5 * weights["int4_g128"]


def test_closing_the_window_during_a_run_shuts_the_worker_down(
        window: Any, qtbot: Any, tiny_model_factory: Any, tmp_path: Path, gated_engine: Callable[[], bool]) -> None:
    model = tiny_model_factory(layers=6)
    out = tmp_path / "closed"
    q = window.quantize_view
    _start_rtn(window, model, out)
    qtbot.waitUntil(gated_engine, timeout=120000)
    thread = q.runner._thread
    assert thread is not None and thread.isRunning()
    assert len(job_processes()) == 1
    window.close()
    assert not q.runner.running
    assert thread.isFinished()
    assert job_processes() == []
    assert not out.exists()
    assert list(tmp_path.glob(".closed*")) == []


def test_theme_switch_restyles_the_app(window: Any) -> None:
    from PySide6.QtWidgets import QApplication

    window.apply_theme("dark")
    assert "#0d1117" in QApplication.instance().styleSheet()
    assert window.settings.theme() == "dark"
    window.apply_theme("light")
    assert "#0d1117" not in QApplication.instance().styleSheet()


def test_heatmap_axis_labels_every_module_type(window: Any, qtbot: Any, tiny_llama_dir: Path) -> None:
    """The last column's label ("down") is wider than half a column; pyqtgraph drops such a
    label at the axis end unless told not to."""
    from PySide6.QtGui import QImage, QPainter

    from app.views.inspect_view import HEAT_TYPES

    view = window.inspect_view
    window.resize(1440, 900)
    window.show()
    window.tabs.setCurrentWidget(view)
    with qtbot.waitSignal(view.overview_runner.finished, timeout=60000):
        window.open_model_folder(tiny_llama_dir)
    qtbot.wait(50)
    axis = view.heat.getPlotItem().getAxis("bottom")
    image = QImage(10, 10, QImage.Format.Format_ARGB32)
    painter = QPainter(image)
    try:
        specs = axis.generateDrawSpecs(painter)
    finally:
        painter.end()
    drawn = [text for _rect, _flags, text in specs[2]]
    assert drawn == list(HEAT_TYPES)


def test_inspector_shows_histogram_heatmap_and_activation_outliers(
        window: Any, qtbot: Any, tiny_llama_dir: Path) -> None:
    import numpy as np

    view = window.inspect_view
    with qtbot.waitSignal(view.overview_runner.finished, timeout=60000):
        window.open_model_folder(tiny_llama_dir)
    assert view.heat_matrix().shape == (2, 7)
    assert np.isfinite(view.heat_matrix()).all()
    assert view.select_linear(1, "down")
    with qtbot.waitSignal(view.detail_ready, timeout=60000) as blocker:
        pass
    d = blocker.args[0]
    assert d["name"] == "model.layers.1.mlp.down_proj"
    assert d["shape"] == [128, 256]
    assert int(np.sum(d["hist_counts"])) == 128 * 256  # every weight lands in a bin
    assert len(d["w_in_absmax"]) == 256
    view.threshold.setValue(0.1)  # low enough that a random tiny model has outlier channels
    with qtbot.waitSignal(view.detail_ready, timeout=120000) as blocker:
        view.calibrate.setChecked(True)
    d = blocker.args[0]
    a = np.asarray(d["a_absmax"])
    assert a.shape == (256,) and (a > 0).all()
    assert d["threshold"] == pytest.approx(0.1)
    expected = [int(i) for i in np.nonzero(a >= np.float32(0.1))[0]]
    assert d["outlier_channels"] == expected and 0 < len(expected) < 256
    assert view.threshold_line.isVisible()


def test_error_axis_labels_a_narrow_log_band_with_plain_numbers(qtbot: Any) -> None:
    """Per-layer errors often sit inside one decade (0.11-0.15): the log axis must still carry
    readable labels, not none."""
    from app.views.layer_plot import _ErrorAxis

    axis = _ErrorAxis("left")
    axis.log_labels = True
    (_, narrow), = axis.tickValues(math.log10(0.113), math.log10(0.153), 500)
    assert axis.tickStrings(narrow, 1.0, 1.0) == ["0.12", "0.13", "0.14", "0.15"]
    (_, wide), = axis.tickValues(math.log10(0.005), math.log10(0.5), 500)
    assert axis.tickStrings(wide, 1.0, 1.0)[:3] == ["0.005", "0.01", "0.02"]
