"""Sidebar panel: choose a model (folder, drop, recent, catalog) and show its facts."""
from __future__ import annotations

from pathlib import Path
from PySide6.QtCore import QStringListModel, Qt, Signal
from PySide6.QtGui import QFontMetrics
from PySide6.QtWidgets import (
    QComboBox,
    QCompleter,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app import backend
from app.model_info import describe_source
from app.resources import icon
from app.state import ModelChoice


class ModelPicker(QGroupBox):
    """Emits `chosen(ModelChoice)` for a folder or catalog entry that opened, and
    `error(title, message)` for one that did not; the window shows the dialog."""

    chosen = Signal(object)
    error = Signal(str, str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Model", parent)
        self.open_button = QPushButton(icon("folder"), "Open folder…")
        self.open_button.setToolTip("Open a Hugging Face model folder (config.json + safetensors), Ctrl+O")
        self.open_button.clicked.connect(self.browse)

        self.recent = QComboBox()
        self.recent.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.recent.setMinimumContentsLength(8)
        self.recent.setPlaceholderText("Recent models")
        self.recent.setToolTip("Models opened before (also in File ▸ Recent)")
        self.recent.activated.connect(self._recent_activated)

        self.catalog = QLineEdit()
        self.catalog.setPlaceholderText("Search the model catalog…")
        self.catalog.setClearButtonEnabled(True)
        self.catalog.setToolTip("Plan for a model you have not downloaded (config facts only)")
        self._catalog_model = QStringListModel(self)
        completer = QCompleter(self._catalog_model, self)
        completer.setCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        completer.setFilterMode(Qt.MatchFlag.MatchContains)
        completer.setMaxVisibleItems(15)
        completer.activated.connect(self.open_catalog)
        self.catalog.setCompleter(completer)
        self.catalog.returnPressed.connect(lambda: self.open_catalog(self.catalog.text()))

        self.title = QLabel("No model")
        self.title.setObjectName("Heading")
        self.title.setWordWrap(True)
        self.title.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.facts = QFormLayout()
        self.facts.setLabelAlignment(Qt.AlignmentFlag.AlignLeft)
        self.facts.setHorizontalSpacing(10)
        self.facts.setVerticalSpacing(3)
        hint = QLabel("Drop a model folder anywhere on the window.")
        hint.setObjectName("Muted")
        hint.setWordWrap(True)

        row = QHBoxLayout()
        row.addWidget(self.open_button)
        row.addWidget(self.recent, 1)
        layout = QVBoxLayout(self)
        layout.addLayout(row)
        layout.addWidget(self.catalog)
        layout.addWidget(self.title)
        layout.addLayout(self.facts)
        layout.addWidget(hint)
        self._recent_paths: list[str] = []
        self.set_catalog(backend.catalog_model_ids())

    def set_catalog(self, ids: list[str]) -> None:
        self._catalog_model.setStringList(ids)
        self.catalog.setEnabled(bool(ids))

    def set_recent(self, paths: list[str]) -> None:
        self._recent_paths = list(paths)
        self.recent.blockSignals(True)
        self.recent.clear()
        for p in paths:
            self.recent.addItem(Path(p).name or p, p)
            self.recent.setItemData(self.recent.count() - 1, p, Qt.ItemDataRole.ToolTipRole)
        self.recent.setCurrentIndex(-1)
        self.recent.blockSignals(False)
        self.recent.setEnabled(bool(paths))

    def browse(self) -> None:
        start = self._recent_paths[0] if self._recent_paths else str(Path.home())
        folder = QFileDialog.getExistingDirectory(self, "Open a model folder", start)
        if folder:
            self.open_folder(folder)

    def open_folder(self, folder: str | Path) -> ModelChoice | None:
        """Open a folder synchronously (headers only, milliseconds) and emit the result."""
        path = Path(folder).expanduser()
        try:
            source = backend.open_model(path)
        except (ValueError, OSError, KeyError) as exc:
            self.error.emit("Cannot open model", f"{path}\n\n{exc}")
            return None
        choice = ModelChoice(label=path.name or str(path), source=source, path=path)
        self.chosen.emit(choice)
        return choice

    def open_catalog(self, model_id: str) -> ModelChoice | None:
        model_id = model_id.strip()
        if not model_id:
            return None
        try:
            source = backend.catalog_model(model_id)
        except (ValueError, KeyError, OSError) as exc:
            self.error.emit("Unknown catalog model", str(exc))
            return None
        choice = ModelChoice(label=model_id, source=source, path=None)
        self.chosen.emit(choice)
        return choice

    def show_model(self, choice: ModelChoice | None) -> None:
        while self.facts.rowCount():
            self.facts.removeRow(0)
        if choice is None:
            self.title.setText("No model")
            return
        self.title.setText(choice.label)
        self.title.setToolTip(str(choice.path) if choice.path else "from the model catalog (no weights)")
        for key, value in describe_source(choice.source, choice.path).items():
            label = QLabel(value)
            label.setWordWrap(True)
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            name = QLabel(key)
            name.setObjectName("Muted")
            self.facts.addRow(name, label)
        if choice.path is None:
            origin = QLabel("catalog entry (config facts only)")
        else:
            # A path is one long word; eliding keeps it from widening the sidebar.
            text = str(choice.path)
            metrics = QFontMetrics(self.font())
            origin = QLabel(metrics.elidedText(text, Qt.TextElideMode.ElideMiddle, 270))
            origin.setToolTip(text)
        origin.setObjectName("Muted")
        self.facts.addRow(origin)

    def _recent_activated(self, index: int) -> None:
        path = self.recent.itemData(index)
        if path:
            self.open_folder(path)

