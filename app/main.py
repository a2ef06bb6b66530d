"""Create the QApplication and the main window."""
from __future__ import annotations

import logging
import sys

from PySide6.QtCore import QCoreApplication, Qt, QTimer
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QApplication

import core
from app.resources import icon
from app.settings import AppSettings
from app.theme import ThemeManager, choose_font


def make_application(argv: list[str] | None = None) -> QApplication:
    """The QApplication, created once, with high-DPI rounding that keeps fractional scales sharp."""
    app = QApplication.instance()
    if app is not None:
        return app  # type: ignore[return-value]
    QGuiApplication.setHighDpiScaleFactorRoundingPolicy(Qt.HighDpiScaleFactorRoundingPolicy.PassThrough)
    QCoreApplication.setOrganizationName("Quantscope")
    QCoreApplication.setApplicationName("Quantscope")
    QCoreApplication.setApplicationVersion(core.__version__)
    app = QApplication(argv if argv is not None else sys.argv[:1])
    app.setWindowIcon(icon("quantscope"))
    app.setFont(choose_font())
    return app


def run_app(model: str | None = None, theme: str | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app = make_application()
    from app.main_window import MainWindow  # after QApplication: widgets need it

    settings = AppSettings()
    if theme:
        settings.set_theme(theme)
    window = MainWindow(settings, ThemeManager(app))
    window.show()
    # Open the model once the event loop runs, so the window paints first.
    QTimer.singleShot(0, lambda: window.open_default(model))
    return app.exec()
