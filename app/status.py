"""Status bar: system RAM, this process's memory and GPU memory, refreshed by a timer."""
from __future__ import annotations

import os

import psutil
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QLabel, QProgressBar, QStatusBar, QWidget

from app import backend
from app.views.live_text import LiveText

GIB = 1024 ** 3


class MemoryStatusBar(QStatusBar):
    def __init__(self, parent: QWidget | None = None, interval_ms: int = 2000) -> None:
        super().__init__(parent)
        # A plain QLabel asks for its whole text's width, and the status bar passes that up: one
        # long message (an error with a path) widened the window for good. LiveText keeps a fixed
        # size hint and elides; the whole text is its tooltip.
        self.message = LiveText("Ready", sample="Opened a model folder")
        self.ram = QLabel()
        self.proc = QLabel()
        self.gpu = QLabel()
        self.ram.setToolTip("System RAM in use / total (psutil)")
        self.proc.setToolTip("Resident memory of Quantscope itself")
        self.gpu.setToolTip("GPU memory in use / total")
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(180)
        self.progress.setVisible(False)
        self.addWidget(self.message, 1)
        self.addPermanentWidget(self.progress)
        for w in (self.proc, self.ram, self.gpu):
            self.addPermanentWidget(w)
        self._process = psutil.Process(os.getpid())
        self.timer = QTimer(self)
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self.refresh)
        self.timer.start()
        self.refresh()

    def show_message(self, text: str) -> None:
        # One line: a status bar that grows a second line pushes the tabs up.
        self.message.setText("  ".join(line.strip() for line in text.splitlines()))

    def show_progress(self, done: int, total: int) -> None:
        """total == 0 shows a busy indicator."""
        self.progress.setRange(0, max(total, 0))
        if total:
            self.progress.setValue(done)
        self.progress.setVisible(True)

    def hide_progress(self) -> None:
        self.progress.setVisible(False)

    def refresh(self) -> None:
        vm = psutil.virtual_memory()
        self.ram.setText(f"RAM {(vm.total - vm.available) / GIB:.1f} / {vm.total / GIB:.1f} GiB")
        self.proc.setText(f"App {self._process.memory_info().rss / GIB:.2f} GiB")
        gpus = backend.gpu_memory()
        if not gpus:
            self.gpu.setText("GPU: none detected")
        else:
            self.gpu.setText("  ".join(f"GPU{i} {used:.1f} / {total:.1f} GiB" for i, (used, total) in enumerate(gpus)))
