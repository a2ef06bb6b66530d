"""Persistent preferences (QSettings): theme, window state, recent models, last GPU."""
from __future__ import annotations

from PySide6.QtCore import QByteArray, QSettings

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
