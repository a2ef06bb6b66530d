"""Opening a quantized output folder: Plan gives bits per *weight* (not per packed int32), GiB
without an SI factor; the sidebar names the quantization; Inspect shows the dequantized weights
and nothing of the previous model (issue 17, bug 5)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def gptq_folder(tiny_model_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPTQ-layout output of a tiny model (RTN weights written in the GPTQ layout: the layout,
    not the algorithm, is what these views read)."""
    from core.config import QuantJob, RTNConfig
    from core.engine import run_quantization

    model = tiny_model_factory(hidden_size=128, intermediate_size=256)
    out = tmp_path_factory.mktemp("q") / "tiny-gptq"
    job = QuantJob(model=model, method=RTNConfig(bits=4, group_size=64), out=out, export="gptq")
    run_quantization(job)
    return out


def test_plan_and_sidebar_of_a_quantized_folder(window: Any, gptq_folder: Path) -> None:
    window.gpu_picker.select("rtx-4090")
    window.open_model_folder(gptq_folder)
    p = window.plan_view
    assert len(p.rows) == 1
    bpw = p.rows[0]["bits_per_weight"]
    assert 4.0 < bpw < 16.0, bpw  # 4-bit linears, fp32/16-bit embeddings, scales and zeros
    assert not p.chart.getPlotItem().getAxis("left").autoSIPrefix
    assert "bits per weight" in p.table.item(0, 1).toolTip()

    facts = window.model_picker.facts
    info = {}
    for r in range(facts.rowCount()):
        label = facts.itemAt(r, facts.ItemRole.LabelRole)
        field = facts.itemAt(r, facts.ItemRole.FieldRole)
        if label is not None and field is not None:
            info[label.widget().text()] = field.widget().text()
    assert info["Quantized"] == "GPTQ 4-bit, group 64, symmetric"
    assert "Stored values" not in info and info["Parameters"].endswith("(from config.json)")


def test_inspect_shows_dequantized_weights_and_clears_the_previous_model(
        window: Any, qtbot: Any, tiny_llama_dir: Path, gptq_folder: Path) -> None:
    inspect = window.inspect_view
    window.open_model_folder(tiny_llama_dir)
    with qtbot.waitSignal(inspect.detail_ready, timeout=60000):
        pass
    assert inspect.w_curve.getData()[0] is not None and len(inspect.w_curve.getData()[0])
    with qtbot.waitSignal(inspect.overview_runner.finished, timeout=60000):
        window.open_model_folder(gptq_folder)
        x, _y = inspect.w_curve.getData()
        assert x is None or len(x) == 0  # the previous model's curve is gone at once
        assert inspect.stats.text() == ""
    assert inspect.linears.count() == 2 * 7
    grid = inspect.heat_matrix()
    assert grid.shape == (2, 7) and (grid == grid).all()  # every cell measured (no NaN)
    assert "dequantized" in inspect.heat.getPlotItem().titleLabel.text
