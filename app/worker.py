"""Runs one core function at a time on a QThread and relays its events to the UI thread.

The work is a plain module-level function `fn(*, sink, cancel, **kwargs)`; the `sink` it gets
emits a Qt signal from the worker thread, which Qt delivers to the UI thread as a queued call.
Starting a new task cancels the one in flight (Orange3's rule), and `shutdown()` cancels and
waits, so closing a window never leaves a thread running.
"""
from __future__ import annotations

import logging
import traceback
from typing import Any, Callable

from PySide6.QtCore import QObject, Qt, QThread, Signal, Slot

from core.events import CancelToken, Cancelled, ThrottledSink

log = logging.getLogger(__name__)


class _Worker(QObject):
    """Lives on the worker thread; only forwards. Never touches widgets."""

    event = Signal(object)
    done = Signal(object)
    failed = Signal(object, str)
    cancelled = Signal()

    def __init__(self, fn: Callable[..., Any], kwargs: dict[str, Any], cancel: CancelToken,
                 throttle_hz: float) -> None:
        super().__init__()
        self._fn = fn
        self._kwargs = kwargs
        self._cancel = cancel
        self._throttle_hz = throttle_hz

    @Slot()
    def run(self) -> None:
        sink: Callable[[Any], None] = self.event.emit
        if self._throttle_hz > 0:
            sink = ThrottledSink(sink, hz=self._throttle_hz)
        try:
            result = self._fn(sink=sink, cancel=self._cancel, **self._kwargs)
        except Cancelled:
            self.cancelled.emit()
        except BaseException as exc:  # noqa: BLE001 - any failure must reach the UI, not kill the thread
            self.failed.emit(exc, traceback.format_exc())
        else:
            if self._cancel.cancelled:
                self.cancelled.emit()
            else:
                self.done.emit(result)


class TaskRunner(QObject):
    """Owner of at most one running task, living on the UI thread.

    Signals (all delivered on the UI thread):
        started(): a task began.
        event(object): one core event (StageStarted, Progress, LayerDone, Log, …).
        finished(object): the function's return value.
        failed(object, str): the exception and its formatted traceback (for a details pane).
        cancelled(): the task stopped because it was cancelled.
        running_changed(bool)
    """

    started = Signal()
    event = Signal(object)
    finished = Signal(object)
    failed = Signal(object, str)
    cancelled = Signal()
    running_changed = Signal(bool)

    def __init__(self, parent: QObject | None = None, *, throttle_hz: float = 20.0) -> None:
        super().__init__(parent)
        self._throttle_hz = throttle_hz
        self._thread: QThread | None = None
        self._worker: _Worker | None = None
        self._cancel: CancelToken | None = None
        # Threads of superseded tasks, kept referenced until they end so Qt does not destroy a
        # running QThread.
        self._retired: list[tuple[QThread, _Worker]] = []

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self, fn: Callable[..., Any], **kwargs: Any) -> None:
        if self._thread is not None:
            self._retire()
        cancel = CancelToken()
        thread = QThread()
        thread.setObjectName(f"quantscope-{getattr(fn, '__name__', 'task')}")
        worker = _Worker(fn, kwargs, cancel, self._throttle_hz)
        worker.moveToThread(thread)
        thread.started.connect(worker.run)
        # Explicitly queued: the worker emits from its own thread, these slots run on ours.
        worker.event.connect(self._on_event, Qt.ConnectionType.QueuedConnection)
        worker.done.connect(self._on_done, Qt.ConnectionType.QueuedConnection)
        worker.failed.connect(self._on_failed, Qt.ConnectionType.QueuedConnection)
        worker.cancelled.connect(self._on_cancelled, Qt.ConnectionType.QueuedConnection)
        # Direct: QThread.quit is thread-safe, and a queued quit would wait for the UI thread,
        # which may itself be waiting for this thread to end.
        for sig in (worker.done, worker.failed, worker.cancelled):
            sig.connect(thread.quit, Qt.ConnectionType.DirectConnection)
        self._thread, self._worker, self._cancel = thread, worker, cancel
        thread.start()
        self.started.emit()
        self.running_changed.emit(True)

    def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()

    def shutdown(self, timeout_ms: int = 30000) -> bool:
        """Cancel everything and wait for the threads to end. True when all ended in time."""
        if self._thread is not None:
            self._retire()
        ok = True
        for thread, _worker in self._retired:
            thread.quit()
            ok = thread.wait(timeout_ms) and ok
        self._retired = [(t, w) for t, w in self._retired if t.isRunning()]
        return ok

    def _retire(self) -> None:
        """Cancel the current task and stop listening to it."""
        if self._thread is None or self._worker is None or self._cancel is None:
            return
        self._cancel.cancel()
        for sig in (self._worker.event, self._worker.done, self._worker.failed, self._worker.cancelled):
            try:
                sig.disconnect()
            except (RuntimeError, TypeError):
                pass
        thread, worker = self._thread, self._worker
        thread.quit()  # takes effect once the function returns
        self._retired.append((thread, worker))
        thread.finished.connect(self._reap)
        self._thread = self._worker = self._cancel = None
        self.running_changed.emit(False)

    @Slot()
    def _reap(self) -> None:
        self._retired = [(t, w) for t, w in self._retired if not t.isFinished()]

    def _end(self) -> None:
        thread = self._thread
        self._thread = self._worker = self._cancel = None
        if thread is not None:
            thread.quit()
            thread.wait()  # the function has returned; the thread only has to unwind
        self.running_changed.emit(False)

    @Slot(object)
    def _on_event(self, event: Any) -> None:
        self.event.emit(event)

    @Slot(object)
    def _on_done(self, result: Any) -> None:
        self._end()
        self.finished.emit(result)

    @Slot(object, str)
    def _on_failed(self, exc: BaseException, tb: str) -> None:
        log.debug("task failed:\n%s", tb)
        self._end()
        self.failed.emit(exc, tb)

    @Slot()
    def _on_cancelled(self) -> None:
        self._end()
        self.cancelled.emit()
