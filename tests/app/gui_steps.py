"""Steps the GUI tests share: driving the Quantize view the way a user would."""
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
