"""Make a real interrupted quantization: a `python -m core quantize` subprocess slowed down
between layers and SIGKILLed (nothing can clean up) once enough layers are journaled."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.output import JOURNAL_FILE, partial_dir

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
