"""Inspect: the outlier text follows the threshold, says how many channels it leaves out,
activations have their own axis, and the selected linear is outlined on the heatmap
(issue 17, bug 6)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(300)


def _detail(channels: int = 128) -> dict[str, Any]:
    a = np.linspace(0.0, 100.0, channels)  # activations: up to 100
    w = np.full(channels, 0.05)  # weights: tiny next to them
    return {
        "name": "model.layers.1.self_attn.k_proj", "shape": [64, channels],
        "hist_counts": np.ones(10), "hist_edges": np.linspace(-1, 1, 11),
        "w_in_absmax": w, "w_out_absmax": w, "threshold": 6.0, "alpha": 0.5,
        "kurtosis": 3.0, "absmax": 0.05, "std": 0.01, "absmax_over_std": 5.0, "frac_beyond_6sigma": 0.0,
        "a_absmax": a, "outlier_channels": [int(i) for i in np.flatnonzero(a >= 6.0)],
        "smooth_top": [(127, 3.0)],
    }


def test_threshold_change_updates_the_outlier_text_and_lists_what_it_leaves_out(window: Any) -> None:
    inspect = window.inspect_view
    inspect.threshold.setValue(6.0)
    inspect._detail_done(_detail())
    a = _detail()["a_absmax"]
    text = inspect.smooth.text()
    assert f"{int((a >= 6).sum())} channels ≥ threshold 6" in text
    assert "more" in text and "tooltip" in text  # 120 channels: the list says it is cut
    assert inspect.smooth.toolTip().startswith(f"All {int((a >= 6).sum())} channels") and "127" in inspect.smooth.toolTip()

    inspect.threshold.setValue(90.0)
    text = inspect.smooth.text()
    assert f"{int((a >= 90).sum())} channels ≥ threshold 90" in text and "threshold 6 " not in text
    assert inspect.threshold_line.value() == 90.0


def test_weights_and_activations_have_separate_axes(window: Any) -> None:
    inspect = window.inspect_view
    inspect._detail_done(_detail())
    assert inspect.a_curve.getViewBox() is not inspect.w_curve.getViewBox()
    assert inspect.threshold_line.getViewBox() is inspect.a_curve.getViewBox()
    assert inspect.channels.getPlotItem().getAxis("right").isVisible()


def test_selected_linear_is_outlined_on_the_heatmap(window: Any, qtbot: Any, tiny_llama_dir: Path) -> None:
    inspect = window.inspect_view
    with qtbot.waitSignal(inspect.overview_runner.finished, timeout=60000):
        window.open_model_folder(tiny_llama_dir)
    assert inspect.select_linear(1, "k")
    assert inspect.marked_cell == (1, 1)
    x, y = inspect.heat_marker.getData()
    assert (min(x), max(x), min(y), max(y)) == (1, 2, 1, 2)
    assert inspect.select_linear(0, "down")
    assert inspect.marked_cell == (0, 6)
