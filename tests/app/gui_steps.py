"""Steps the GUI tests share: driving the Quantize view the way a user would, and looking at the
job processes it starts. Importable without Qt: job processes import it too."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def start_rtn(window: Any, model: Path, out: Path, *, group_size: int) -> None:
    """Open `model`, choose 4-bit RTN with `group_size`, set the output folder and press Run."""
    window.open_model_folder(model)
    q = window.quantize_view
    q.set_method("rtn")
    q.bits.setValue(4)
    q.group_size.setCurrentText(str(group_size))
    q.out_dir.setText(str(out))
    assert q.run(), "run() refused to start"


def job_processes() -> list[Any]:
    """This test process's live job processes (app.jobproc children; not multiprocessing's own
    resource tracker)."""
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def gated_quantization(*, job: Any, sink: Any, cancel: Any) -> Any:
    """Runs in the job process instead of `app.backend.quantize_here`: the real engine, held after
    its first LayerDone until the job is cancelled, so "mid-run" is certain however fast the
    machine is."""
    import time

    from app.backend import quantize_here
    from core.events import LayerDone

    held: list[bool] = []

    def relay(ev: object) -> None:
        sink(ev)
        if isinstance(ev, LayerDone) and not held:
            held.append(True)
            while not cancel.cancelled:
                time.sleep(0.005)

    return quantize_here(job=job, sink=relay, cancel=cancel)
