"""Events emitted by long-running core work, the sink protocol and cooperative cancellation.

Sinks are plain callables that run on the worker thread; they forward events (to a Qt signal,
a progress bar, a JSON report) and never block or touch widgets.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class StageStarted:
    stage: str
    total: int = 0
    message: str = ""


@dataclass(frozen=True)
class Progress:
    stage: str
    done: int
    total: int
    message: str = ""


@dataclass(frozen=True)
class LayerDone:
    """One quantized linear module. `metrics` holds at least mse, rel_error, sqnr_db."""

    name: str
    index: int
    total: int
    metrics: dict[str, float]
    seconds: float


@dataclass(frozen=True)
class MemorySample:
    rss_gib: float
    gpu_gib: float | None = None


@dataclass(frozen=True)
class Log:
    level: str  # "debug" | "info" | "warning" | "error"
    message: str


@dataclass(frozen=True)
class Finished:
    result: Any = None


Event = StageStarted | Progress | LayerDone | MemorySample | Log | Finished
Sink = Callable[[Any], None]


def null_sink(event: Any) -> None:
    """Sink that drops everything."""


class Cancelled(Exception):
    """Raised inside core work when its CancelToken was cancelled."""


@dataclass
class CancelToken:
    _event: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by user")


def check_cancel(cancel: CancelToken | None) -> None:
    if cancel is not None:
        cancel.check()


class ThrottledSink:
    """Forwards every event but rate-limits `Progress` to `hz` per stage (the last one of a stage
    — done == total — always passes). Never drops LayerDone or anything else."""

    def __init__(self, sink: Sink, hz: float = 20.0) -> None:
        self._sink = sink
        self._interval = 1.0 / hz if hz > 0 else 0.0
        self._last: dict[str, float] = {}

    def __call__(self, event: Any) -> None:
        if isinstance(event, Progress) and event.done < event.total:
            now = time.monotonic()
            if now - self._last.get(event.stage, -1e9) < self._interval:
                return
            self._last[event.stage] = now
        self._sink(event)
