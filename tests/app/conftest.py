"""Fixtures for the GUI tests: an offscreen main window with throw-away settings, and a record
of error dialogs instead of modal boxes that would block the test."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PySide6.QtWidgets")
pytest.importorskip("pyqtgraph")
pytest.importorskip("pytestqt")


@pytest.fixture
def dialogs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(title, text) of every QMessageBox.critical/warning the app shows; none block."""
    from PySide6.QtWidgets import QMessageBox

    shown: list[tuple[str, str]] = []

    def record(_parent: Any, title: str, text: str, *args: Any, **kwargs: Any) -> QMessageBox.StandardButton:
        shown.append((title, text))
        return QMessageBox.StandardButton.Ok

    monkeypatch.setattr(QMessageBox, "critical", record)
    monkeypatch.setattr(QMessageBox, "warning", record)
    monkeypatch.setattr(QMessageBox, "about", lambda *a, **k: shown.append(("about", str(a[2]))))
    return shown


@pytest.fixture
def window(qtbot: Any, tmp_path: Path, dialogs: list) -> Iterator[Any]:
    from PySide6.QtCore import QSettings

    from app.main import make_application
    from app.settings import AppSettings

    make_application()
    from app.main_window import MainWindow

    settings = AppSettings(QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat))
    win = MainWindow(settings)
    qtbot.addWidget(win)
    # The results tab evaluates after every job by default; tests that want it turn it back on.
    win.results_view.auto.setChecked(False)
    win.show()
    yield win
    for runner in win.runners():
        runner.shutdown(60000)
