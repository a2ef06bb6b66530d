"""Make a real interrupted quantization: a `python -m core quantize` subprocess slowed down
between layers and SIGKILLed (nothing can clean up) once enough layers are journaled, or an
in-process run that dies from its event sink once the background writer has journaled them."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from core.events import LayerDone
from core.output import JOURNAL_FILE, OutputWriter, partial_dir

ROOT = Path(__file__).resolve().parents[1]


def journaled_layers(out: Path) -> int:
    try:
        return len(json.loads((partial_dir(out) / JOURNAL_FILE).read_text())["layers"])
    except (OSError, ValueError, KeyError):
        return 0


def kill_after_layers(args: list[str], out: Path, layers: int, *, delay: float = 0.5,
                      timeout: float = 120.0) -> None:
    """Run `python -m core <args>` with a `delay`-second pause after each layer and SIGKILL it once
    `layers` layers are journaled; asserts it really died by the signal and wrote no output."""
    env = dict(os.environ, QUANTSCOPE_TEST_LAYER_DELAY=str(delay), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "core", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while journaled_layers(out) < layers:
            if proc.poll() is not None:
                pytest.fail(f"quantize exited ({proc.returncode}) before {layers} layers: "
                            f"{proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {layers} journaled layers within {timeout} s")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()


class Crash(Exception):
    """Stands in for the process dying: raised from the event sink of an in-process run."""


@contextlib.contextmanager
def crash_once_journaled(layers: int, linears_per_layer: int,
                         timeout: float = 120.0) -> Iterator[Callable[[Any], None]]:
    """Patch OutputWriter for an in-process crash and yield a hook to call with every event: at the
    first LayerDone of layer `layers` it waits until the writer thread has journaled layers
    0 … layers−1, then raises Crash.

    Layer k's shard and journal entry are written on the background writer while layer k+1 is
    quantized, so its first LayerDone says nothing about the journal: on a loaded machine the
    writer still holds layer k then. Waiting for `record_layer` itself makes the crash point
    exact whatever the timing. The run's temporary folder is kept, as a killed process leaves it,
    after the writes already queued have finished (otherwise a thread of the dead run could still
    be writing into the folder the resumed run takes over)."""
    journaled: set[int] = set()
    failed: list[BaseException] = []
    changed = threading.Condition()
    record_layer = OutputWriter.record_layer
    seen = {"layer_done": 0}

    def recording(writer: OutputWriter, index: int, *args: Any, **kwargs: Any) -> None:
        try:
            record_layer(writer, index, *args, **kwargs)
        except BaseException as exc:
            with changed:
                failed.append(exc)
                changed.notify_all()
            raise
        with changed:
            journaled.add(index)
            changed.notify_all()

    def keep_partial(writer: OutputWriter) -> None:
        with contextlib.suppress(Exception):  # the crash is what is being reported
            writer.flush()

    def hook(event: Any) -> None:
        if not isinstance(event, LayerDone):
            return
        seen["layer_done"] += 1
        if seen["layer_done"] != layers * linears_per_layer + 1:
            return
        with changed:
            ok = changed.wait_for(lambda: failed or journaled >= set(range(layers)), timeout)
        if failed:
            pytest.fail(f"journaling failed before the crash point: {failed[0]!r}")
        if not ok:
            pytest.fail(f"layers 0-{layers - 1} were not journaled within {timeout} s (journaled: {sorted(journaled)})")
        raise Crash

    with pytest.MonkeyPatch.context() as m:
        m.setattr(OutputWriter, "record_layer", recording)
        m.setattr(OutputWriter, "abort", keep_partial)
        yield hook
