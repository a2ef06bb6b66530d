"""Sidebar panel: which GPU to plan for (detected first, then the catalog, then a custom card),
how many of them, and the system RAM offloading can use."""
from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QStandardItemModel
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QLabel,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from app import backend
from app.state import AppState

CUSTOM = "__custom__"


class GpuPicker(QGroupBox):
    error = Signal(str, str)

    def __init__(self, state: AppState, parent: QWidget | None = None) -> None:
        super().__init__("GPU", parent)
        self.state = state
        self.combo = QComboBox()
        self.combo.setToolTip("Detected GPUs first (with free memory), then the catalog, then a custom card")
        self.combo.setMaxVisibleItems(25)
        self.combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.combo.setMinimumContentsLength(12)
        self.count = QSpinBox()
        self.count.setRange(1, 8)
        self.count.setToolTip("Number of identical GPUs (tensor parallel: memory adds up)")
        self.custom_memory = QDoubleSpinBox()
        self.custom_memory.setRange(1, 1024)
        self.custom_memory.setValue(24)
        self.custom_memory.setSuffix(" GiB")
        self.custom_memory.setDecimals(1)
        self.custom_bandwidth = QDoubleSpinBox()
        self.custom_bandwidth.setRange(10, 20000)
        self.custom_bandwidth.setValue(1000)
        self.custom_bandwidth.setSuffix(" GB/s")
        self.custom_bandwidth.setDecimals(0)
        self.details = QLabel()
        self.details.setObjectName("Muted")
        self.details.setWordWrap(True)
        self.ram = QLabel()
        self.ram.setToolTip("System RAM total / available now (CPU offload uses it)")

        form = QFormLayout()
        form.addRow("Number", self.count)
        self.custom_memory_label = QLabel("Memory")
        self.custom_bandwidth_label = QLabel("Bandwidth")
        form.addRow(self.custom_memory_label, self.custom_memory)
        form.addRow(self.custom_bandwidth_label, self.custom_bandwidth)
        form.addRow("System RAM", self.ram)
        layout = QVBoxLayout(self)
        layout.addWidget(self.combo)
        layout.addLayout(form)
        layout.addWidget(self.details)

        self._options: dict[str, backend.GpuOption] = {}
        self.populate()
        self.combo.currentIndexChanged.connect(self._changed)
        self.count.valueChanged.connect(self._changed)
        self.custom_memory.valueChanged.connect(self._changed)
        self.custom_bandwidth.valueChanged.connect(self._changed)
        self._changed()

    def populate(self) -> None:
        self.combo.blockSignals(True)
        self.combo.clear()
        self._options.clear()
        detected = backend.detected_gpus()
        catalog = backend.catalog_gpus()
        model = self.combo.model()
        if detected:
            self._header(model, "Detected on this machine")
            for opt in detected:
                self._add(opt)
        else:
            self._header(model, "No GPU detected on this machine")
        self._header(model, "Catalog")
        for opt in catalog:
            self._add(opt)
        self._header(model, "Other")
        self.combo.addItem("Custom GPU…", CUSTOM)
        first = next((i for i in range(self.combo.count()) if self.combo.itemData(i) not in (None,)), 0)
        preferred = self._index_of(detected[0].key) if detected else self._index_of(backend.DEFAULT_GPU)
        self.combo.setCurrentIndex(preferred if preferred >= 0 else first)
        self.combo.blockSignals(False)
        total, available = backend.system_ram_gib()
        self.ram.setText(f"{total:.1f} GiB ({available:.1f} free)")

    def _header(self, model: QStandardItemModel, text: str) -> None:
        self.combo.addItem(text)
        item = model.item(self.combo.count() - 1)
        item.setFlags(Qt.ItemFlag.NoItemFlags)
        font = item.font()
        font.setBold(True)
        item.setFont(font)

    def _add(self, opt: backend.GpuOption) -> None:
        self._options[opt.key] = opt
        self.combo.addItem(opt.label, opt.key)
        self.combo.setItemData(self.combo.count() - 1, opt.detail or opt.label, Qt.ItemDataRole.ToolTipRole)

    def _index_of(self, key: str | None) -> int:
        return self.combo.findData(key) if key else -1

    def select(self, key: str) -> bool:
        idx = self._index_of(key)
        if idx >= 0:
            self.combo.setCurrentIndex(idx)
        return idx >= 0

    def current_option(self) -> backend.GpuOption | None:
        key = self.combo.currentData()
        if key == CUSTOM:
            return backend.custom_gpu(self.custom_memory.value(), self.custom_bandwidth.value())
        return self._options.get(key)

    def _changed(self) -> None:
        custom = self.combo.currentData() == CUSTOM
        for w in (self.custom_memory, self.custom_bandwidth, self.custom_memory_label, self.custom_bandwidth_label):
            w.setVisible(custom)
        opt = self.current_option()
        if opt is None:
            self.details.setText("")
            return
        parts = [f"{opt.memory_gib:.0f} GiB"]
        if opt.free_gib is not None:
            parts.append(f"{opt.free_gib:.1f} GiB free")
        if opt.bandwidth_gbs:
            parts.append(f"{opt.bandwidth_gbs:.0f} GB/s")
        if opt.detail:
            parts.append(opt.detail)
        self.details.setText(" · ".join(parts))
        self.state.set_gpu(opt, self.count.value())
