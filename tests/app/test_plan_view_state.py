"""The Plan tab's offload panel and slider follow every change of model, GPU, context and engine,
not only a click on another row (issue 17, bug 1)."""
from __future__ import annotations

from typing import Any

from core import catalog


def _usable(gpu_id: str) -> str:
    """The capacity the panel must quote: what CUDA reports for the card (the catalog's usable_gib)."""
    return f"of {catalog.get_gpu(gpu_id).usable_memory_gib:.1f} GiB usable"


def _panel(window: Any) -> tuple[str, int]:
    p = window.plan_view
    return p.offload_text.text(), p.slider.maximum()


def test_offload_panel_follows_gpu_model_context_and_custom_size(window: Any) -> None:
    p = window.plan_view
    window.model_picker.open_catalog("smollm2-135m")
    window.gpu_picker.select("rtx-4090")
    assert p.selected_format() is not None
    assert _usable("rtx-4090") in p.offload_text.text()
    assert p.slider.maximum() == 30

    window.gpu_picker.select("h20")  # a 96 GB card: its own figure, not the 4090's
    assert _usable("h20") in p.offload_text.text()
    assert _usable("h20") != _usable("rtx-4090")

    window.model_picker.open_catalog("qwen3-8b")
    assert p.slider.maximum() == 36
    assert p.offload_format.text() == next(r.get("label") or r["format"] for r in p.rows
                                           if r["format"] == p.selected_format())

    before = p.offload_text.text()
    p.context.setValue(131072)
    assert p.offload_text.text() != before

    combo = window.gpu_picker.combo
    combo.setCurrentIndex(combo.findData("__custom__"))
    window.gpu_picker.custom_memory.setValue(40)
    assert "of 40.0 GiB usable" in p.offload_text.text()


def test_no_decode_speed_for_a_split_that_does_not_fit(window: Any) -> None:
    p = window.plan_view
    window.gpu_picker.select("rtx-4090")
    window.model_picker.open_catalog("deepseek-r1")
    assert p.slider.maximum() == 61
    p.slider.setValue(p.slider.maximum())  # everything on a 24 GiB card: hundreds of GiB short
    text = p.offload_text.text()
    assert "short" in text
    assert "Decode ≈" not in text


def _last_column_right_edge(table: Any) -> int:
    header = table.horizontalHeader()
    last = header.count() - 1
    return header.sectionViewportPosition(last) + header.sectionSize(last)


def test_chart_draws_the_selected_rows_split_and_names_formats_like_the_table(window: Any) -> None:
    p = window.plan_view
    window.gpu_picker.select("rtx-4090")
    window.model_picker.open_catalog("qwen3-8b")
    p.table.selectRow(0)  # BF16: 16 GiB of weights
    labels = [p.table.item(r, 0).text().replace("⚠", "").strip() for r in range(p.table.rowCount())]
    ticks = [t.replace("\n", " ") for _x, t in p.chart.getPlotItem().getAxis("bottom")._tickLevels[0]]
    assert ticks == labels

    assert p.split_shown is not None and p.split_shown[0] == p.rows[0]["format"]
    p.slider.setValue(10)
    fmt, on_gpu, on_cpu = p.split_shown
    assert fmt == p.rows[0]["format"] and on_cpu > 0
    x_gpu = list(p.split_gpu.opts["x"])
    assert x_gpu == [0] and list(p.split_gpu.opts["height"]) == [on_gpu]
    assert list(p.split_cpu.opts["y0"]) == [on_gpu] and list(p.split_cpu.opts["height"]) == [on_cpu]
    p.slider.setValue(20)
    assert p.split_shown[2] < on_cpu  # more layers on the GPU, less left in CPU RAM

    p.table.selectRow(3)
    assert list(p.split_gpu.opts["x"]) == [3] and list(p.selection_frame.opts["x"]) == [3]


def test_legend_does_not_cover_the_gpu_line_label(window: Any) -> None:
    p = window.plan_view
    window.gpu_picker.select("rtx-4090")
    window.model_picker.open_catalog("qwen3-8b")  # BF16 total near 24 GiB: line near the top
    legend = p.chart.getPlotItem().legend
    if legend is not None and legend.isVisible():
        assert not legend.sceneBoundingRect().intersects(p.gpu_line.label.sceneBoundingRect())
    assert "Weights" in p.legend.text() and "CPU RAM" in p.legend.text()


def test_every_plan_column_is_visible_at_the_default_window_width(window: Any) -> None:
    window.resize(1360, 860)
    window.gpu_picker.select("h20")
    for model in ("smollm2-135m", "deepseek-r1", "qwen3-235b-a22b"):
        window.model_picker.open_catalog(model)
        table = window.plan_view.table
        assert _last_column_right_edge(table) <= table.viewport().width(), model
