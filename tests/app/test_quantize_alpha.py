"""The Quantize view's SmoothQuant α control: a number, or "auto" (searched per layer)."""
from __future__ import annotations

from typing import Any

from core.config import SmoothQuantConfig


def test_alpha_auto_checkbox_builds_an_auto_config(window: Any) -> None:
    q = window.quantize_view
    q.method.setCurrentIndex(q.method.findData("smoothquant"))
    assert q.alpha_auto.isVisibleTo(q) and q.alpha.isVisibleTo(q)
    assert q.build_method_config() == SmoothQuantConfig(alpha=0.5)
    q.alpha_auto.setChecked(True)
    assert not q.alpha.isEnabled()  # the number does not apply while auto is on
    assert q.build_method_config() == SmoothQuantConfig(alpha="auto")
    q.alpha_auto.setChecked(False)
    q.alpha.setValue(0.75)
    assert q.build_method_config() == SmoothQuantConfig(alpha=0.75)
    q.method.setCurrentIndex(q.method.findData("rtn"))
    assert not q.alpha_auto.isVisibleTo(q)
