"""Where a job runs: Auto, the CPU or one of this machine's CUDA GPUs (`cuda:N`), as the engine's
`device` string (core.devices.resolve_device decides what "auto" means)."""
from __future__ import annotations

from PySide6.QtCore import Qt, Slot
from PySide6.QtWidgets import QComboBox, QWidget

from app import backend
from app.state import AppState

QUANTIZE_AUTO_TIP = ("Auto runs the job on the GPU with the most free memory when the planner's estimate of the "
                     "memory this job needs fits in it, else on the CPU.")
EVALUATE_AUTO_TIP = ("Auto runs both models on the GPU with the most free memory when there is one, else on "
                     "the CPU.")


class DevicePicker(QComboBox):
    """A device combo box. Until the user picks an entry it follows the GPU panel: the GPU chosen
    there when it is one detected on this machine, else Auto. A picked entry stays (and is what
    `saved_choice` returns for the settings)."""

    def __init__(self, state: AppState, *, what: str, auto_tip: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self._chosen = False
        for opt in backend.compute_devices():
            self.addItem(opt.label, opt.device)
            self.setItemData(self.count() - 1, opt.tooltip or opt.label, Qt.ItemDataRole.ToolTipRole)
        self.setToolTip(f"Where {what} runs. {auto_tip}\nUntil you choose, this follows the GPU panel: its GPU "
                        "when it is one of this machine's, else Auto.")
        # `activated` comes from the user only, not from the follow-the-panel updates below.
        self.activated.connect(self._on_activated)
        state.gpu_changed.connect(self.follow_gpu_panel)
        self.follow_gpu_panel()

    def device(self) -> str:
        """The engine's device string of the current entry ("auto", "cpu", "cuda:N")."""
        return str(self.currentData())

    def devices(self) -> list[str]:
        return [str(self.itemData(i)) for i in range(self.count())]

    def default_device(self) -> str:
        gpu = self.state.gpu
        index = getattr(gpu, "index", None)
        if getattr(gpu, "detected", False) and index is not None and self.findData(f"cuda:{index}") >= 0:
            return f"cuda:{index}"
        return "auto"

    @Slot()
    def follow_gpu_panel(self) -> None:
        if not self._chosen:
            self.setCurrentIndex(max(self.findData(self.default_device()), 0))

    def choose(self, device: str) -> bool:
        """Select `device` as the user's own choice; False when this machine does not offer it."""
        idx = self.findData(device)
        if idx < 0:
            return False
        self.setCurrentIndex(idx)
        self._chosen = True
        return True

    @property
    def chosen(self) -> bool:
        return self._chosen

    def saved_choice(self) -> str | None:
        """What the settings keep: the user's choice, or None while the picker follows the GPU panel."""
        return self.device() if self._chosen else None

    @Slot(int)
    def _on_activated(self, _index: int) -> None:
        self._chosen = True
