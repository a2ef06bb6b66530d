"""Where the files the app ships (styles, icons) live, and loading them."""
from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

from PySide6.QtGui import QIcon


def resources_dir() -> Path:
    # A PyInstaller build unpacks data next to the executable (sys._MEIPASS); a source checkout
    # or editable install keeps it at the repository root.
    frozen = getattr(sys, "_MEIPASS", None)
    if frozen:
        return Path(frozen) / "resources"
    return Path(__file__).resolve().parents[1] / "resources"


@lru_cache(maxsize=None)
def icon(name: str) -> QIcon:
    """The icon `resources/icons/<name>.svg`; an empty icon if the file is missing."""
    path = resources_dir() / "icons" / f"{name}.svg"
    return QIcon(str(path)) if path.is_file() else QIcon()


def stylesheet(theme: str) -> str:
    path = resources_dir() / "styles" / f"{theme}.qss"
    if not path.is_file():
        raise ValueError(f"unknown theme {theme!r}: {path} not found (use 'light' or 'dark')")
    # QSS url() needs absolute paths; the files name the icons folder with a placeholder.
    icons = (resources_dir() / "icons").as_posix()
    return path.read_text(encoding="utf-8").replace("{CHECK}", f"{icons}/check.svg")
