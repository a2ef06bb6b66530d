"""The selection every view follows: which model, which GPU, how many of them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Signal


@dataclass(frozen=True)
class ModelChoice:
    """A model the user picked. `source` is what core returned: a `core.model_io.ModelSource`
    for a folder, or a catalog entry for a model that is not downloaded."""

    label: str
    source: Any
    path: Path | None = None  # None for catalog entries

    @property
    def is_local(self) -> bool:
        return self.path is not None

    @property
    def has_weights(self) -> bool:
        return bool(getattr(self.source, "has_weights", False))

    @property
    def is_quantized(self) -> bool:
        return bool(getattr(self.source, "quantization_config", None))


class AppState(QObject):
    model_changed = Signal(object)  # ModelChoice | None
    gpu_changed = Signal()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._model: ModelChoice | None = None
        self._gpu: Any = None
        self._num_gpus = 1

    @property
    def model(self) -> ModelChoice | None:
        return self._model

    def set_model(self, choice: ModelChoice | None) -> None:
        self._model = choice
        self.model_changed.emit(choice)

    @property
    def gpu(self) -> Any:
        return self._gpu

    @property
    def num_gpus(self) -> int:
        return self._num_gpus

    def set_gpu(self, gpu: Any, num_gpus: int = 1) -> None:
        if gpu is self._gpu and num_gpus == self._num_gpus:
            return
        self._gpu = gpu
        self._num_gpus = max(1, int(num_gpus))
        self.gpu_changed.emit()
