"""Progress bars say how far the whole job is: GPTQ's per-column steps stay inside the current
linear, evaluation is one bar over both models with an ETA, and "Done in" names its clock
(issue 17, bug 3)."""
from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from core.events import LayerDone, Progress, StageStarted


def _fraction(bar: Any) -> float:
    return bar.value() / bar.maximum() if bar.maximum() else 0.0


def test_gptq_column_progress_never_shows_the_bar_full_mid_run(window: Any) -> None:
    q = window.quantize_view
    q._t0 = time.monotonic() - 5.0
    q._on_event(StageStarted("quantize", total=210, message="30 decoder layers"))
    q._on_event(Progress("quantize", 0, 210))
    for i in range(63):
        q._on_event(LayerDone(f"model.layers.{i // 7}.x", i, 210, {"mse": 0.0}, 0.01))
    q._flush_status()
    after_layers = _fraction(q.progress)
    assert abs(after_layers - 63 / 210) < 1e-3

    seen = []
    for cols in (128, 256, 384, 512, 576):
        q._on_event(Progress("gptq", cols, 576, "model.layers.9.mlp.down_proj"))
        q._flush_status()
        seen.append(_fraction(q.progress))
        assert q.stage.text().startswith("quantize: linear 64/210")
        assert "gptq 576" not in q.stage.text() or cols == 576
    assert all(63 / 210 <= f < 64 / 210 for f in seen), seen
    assert seen == sorted(seen)
    assert "ETA" in q.eta.text()

    q._on_event(LayerDone("model.layers.9.mlp.down_proj", 63, 210, {"mse": 0.0}, 0.01))
    q._flush_status()
    assert abs(_fraction(q.progress) - 64 / 210) < 1e-3 and q.stage.text().startswith("quantize: linear 64/210")


def test_done_names_wall_time_and_engine_time(window: Any) -> None:
    q = window.quantize_view
    q._t0 = time.monotonic() - 9.0
    result = SimpleNamespace(seconds=2.0, output="/tmp/out", peak_rss_gib=0.5, method="gptq", export="gptq",
                             source_gib=0.0, output_gib=0.0)
    q._on_finished(result)
    assert q.stage.text().startswith("Done in 9 s (engine 2 s)")
    assert "wall time" in q.stage.toolTip()


def test_evaluation_is_one_bar_over_both_models_with_an_eta(window: Any) -> None:
    from app import backend

    r = window.results_view
    r._eval_t0 = time.monotonic() - 4.0
    r._eval_pass = -1
    fractions = []

    def pass_events(name: str) -> None:
        r._on_event(StageStarted(backend.COMPARE_STAGE, total=2, message=name))
        fractions.append(_fraction(r.eval_progress))
        r._on_event(StageStarted("load", message=f"loading /x/{name}"))
        assert "loading" in r.eval_progress.format() and "100%" not in r.eval_progress.text()
        fractions.append(_fraction(r.eval_progress))
        r._on_event(StageStarted("evaluate", total=4, message="4 windows of 256 tokens"))
        for done in range(1, 5):
            r._on_event(Progress("evaluate", done, 4, f"window {done}/4"))
            fractions.append(_fraction(r.eval_progress))
            assert "ETA" in r.eval_progress.format()

    pass_events("original tiny")
    assert abs(fractions[-1] - 0.5) < 1e-3
    pass_events("quantized tiny-rtn")
    assert fractions == sorted(fractions), fractions  # never restarts at 0
    assert abs(fractions[-1] - 1.0) < 1e-3
    assert "quantized tiny-rtn (2 of 2)" in r.eval_progress.format()
