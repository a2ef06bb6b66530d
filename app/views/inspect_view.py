"""Inspect tab: outliers per linear. A heatmap over decoder layers × module types (kurtosis or
absmax/σ of the weights) picks a linear; for it, the weight histogram, per-channel absmax with
the LLM.int8 threshold and, with calibration, activation absmax and SmoothQuant's scales.
Statistics run on worker threads; the tab only draws."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from core.events import Progress, StageStarted

from app import backend
from app.help_text import TERMS
from app.state import AppState, ModelChoice
from app.theme import ThemeManager, style_plot
from app.views.layer_plot import MODULE_TYPES, layer_number, module_type
from app.worker import TaskRunner

HEAT_METRICS = {"kurtosis": "weight kurtosis (3 = Gaussian)", "absmax_over_std": "max|w| / σ"}
HEAT_TYPES = [t for t in MODULE_TYPES if t != "other"]
OUTLIERS_SHOWN = 20  # channel numbers listed in the text; the tooltip has all of them


class InspectView(QWidget):
    error = Signal(str, str)
    status = Signal(str)
    detail_ready = Signal(object)

    def __init__(self, state: AppState, theme: ThemeManager, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self.theme = theme
        self.overview: list[dict[str, Any]] = []
        self.detail: dict[str, Any] | None = None
        self.marked_cell: tuple[int, int] | None = None  # (layer, module column) outlined on the heatmap
        self.overview_runner = TaskRunner(self)
        self.detail_runner = TaskRunner(self)

        # ---------------- selection: heatmap + list
        self.heat_metric = QComboBox()
        for key, label in HEAT_METRICS.items():
            self.heat_metric.addItem(label, key)
        self.heat_metric.currentIndexChanged.connect(self._draw_heatmap)
        self.heat = pg.PlotWidget()
        self.heat.setMenuEnabled(False)
        self.heat.setMouseEnabled(x=False, y=False)
        self.heat.setLabel("left", "decoder layer")
        self.heat.invertY(True)
        self.heat_image = pg.ImageItem()
        self.heat.addItem(self.heat_image)
        self.heat_bar = pg.ColorBarItem(colorMap=pg.colormap.get("viridis"), interactive=False, width=12)
        self.heat_bar.setImageItem(self.heat_image, insert_in=self.heat.getPlotItem())
        bottom = self.heat.getPlotItem().getAxis("bottom")
        bottom.setTicks([[(i + 0.5, t) for i, t in enumerate(HEAT_TYPES)]])
        # The last column's label ("down") is wider than half a column: let it reach past the
        # axis end instead of being dropped.
        bottom.setStyle(hideOverlappingLabels=False)
        self.heat.scene().sigMouseClicked.connect(self._heat_clicked)
        # Outline of the cell of the selected linear.
        self.heat_marker = pg.PlotDataItem(x=[], y=[])
        self.heat_marker.setZValue(10)
        self.heat.addItem(self.heat_marker)
        self.heat.setMinimumHeight(240)
        self.overview_progress = QProgressBar()
        self.overview_progress.setRange(0, 1)
        self.overview_progress.setValue(0)
        self.overview_progress.setFormat("weights: %v / %m")
        self.linears = QListWidget()
        self.linears.currentItemChanged.connect(self._linear_selected)
        left = QWidget()
        ll = QVBoxLayout(left)
        ll.setContentsMargins(0, 0, 4, 0)
        top = QHBoxLayout()
        top.addWidget(QLabel("Heatmap"))
        top.addWidget(self.heat_metric, 1)
        ll.addLayout(top)
        ll.addWidget(self.heat, 3)
        ll.addWidget(self.overview_progress)
        ll.addWidget(QLabel("Linears (click a heatmap cell or a name)"))
        ll.addWidget(self.linears, 2)

        # ---------------- detail
        self.title = QLabel("Choose a linear")
        self.title.setObjectName("Heading")
        self.calibrate = QCheckBox("with calibration (activations)")
        self.calibrate.setToolTip(TERMS["calibrate"])
        self.calibrate.toggled.connect(self._reload_detail)
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.1, 1000.0)
        self.threshold.setValue(6.0)
        self.threshold.setToolTip(TERMS["threshold"])
        self.threshold.valueChanged.connect(self._threshold_changed)
        self.alpha = QDoubleSpinBox()
        self.alpha.setRange(0.0, 1.0)
        self.alpha.setSingleStep(0.05)
        self.alpha.setValue(0.5)
        self.alpha.setToolTip(TERMS["alpha"])
        self.alpha.valueChanged.connect(self._reload_if_calibrated)
        controls = QHBoxLayout()
        controls.addWidget(self.title, 1)
        controls.addWidget(self.calibrate)
        controls.addWidget(QLabel("threshold"))
        controls.addWidget(self.threshold)
        controls.addWidget(QLabel("α"))
        controls.addWidget(self.alpha)

        self.hist = pg.PlotWidget()
        self.hist.setMenuEnabled(False)
        self.hist.setLabel("bottom", "weight value")
        self.hist.setLabel("left", "count")
        self.hist.setLogMode(False, True)
        self.hist_curve = pg.PlotDataItem(stepMode="center", fillLevel=0, fillOutline=True)
        self.hist.addItem(self.hist_curve)
        self.channels = pg.PlotWidget()
        self.channels.setMenuEnabled(False)
        self.channels.setLabel("bottom", "input channel")
        self.channels.setLabel("left", "max |·| per channel")
        self.channels.setLabel("left", "weights: max |w| per channel")
        legend = self.channels.addLegend(offset=(-10, 10))
        self.w_curve = self.channels.plot(name="weights (left axis)")
        # Activations are often 100× the weights: on one shared axis the weight curve was a flat
        # line at zero. They get their own view box and the right axis; the LLM.int8 threshold
        # is an activation value, so its line lives there too.
        plot = self.channels.getPlotItem()
        self.a_view = pg.ViewBox()
        plot.showAxis("right")
        plot.scene().addItem(self.a_view)
        plot.getAxis("right").linkToView(self.a_view)
        plot.getAxis("right").setLabel("activations: max |x| per channel")
        self.a_view.setXLink(plot)
        self.a_curve = pg.PlotDataItem()
        self.a_view.addItem(self.a_curve)
        legend.addItem(self.a_curve, "activations (right axis)")
        self.threshold_line = pg.InfiniteLine(angle=0, movable=False, label="LLM.int8 threshold {value:.1f}",
                                              labelOpts={"position": 0.1})
        self.a_view.addItem(self.threshold_line)
        plot.vb.sigResized.connect(self._sync_activation_view)
        self.stats = QLabel()
        self.stats.setWordWrap(True)
        self.stats.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.smooth = QLabel()
        self.smooth.setWordWrap(True)
        self.smooth.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.detail_progress = QProgressBar()
        self.detail_progress.setRange(0, 1)
        self.detail_progress.setValue(0)
        stats_box = QGroupBox("Statistics")
        sf = QFormLayout(stats_box)
        sf.addRow(self.stats)
        sf.addRow(self.smooth)
        plots = QSplitter(Qt.Orientation.Vertical)
        plots.addWidget(self.hist)
        plots.addWidget(self.channels)
        right = QWidget()
        rl = QVBoxLayout(right)
        rl.setContentsMargins(4, 0, 0, 0)
        rl.addLayout(controls)
        rl.addWidget(self.detail_progress)
        rl.addWidget(plots, 1)
        rl.addWidget(stats_box)

        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(left)
        split.addWidget(right)
        split.setStretchFactor(1, 1)
        split.setSizes([420, 800])
        layout = QVBoxLayout(self)
        layout.addWidget(split)

        self.overview_runner.event.connect(self._overview_event)
        self.overview_runner.finished.connect(self._overview_done)
        self.overview_runner.failed.connect(lambda exc, _tb: self._failed("Weight statistics failed", exc))
        self.detail_runner.event.connect(self._detail_event)
        self.detail_runner.finished.connect(self._detail_done)
        self.detail_runner.failed.connect(lambda exc, _tb: self._failed("Inspection failed", exc))
        self.detail_runner.running_changed.connect(
            lambda running: self.detail_progress.setRange(0, 0 if running else 1))
        state.model_changed.connect(self._model_changed)
        theme.changed.connect(self._restyle)
        self._restyle()

    def runners(self) -> list[TaskRunner]:
        return [self.overview_runner, self.detail_runner]

    # ------------------------------------------------------------ model
    def _model_changed(self, choice: ModelChoice | None) -> None:
        self.linears.clear()
        self.overview = []
        self.detail = None
        self.heat_image.clear()
        self.overview_runner.cancel()
        self.detail_runner.cancel()
        # Nothing of the previous model may stay on screen under the new one's name.
        self.hist_curve.setData([], [])
        self.w_curve.setData([], [])
        self.a_curve.setData([], [])
        self.threshold_line.setVisible(False)
        self.stats.setText("")
        self.smooth.setText("")
        self.overview_progress.setValue(0)
        self.heat.setTitle("")
        self.heat_marker.setData([], [])
        if choice is None or not choice.has_weights:
            self.title.setText("Inspection needs a model folder with weights" if choice else "Choose a linear")
            self.heat.setTitle(self.title.text() if choice else "", size="9pt")
            return
        for name in backend.linear_weight_names(choice.source):
            item = QListWidgetItem(name[: -len(".weight")])
            self.linears.addItem(item)
        if not self.linears.count():
            self.title.setText("No decoder linears found in this folder")
            self.heat.setTitle("No decoder linears found: nothing to inspect", size="9pt")
            return
        if choice.is_quantized:
            # Quantized folders are inspected through their exporter's dequantization: the
            # statistics are those of the weights the model really computes with.
            self.heat.setTitle("dequantized weights", size="9pt")
        self.title.setText("Choose a linear")
        self.overview_runner.start(backend.weight_overview, source=choice.source)
        self.linears.setCurrentRow(0)

    # ------------------------------------------------------------ overview heatmap
    @Slot(object)
    def _overview_event(self, ev: object) -> None:
        if isinstance(ev, Progress) and ev.total:
            self.overview_progress.setRange(0, ev.total)
            self.overview_progress.setValue(ev.done)

    @Slot(object)
    def _overview_done(self, rows: list[dict[str, Any]]) -> None:
        self.overview = rows
        self._draw_heatmap()

    def heat_matrix(self) -> np.ndarray:
        """[layers, module types] of the chosen metric (NaN where a model has no such linear)."""
        key = self.heat_metric.currentData()
        n_layers = max((layer_number(r["name"], 0) for r in self.overview), default=-1) + 1
        grid = np.full((max(n_layers, 0), len(HEAT_TYPES)), np.nan)
        for r in self.overview:
            t = module_type(r["name"])
            if t in HEAT_TYPES:
                grid[layer_number(r["name"], 0), HEAT_TYPES.index(t)] = r[key]
        return grid

    def _draw_heatmap(self) -> None:
        if not self.overview:
            return
        grid = self.heat_matrix()
        finite = grid[np.isfinite(grid)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        # ImageItem axes are (x, y) = (column, row) once transposed.
        self.heat_image.setImage(np.nan_to_num(grid, nan=lo).T, autoLevels=False, levels=(lo, max(hi, lo + 1e-9)))
        self.heat_bar.setLevels((lo, max(hi, lo + 1e-9)))
        self.heat.setXRange(0, len(HEAT_TYPES), padding=0)
        self.heat.setYRange(0, grid.shape[0], padding=0)

    def _heat_clicked(self, event: Any) -> None:
        pos = self.heat.getPlotItem().vb.mapSceneToView(event.scenePos())
        col, row = int(math.floor(pos.x())), int(math.floor(pos.y()))
        if 0 <= col < len(HEAT_TYPES) and row >= 0:
            self.select_linear(row, HEAT_TYPES[col])

    def select_linear(self, layer: int, kind: str) -> bool:
        for i in range(self.linears.count()):
            name = self.linears.item(i).text()
            if layer_number(name, -1) == layer and module_type(name) == kind:
                self.linears.setCurrentRow(i)
                return True
        return False

    # ------------------------------------------------------------ detail
    def current_linear(self) -> str | None:
        item = self.linears.currentItem()
        return item.text() if item is not None else None

    def _linear_selected(self, *_: object) -> None:
        self._mark_selected_cell()
        self._reload_detail()

    def _mark_selected_cell(self) -> None:
        name = self.current_linear()
        kind = module_type(name) if name else None
        if name is None or kind not in HEAT_TYPES:
            self.heat_marker.setData([], [])
            self.marked_cell = None
            return
        col, row = HEAT_TYPES.index(kind), layer_number(name, 0)
        self.heat_marker.setData([col, col + 1, col + 1, col, col], [row, row, row + 1, row + 1, row])
        self.marked_cell = (row, col)

    def _sync_activation_view(self) -> None:
        self.a_view.setGeometry(self.channels.getPlotItem().vb.sceneBoundingRect())
        self.a_view.linkedViewChanged(self.channels.getPlotItem().vb, self.a_view.XAxis)

    def _reload_if_calibrated(self) -> None:
        if self.calibrate.isChecked():
            self._reload_detail()

    def _reload_detail(self) -> None:
        name, model = self.current_linear(), self.state.model
        if name is None or model is None or not model.has_weights:
            return
        self.title.setText(name)
        self.detail_runner.start(backend.linear_detail, source=model.source, name=name,
                                 calibrate=self.calibrate.isChecked(), threshold=self.threshold.value(),
                                 alpha=self.alpha.value())

    @Slot(object)
    def _detail_event(self, ev: object) -> None:
        if isinstance(ev, Progress) and ev.total:
            self.detail_progress.setRange(0, ev.total)
            self.detail_progress.setValue(ev.done)
        elif isinstance(ev, StageStarted):
            self.status.emit(f"Inspect: {ev.stage} {ev.message}".strip())

    @Slot(object)
    def _detail_done(self, d: dict[str, Any]) -> None:
        self.detail = d
        self.detail_progress.setRange(0, 1)
        self.detail_progress.setValue(1)
        counts = np.asarray(d["hist_counts"], dtype=float)
        # Empty bins cannot sit on a log axis: draw them at 1, the baseline the fill starts from.
        self.hist_curve.setData(np.asarray(d["hist_edges"]), np.maximum(counts, 1.0))
        w_in = np.asarray(d["w_in_absmax"])
        self.w_curve.setData(np.arange(w_in.size), w_in)
        a = d.get("a_absmax")
        if a is not None:
            self.a_curve.setData(np.arange(len(a)), np.asarray(a))
        else:
            self.a_curve.setData([], [])
        self.a_view.enableAutoRange(axis=pg.ViewBox.YAxis)
        self._threshold_changed()
        rows, cols = d["shape"]
        self.stats.setText(
            f"shape {rows} × {cols} · kurtosis {d['kurtosis']:.2f} (Gaussian 3) · max|w| {d['absmax']:.4g} "
            f"= {d['absmax_over_std']:.1f} σ · beyond 6σ {d['frac_beyond_6sigma'] * 100:.3f} %"
        )
        self._describe_activations()
        self.detail_ready.emit(d)

    def _describe_activations(self) -> None:
        """The activation summary for the threshold in the box now: the channels at or above it
        are counted from the measured absmax here, so changing the threshold needs no new run."""
        d = self.detail
        a = d.get("a_absmax") if d is not None else None
        if d is None or a is None:
            self.smooth.setText("Tick “with calibration” to measure activations, LLM.int8 outlier channels "
                                "and SmoothQuant scales.")
            self.smooth.setToolTip("")
            return
        a = np.asarray(a)
        threshold = self.threshold.value()
        outliers = [int(i) for i in np.flatnonzero(a >= threshold)]
        shown = outliers[:OUTLIERS_SHOWN]
        listed = ", ".join(f"#{i}" for i in shown) or "none"
        if len(outliers) > len(shown):
            listed += f" … and {len(outliers) - len(shown)} more (all in the tooltip)"
        top = ", ".join(f"#{i} ×{s:.2f}" for i, s in d["smooth_top"][:8])
        self.smooth.setText(
            f"Activation max {float(np.max(a)):.2f}; {len(outliers)} channels ≥ threshold {threshold:g} "
            f"(LLM.int8 keeps them in 16-bit): {listed}\n"
            f"SmoothQuant (α={d['alpha']:.2f}) rescales most: {top}"
        )
        self.smooth.setToolTip(f"All {len(outliers)} channels ≥ {threshold:g}: " + ", ".join(map(str, outliers))
                               if outliers else "")

    def _threshold_changed(self, *_: object) -> None:
        self.threshold_line.setValue(self.threshold.value())
        show = self.detail is not None and self.detail.get("a_absmax") is not None
        self.threshold_line.setVisible(show)
        if show:
            self._describe_activations()

    def _failed(self, title: str, exc: object) -> None:
        self.detail_progress.setRange(0, 1)
        self.error.emit(title, str(exc) or type(exc).__name__)

    def _restyle(self, *_: object) -> None:
        pal = self.theme.palette
        for w in (self.heat, self.hist, self.channels):
            style_plot(w, pal)
        self.hist_curve.setPen(pg.mkPen(pal.accent, width=1.5))
        self.hist_curve.setBrush(pg.mkBrush(pal.accent + "55"))
        self.w_curve.setPen(pg.mkPen(pal.parts[0], width=1))
        self.a_curve.setPen(pg.mkPen(pal.parts[2], width=1))
        self.threshold_line.setPen(pg.mkPen(pal.modules["o"], width=2, style=Qt.PenStyle.DashLine))
        self.heat_marker.setPen(pg.mkPen(pal.foreground, width=3))
