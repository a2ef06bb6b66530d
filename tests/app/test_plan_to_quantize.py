"""Plan → Quantize in one click: a Plan row the Quantize tab can write sets method, bits, group
size and zero point there and opens the tab; rows it cannot write say why (issue 17, workflow)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def _select(plan: Any, fmt: str) -> None:
    plan.table.selectRow([r["format"] for r in plan.rows].index(fmt))


def test_quantize_to_this_sets_up_the_quantize_tab(window: Any, tiny_llama_dir: Path) -> None:
    window.open_model_folder(tiny_llama_dir)
    plan, q = window.plan_view, window.quantize_view
    _select(plan, "int4_g128")
    assert plan.quantize_button.isEnabled()
    plan.quantize_button.click()
    assert window.tabs.currentWidget() is q
    assert q.method_key() == "gptq" and q.bits.value() == 4 and q.group_size.currentText() == "128"
    assert q.sym.currentData() is True

    window.tabs.setCurrentWidget(plan)
    _select(plan, "nf4")
    plan.quantize_button.click()
    assert q.method_key() == "nf4" and window.tabs.currentWidget() is q

    _select(plan, "fp8")
    plan.quantize_button.click()
    assert q.method_key() == "fp8"


def test_rows_the_quantize_tab_cannot_write_say_why(window: Any, tiny_llama_dir: Path) -> None:
    window.open_model_folder(tiny_llama_dir)
    plan = window.plan_view
    _select(plan, "bf16")
    assert not plan.quantize_button.isEnabled() and "not written by the Quantize tab" in plan.quantize_button.toolTip()
    window.model_picker.open_catalog("qwen3-8b")  # config only: nothing to quantize
    _select(plan, "int4_g128")
    assert not plan.quantize_button.isEnabled() and "with weights" in plan.quantize_button.toolTip()
