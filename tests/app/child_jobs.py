"""Worker functions that app.jobproc tests run in a job process (importable without Qt)."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from core.events import LayerDone, Log


def noisy_layers(*, n: int, sink: Any, cancel: Any) -> dict[str, Any]:
    """Prints to stdout and stderr at the Python and the file-descriptor level between events."""
    for i in range(n):
        print(f"stdout noise {i} \x00\x80 ('event', 'fake')", flush=True)
        os.write(1, b"raw fd-1 noise\n")
        print(f"stderr noise {i}", file=sys.stderr, flush=True)
        os.write(2, b"raw fd-2 noise\n")
        sink(LayerDone(f"model.layers.{i}.mlp.up_proj", i, n, {"mse": 1.0, "rel_error": 0.1, "sqnr_db": 20.0}, 0.0))
    return {"pid": os.getpid(), "n": n}


def fail_with(*, kind: str, message: str, sink: Any, cancel: Any) -> None:
    sink(Log("info", "about to fail"))
    if kind == "value":
        raise ValueError(message)
    if kind == "unpicklable":
        raise _Unpicklable(message, lambda: None)
    raise RuntimeError(message)


class _Unpicklable(Exception):
    def __init__(self, message: str, callback: Any) -> None:
        super().__init__(message)
        self.callback = callback

    def __reduce__(self) -> Any:
        raise TypeError("not picklable")


def wait_for_cancel(*, ready: str, sink: Any, cancel: Any) -> None:
    """Cooperative: stops at the next check once cancelled."""
    Path(ready).write_text(str(os.getpid()))
    while True:
        cancel.check()
        time.sleep(0.01)


def ignore_cancel(*, ready: str, partial: str, sink: Any, cancel: Any) -> None:
    """Writes a partial folder, then never looks at its cancel token again."""
    Path(partial).mkdir()
    (Path(partial) / "shard").write_text("half")
    Path(ready).write_text(str(os.getpid()))
    while True:
        time.sleep(0.05)


def die(*, sink: Any, cancel: Any) -> None:
    sink(Log("info", "going down"))
    os.kill(os.getpid(), signal.SIGKILL)


def niceness(*, sink: Any, cancel: Any) -> int:
    return os.nice(0)


class _NeedsTwo(Exception):
    """Pickles, but its class cannot be rebuilt from its args (a custom constructor)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")


def fail_needs_two(*, sink: Any, cancel: Any) -> None:
    raise _NeedsTwo("/models/x", "header is truncated")
