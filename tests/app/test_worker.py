"""TaskRunner: core functions on a QThread, events relayed in order to the UI thread."""
from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from core.events import CancelToken, LayerDone, Log, Progress

pytestmark = pytest.mark.timeout(60)


def _emit_layers(*, n: int, sink: Any, cancel: CancelToken) -> dict:
    for i in range(n):
        cancel.check()
        sink(LayerDone(f"model.layers.{i}.mlp.up_proj", i, n, {"mse": 1.0, "rel_error": 0.1, "sqnr_db": 20.0}, 0.0))
    return {"thread": threading.current_thread().name, "n": n}


def _wait_for_cancel(*, started: threading.Event, sink: Any, cancel: CancelToken) -> None:
    started.set()
    while True:
        cancel.check()
        time.sleep(0.005)


def _boom(*, sink: Any, cancel: CancelToken) -> None:
    sink(Log("info", "about to fail"))
    raise RuntimeError("disk on fire")


def test_events_arrive_in_order_on_the_ui_thread_and_result_comes_last(qtbot: Any) -> None:
    from app.worker import TaskRunner

    runner = TaskRunner(throttle_hz=20)
    seen: list[tuple[str, int, bool]] = []
    runner.event.connect(lambda ev: seen.append(("event", ev.index, threading.current_thread() is threading.main_thread())))
    with qtbot.waitSignal(runner.finished, timeout=10000) as blocker:
        runner.start(_emit_layers, n=50)
    # Every LayerDone survives throttling, in order, delivered on the main thread.
    assert [s[1] for s in seen] == list(range(50))
    assert all(s[2] for s in seen)
    assert blocker.args[0]["n"] == 50
    assert blocker.args[0]["thread"] != threading.main_thread().name
    assert not runner.running


def test_progress_is_throttled_but_final_progress_arrives(qtbot: Any) -> None:
    from app.worker import TaskRunner

    def spam(*, sink: Any, cancel: CancelToken) -> None:
        for i in range(1, 2001):
            sink(Progress("quantize", i, 2000))

    runner = TaskRunner(throttle_hz=20)
    got: list[Progress] = []
    runner.event.connect(got.append)
    with qtbot.waitSignal(runner.finished, timeout=10000):
        runner.start(spam)
    assert 1 <= len(got) < 200
    assert got[-1].done == 2000


def test_cancel_stops_the_task_and_reports_cancelled(qtbot: Any) -> None:
    from app.worker import TaskRunner

    runner = TaskRunner()
    started = threading.Event()
    with qtbot.waitSignal(runner.cancelled, timeout=10000):
        runner.start(_wait_for_cancel, started=started)
        assert started.wait(5)
        runner.cancel()
    assert not runner.running


def test_starting_a_new_task_cancels_the_old_one(qtbot: Any) -> None:
    from app.worker import TaskRunner

    runner = TaskRunner()
    started = threading.Event()
    old_results: list[Any] = []
    runner.start(_wait_for_cancel, started=started)
    assert started.wait(5)
    runner.cancelled.connect(lambda: old_results.append("cancelled"))
    with qtbot.waitSignal(runner.finished, timeout=10000) as blocker:
        runner.start(_emit_layers, n=3)
    assert blocker.args[0]["n"] == 3
    # The superseded task was cancelled and its signals disconnected: no stray "cancelled".
    assert old_results == []
    assert runner.shutdown(5000)


def test_failure_reaches_the_ui_with_message_and_traceback(qtbot: Any) -> None:
    from app.worker import TaskRunner

    runner = TaskRunner()
    with qtbot.waitSignal(runner.failed, timeout=10000) as blocker:
        runner.start(_boom)
    exc, tb = blocker.args
    assert isinstance(exc, RuntimeError) and str(exc) == "disk on fire"
    assert "Traceback" in tb and "_boom" in tb
    assert not runner.running
