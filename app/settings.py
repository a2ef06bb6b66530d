"""Persistent preferences (QSettings): theme, window state, recent models, the GPU choice, the
Plan controls, the Quantize method settings and where jobs run (the device pickers)."""
from __future__ import annotations

import json
from typing import Any

from PySide6.QtCore import QByteArray, QSettings
from PySide6.QtWidgets import QAbstractSpinBox, QCheckBox, QComboBox, QDoubleSpinBox, QLineEdit, QSpinBox, QWidget

MAX_RECENT = 10


class AppSettings:
    def __init__(self, settings: QSettings | None = None) -> None:
        self._s = settings if settings is not None else QSettings("Quantscope", "Quantscope")

    @property
    def qsettings(self) -> QSettings:
        return self._s

    def theme(self) -> str:
        value = str(self._s.value("ui/theme", "light"))
        return value if value in ("light", "dark") else "light"

    def set_theme(self, name: str) -> None:
        self._s.setValue("ui/theme", name)

    def recent_models(self) -> list[str]:
        value = self._s.value("models/recent", [])
        if isinstance(value, str):  # QSettings returns a bare string for one-element lists
            value = [value]
        return [str(v) for v in (value or [])]

    def add_recent_model(self, path: str) -> list[str]:
        recent = [path] + [p for p in self.recent_models() if p != path]
        recent = recent[:MAX_RECENT]
        self._s.setValue("models/recent", recent)
        return recent

    def remove_recent_model(self, path: str) -> None:
        self._s.setValue("models/recent", [p for p in self.recent_models() if p != path])

    def geometry(self) -> QByteArray | None:
        value = self._s.value("window/geometry")
        return value if isinstance(value, QByteArray) else None

    def window_state(self) -> QByteArray | None:
        value = self._s.value("window/state")
        return value if isinstance(value, QByteArray) else None

    def save_window(self, geometry: QByteArray, state: QByteArray) -> None:
        self._s.setValue("window/geometry", geometry)
        self._s.setValue("window/state", state)

    def value(self, key: str, default: object = None) -> object:
        return self._s.value(key, default)

    def set_value(self, key: str, value: object) -> None:
        self._s.setValue(key, value)

    # A group of control values is one JSON document: QSettings' INI backend turns bools and
    # numbers into strings, JSON brings them back typed.
    def group(self, name: str) -> dict[str, Any]:
        raw = self._s.value(f"controls/{name}")
        try:
            value = json.loads(str(raw)) if raw else {}
        except json.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}

    def set_group(self, name: str, values: dict[str, Any]) -> None:
        self._s.setValue(f"controls/{name}", json.dumps(values))

    def device_choices(self) -> dict[str, str]:
        """{picker: device string} the user chose ("auto", "cpu", "cuda:N"); pickers left to follow
        the GPU panel are absent. A picker ignores a device this machine does not offer."""
        return {str(k): v for k, v in self.group("devices").items() if isinstance(v, str)}

    def set_device_choices(self, choices: dict[str, str | None]) -> None:
        self.set_group("devices", {k: v for k, v in choices.items() if v is not None})


def model_key(path: str) -> str:
    """A QSettings-safe group name for a model folder ('/' would nest groups)."""
    import hashlib

    return hashlib.sha1(path.encode("utf-8")).hexdigest()[:16]


def widget_values(widgets: dict[str, QWidget]) -> dict[str, Any]:
    """The user-visible value of each control (combo boxes by their item data when they have it)."""
    out: dict[str, Any] = {}
    for key, w in widgets.items():
        if isinstance(w, QCheckBox):
            out[key] = w.isChecked()
        elif isinstance(w, (QSpinBox, QDoubleSpinBox)):
            out[key] = w.value()
        elif isinstance(w, QComboBox):
            data = w.currentData()
            out[key] = w.currentText() if w.isEditable() or data is None else data
        elif isinstance(w, QLineEdit):
            out[key] = w.text()
    return out


def apply_widget_values(widgets: dict[str, QWidget], values: dict[str, Any]) -> None:
    """Set what `widget_values` saved; values that no longer fit a control (an item that is gone,
    a number out of range) are skipped, so an old settings file never breaks the start."""
    for key, w in widgets.items():
        if key not in values:
            continue
        v = values[key]
        if isinstance(w, QCheckBox) and isinstance(v, bool):
            w.setChecked(v)
        elif isinstance(w, QAbstractSpinBox) and isinstance(v, (int, float)) and not isinstance(v, bool):
            if w.minimum() <= v <= w.maximum():
                w.setValue(int(v) if isinstance(w, QSpinBox) else float(v))
        elif isinstance(w, QComboBox):
            idx = w.findData(v)
            if idx < 0:
                idx = w.findText(str(v))
            if idx >= 0:
                w.setCurrentIndex(idx)
            elif w.isEditable():
                w.setCurrentText(str(v))
        elif isinstance(w, QLineEdit) and isinstance(v, str):
            w.setText(v)
