"""Light and dark themes: a QSS file per theme plus the matching colours for pyqtgraph plots,
which QSS cannot reach."""
from __future__ import annotations

from dataclasses import dataclass

import pyqtgraph as pg
from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QColor, QFont, QFontDatabase, QPalette
from PySide6.QtWidgets import QApplication

from app.resources import stylesheet

THEMES = ("light", "dark")


@dataclass(frozen=True)
class Palette:
    background: str
    foreground: str
    muted: str
    grid: str
    accent: str
    fits: str  # table rows that fit on the GPU
    offload: str  # fit only with CPU offload
    nofit: str  # do not fit at all
    parts: tuple[str, str, str, str]  # weights, KV cache, activations, overhead
    modules: dict[str, str]  # module type -> colour for the per-layer plots


_MODULES_LIGHT = {"q": "#2f6feb", "k": "#8250df", "v": "#bf3989", "o": "#cf222e",
                  "gate": "#1a7f37", "up": "#9a6700", "down": "#0a7b83", "other": "#57606a"}
_MODULES_DARK = {"q": "#4493f8", "k": "#a371f7", "v": "#db61a2", "o": "#f85149",
                 "gate": "#3fb950", "up": "#d29922", "down": "#39c5cf", "other": "#9198a1"}

PALETTES = {
    "light": Palette("#ffffff", "#1f2328", "#57606a", "#d0d7de", "#2f6feb",
                     "#dafbe1", "#fff8c5", "#ffebe9",
                     ("#2f6feb", "#8250df", "#d29922", "#8c959f"), _MODULES_LIGHT),
    "dark": Palette("#0d1117", "#e6edf3", "#9198a1", "#30363d", "#4493f8",
                    "#12361f", "#3b2e07", "#4a1518",
                    ("#4493f8", "#a371f7", "#d29922", "#6e7681"), _MODULES_DARK),
}


class ThemeManager(QObject):
    """Applies a theme to the application and tells plots to recolour."""

    changed = Signal(str)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._name = "light"

    @property
    def name(self) -> str:
        return self._name

    @property
    def palette(self) -> Palette:
        return PALETTES[self._name]

    def apply(self, name: str) -> None:
        if name not in THEMES:
            raise ValueError(f"unknown theme {name!r} (use 'light' or 'dark')")
        self._name = name
        app = QApplication.instance()
        if app is not None:
            # Fusion draws the same everywhere and follows the palette, so spin boxes and combo
            # boxes match the theme without restyling their sub-controls in QSS.
            if app.style().name().lower() != "fusion":
                app.setStyle("Fusion")
            app.setPalette(qt_palette(PALETTES[name]))
            app.setStyleSheet(stylesheet(name))
        pal = PALETTES[name]
        pg.setConfigOption("background", pal.background)
        pg.setConfigOption("foreground", pal.foreground)
        self.changed.emit(name)


def qt_palette(pal: Palette) -> QPalette:
    qp = QPalette()
    dark = QColor(pal.background).lightness() < 128
    panel = QColor("#161b22" if dark else "#f6f8fa")
    for role, colour in (
        (QPalette.ColorRole.Window, QColor(pal.background)), (QPalette.ColorRole.WindowText, QColor(pal.foreground)),
        (QPalette.ColorRole.Base, QColor(pal.background)), (QPalette.ColorRole.AlternateBase, panel),
        (QPalette.ColorRole.Text, QColor(pal.foreground)), (QPalette.ColorRole.Button, panel),
        (QPalette.ColorRole.ButtonText, QColor(pal.foreground)), (QPalette.ColorRole.Highlight, QColor(pal.accent)),
        (QPalette.ColorRole.HighlightedText, QColor("#ffffff")), (QPalette.ColorRole.ToolTipBase, panel),
        (QPalette.ColorRole.ToolTipText, QColor(pal.foreground)), (QPalette.ColorRole.PlaceholderText, QColor(pal.muted)),
        (QPalette.ColorRole.Mid, QColor(pal.grid)), (QPalette.ColorRole.Light, QColor(pal.grid)),
    ):
        qp.setColor(role, colour)
    qp.setColor(QPalette.ColorGroup.Disabled, QPalette.ColorRole.Text, QColor(pal.muted))
    qp.setColor(QPalette.ColorGroup.Disabled, QPalette.ColorRole.ButtonText, QColor(pal.muted))
    qp.setColor(QPalette.ColorGroup.Disabled, QPalette.ColorRole.WindowText, QColor(pal.muted))
    return qp


def choose_font() -> QFont:
    """A UI font that exists here. Offscreen Qt has no system font settings, and asking for a
    family that is absent renders boxes; DejaVu Sans ships with most Linux images."""
    families = set(QFontDatabase.families())
    for family in ("Inter", "Segoe UI", "Cantarell", "Noto Sans", "DejaVu Sans", "Liberation Sans", "Arial"):
        if family in families:
            font = QFont(family)
            font.setPointSizeF(10.0)
            return font
    return QFont()


def style_plot(widget: pg.PlotWidget, palette: Palette) -> None:
    """Recolour an existing plot for a theme."""
    widget.setBackground(palette.background)
    plot = widget.getPlotItem()
    for axis in ("left", "bottom", "right", "top"):
        ax = plot.getAxis(axis)
        ax.setPen(pg.mkPen(palette.muted))
        ax.setTextPen(pg.mkPen(palette.foreground))
    plot.titleLabel.setAttr("color", palette.foreground)
    legend = plot.legend
    if legend is not None:
        legend.setLabelTextColor(palette.foreground)
        legend.setBrush(pg.mkBrush(palette.background + "cc"))
        for _sample, label in legend.items:
            label.setAttr("color", palette.foreground)
            label.setText(label.text)


def qcolor(hex_colour: str, alpha: int = 255) -> QColor:
    c = QColor(hex_colour)
    c.setAlpha(alpha)
    return c
