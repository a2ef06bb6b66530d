"""The Plan tab's offload panel and slider follow every change of model, GPU, context and engine,
not only a click on another row (issue 17, bug 1)."""
from __future__ import annotations

from typing import Any


def _panel(window: Any) -> tuple[str, int]:
    p = window.plan_view
    return p.offload_text.text(), p.slider.maximum()


def test_offload_panel_follows_gpu_model_context_and_custom_size(window: Any) -> None:
    p = window.plan_view
    window.model_picker.open_catalog("smollm2-135m")
    window.gpu_picker.select("rtx-4090")
    assert p.selected_format() is not None
    assert "of 24.0 GiB usable" in p.offload_text.text()
    assert p.slider.maximum() == 30

    window.gpu_picker.select("h20")  # 96 GiB card
    assert "of 96.0 GiB usable" in p.offload_text.text()

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
