"""Live per-layer error plot: one point per quantized linear, coloured by module type.

Curves (one scatter per module type) are created once; each LayerDone appends to plain lists,
and the curves that changed get `setData` at most every `_REFRESH_MS`: a repaint of the plot
(autoranged axes, tick labels) costs far more UI-thread time than the point itself, and a fast
job delivers several linears per frame.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from app.theme import ThemeManager, style_plot
from app.views.live_text import LiveText

MODULE_TYPES = ("q", "k", "v", "o", "gate", "up", "down", "other")
# Offsets within a decoder layer so the seven linears of one layer sit side by side.
_OFFSETS = {t: (i - 3) * 0.1 for i, t in enumerate(MODULE_TYPES)}
METRICS = {
    "rel_error": ("Relative error ‖W−Ŵ‖/‖W‖", True),
    "sqnr_db": ("SQNR (dB)", False),
    "mse": ("MSE", True),
}
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Redraw interval while points stream in (10 Hz reads as live).
_REFRESH_MS = 100


def module_type(name: str) -> str:
    """q/k/v/o/gate/up/down from a linear's name (…self_attn.q_proj → q)."""
    last = name.rsplit(".", 1)[-1]
    stem = last[:-5] if last.endswith("_proj") else last
    aliases = {"query": "q", "key": "k", "value": "v", "out": "o", "o": "o", "dense": "o",
               "w1": "gate", "w3": "up", "w2": "down", "fc1": "up", "fc2": "down"}
    stem = aliases.get(stem, stem)
    return stem if stem in MODULE_TYPES else "other"


def layer_number(name: str, fallback: int) -> int:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else fallback


@dataclass
class LayerPoint:
    name: str
    layer: int
    kind: str
    metrics: dict[str, float]
    seconds: float

    def to_json(self) -> dict:
        out = {"name": self.name, "layer": self.layer, "module": self.kind, "seconds": self.seconds}
        out.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.metrics.items()})
        return out


@dataclass
class _Series:
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    tips: list[str] = field(default_factory=list)


class _ErrorAxis(pg.AxisItem):
    """Left axis that labels a log scale with plain numbers at 1-2-5 steps (1-9 when the data
    spans less than one such step): pyqtgraph labels only whole decades, and per-layer errors
    usually sit inside a single decade, which left the axis without any number."""

    log_labels = False  # the plotted values are log10 of the metric

    def tickValues(self, minVal: float, maxVal: float, size: float) -> list:
        if not self.log_labels:
            return super().tickValues(minVal, maxVal, size)
        for mantissas in ((1, 2, 5), range(1, 10)):
            values = [math.log10(m) + e for e in range(math.floor(minVal) - 1, math.ceil(maxVal) + 1)
                      for m in mantissas if minVal <= math.log10(m) + e <= maxVal]
            if len(values) >= 3:
                return [(1.0, values)]
        # A narrow band (e.g. 0.11-0.15): evenly spaced round values instead.
        lo, hi = 10 ** minVal, 10 ** maxVal
        raw = (hi - lo) / 4
        if raw <= 0:
            return [(1.0, [])]
        magnitude = 10 ** math.floor(math.log10(raw))
        step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
        start = math.ceil(lo / step) * step
        ticks = [start + k * step for k in range(int((hi - start) / step) + 1)]
        return [(1.0, [math.log10(t) for t in ticks if t > 0])]

    def tickStrings(self, values: list, scale: float, spacing: float) -> list[str]:
        if not self.log_labels:
            return super().tickStrings(values, scale, spacing)
        return [f"{10 ** v:.3g}" for v in values]


class LayerErrorPlot(QWidget):
    metric_changed = Signal(str)

    def __init__(self, theme: ThemeManager, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.theme = theme
        self.points: list[LayerPoint] = []
        self.metric_box = QComboBox()
        for key, (label, _log) in METRICS.items():
            self.metric_box.addItem(label, key)
        self.metric_box.currentIndexChanged.connect(self._metric_changed)
        self.count_label = LiveText("0 linears", sample="0000 linears")  # changes with every point
        self.count_label.setAlignment(Qt.AlignmentFlag.AlignRight)
        self.count_label.setObjectName("Muted")
        self.plot = pg.PlotWidget(axisItems={"left": _ErrorAxis("left")})
        self.plot.setMenuEnabled(False)
        self.plot.showGrid(x=False, y=True, alpha=0.2)
        self.plot.setLabel("bottom", "decoder layer")
        # SI prefixes turn 0.05 into "5·10¹ (×0.001)" on a log axis; plain numbers read better.
        self.plot.getAxis("left").enableAutoSIPrefix(False)
        # A fixed width: the axis sizes itself to its labels only after a paint, which left a
        # plot filled while its tab was hidden with no room for them.
        self.plot.getAxis("left").setWidth(56)
        legend = self.plot.addLegend(offset=(-10, 10), colCount=4)
        legend.setLabelTextSize("8pt")
        self.series: dict[str, _Series] = {t: _Series() for t in MODULE_TYPES}
        self.curves: dict[str, pg.ScatterPlotItem] = {}
        for t in MODULE_TYPES:
            curve = pg.ScatterPlotItem(size=8, hoverable=True, hoverSize=12, tip=self._tip)
            self.plot.addItem(curve)
            self.curves[t] = curve
        self._legend_added: set[str] = set()
        self._dirty: set[str] = set()
        self._refresh = QTimer(self)
        self._refresh.setSingleShot(True)
        self._refresh.setInterval(_REFRESH_MS)
        self._refresh.timeout.connect(self.flush)
        top = QHBoxLayout()
        top.addWidget(QLabel("Per-layer error"))
        top.addWidget(self.metric_box)
        top.addStretch(1)
        top.addWidget(self.count_label)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(top)
        layout.addWidget(self.plot, 1)
        theme.changed.connect(self._restyle)
        self._restyle()
        self._apply_axis()

    @property
    def metric(self) -> str:
        return str(self.metric_box.currentData())

    def set_metric(self, key: str) -> None:
        idx = self.metric_box.findData(key)
        if idx < 0:
            raise ValueError(f"unknown metric {key!r} (use one of {', '.join(METRICS)})")
        self.metric_box.setCurrentIndex(idx)

    def clear(self) -> None:
        self._refresh.stop()
        self._dirty.clear()
        self.points.clear()
        for s in self.series.values():
            s.x.clear()
            s.y.clear()
            s.tips.clear()
        for curve in self.curves.values():
            curve.setData(x=[], y=[], data=[])
        self.count_label.setText("0 linears")

    def add_point(self, name: str, index: int, metrics: dict[str, float], seconds: float) -> LayerPoint:
        point = LayerPoint(name, layer_number(name, index), module_type(name), dict(metrics), seconds)
        self.points.append(point)
        self._append(point)
        self._dirty.add(point.kind)
        if not self._refresh.isActive():
            self._refresh.start()
        return point

    def flush(self) -> None:
        """Draw the points added since the last redraw now."""
        self._refresh.stop()
        for t in MODULE_TYPES:
            if t in self._dirty:
                self._update_curve(t)
        self._dirty.clear()
        self.count_label.setText(f"{len(self.points)} linears")

    def set_points(self, points: list[LayerPoint]) -> None:
        self.clear()
        self.points.extend(points)
        for p in points:
            self._append(p)
        for t in MODULE_TYPES:
            self._update_curve(t)
        self.count_label.setText(f"{len(self.points)} linears")

    def point_count(self) -> int:
        """Points drawn (after drawing any that are pending)."""
        self.flush()
        return sum(len(self.curves[t].data) for t in MODULE_TYPES)

    def _value(self, p: LayerPoint) -> float | None:
        v = p.metrics.get(self.metric)
        if v is None or not math.isfinite(v):
            return None
        if METRICS[self.metric][1] and v <= 0:
            return None  # exact layers have no place on a log axis
        return float(v)

    def _append(self, p: LayerPoint) -> None:
        v = self._value(p)
        s = self.series[p.kind]
        if v is None:
            return
        s.x.append(p.layer + _OFFSETS[p.kind])
        # ScatterPlotItem does not apply the log transform to its data; feed log10 values and let
        # the axis label them as powers of ten.
        s.y.append(math.log10(v) if METRICS[self.metric][1] else v)
        mse = p.metrics.get("mse", float("nan"))
        s.tips.append(
            f"{p.name}\nrel. error {p.metrics.get('rel_error', float('nan')):.4g}"
            f"\nSQNR {p.metrics.get('sqnr_db', float('nan')):.2f} dB\nMSE {mse:.3g}\n{p.seconds:.2f} s"
        )

    def _update_curve(self, kind: str) -> None:
        s = self.series[kind]
        colour = self.theme.palette.modules[kind]
        self.curves[kind].setData(x=np.asarray(s.x), y=np.asarray(s.y), data=list(s.tips),
                                  brush=pg.mkBrush(colour), pen=pg.mkPen(colour))
        if s.x and kind not in self._legend_added:
            legend = self.plot.getPlotItem().legend
            legend.addItem(self.curves[kind], kind)
            legend.items[-1][1].setAttr("color", self.theme.palette.foreground)
            legend.items[-1][1].setText(kind)
            self._legend_added.add(kind)

    @staticmethod
    def _tip(x: float, y: float, data: str) -> str:
        return str(data)

    def _apply_axis(self) -> None:
        label, log = METRICS[self.metric]
        self.plot.setLabel("left", label)
        # The series already hold log10 values; the axis only labels them (pyqtgraph's own log
        # mode would transform the data a second time and labels whole decades only).
        axis = self.plot.getAxis("left")
        axis.log_labels = log
        axis.picture = None
        axis.update()

    def _metric_changed(self) -> None:
        self._apply_axis()
        for s in self.series.values():
            s.x.clear()
            s.y.clear()
            s.tips.clear()
        for p in self.points:
            self._append(p)
        self._dirty.clear()
        for t in MODULE_TYPES:
            self._update_curve(t)
        self.metric_changed.emit(self.metric)

    def _restyle(self, *_: object) -> None:
        style_plot(self.plot, self.theme.palette)
        for t in MODULE_TYPES:
            self._update_curve(t)

    def save_png(self, path: str) -> bool:
        self.flush()
        return self.plot.grab().save(path)
