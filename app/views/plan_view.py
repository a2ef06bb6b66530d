"""Plan tab: memory per format for the chosen model and GPU, as a table coloured by fit and a
stacked bar chart against the GPU's memory; controls recompute instantly (the planner is
arithmetic on config facts, so it runs on the UI thread); an offload slider for one format."""
from __future__ import annotations

from typing import Any

import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QBrush
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QScrollArea,
    QSlider,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app import backend
from app.help_text import TERMS
from app.state import AppState
from app.theme import ThemeManager, qcolor, style_plot

# Two-line headers: with one-line ones the ten columns outgrow the table at the default window
# width (1360 px) and the last one, the decode speed, is cut off.
COLUMNS = [
    ("Format", "format"),
    ("Bits/\nweight", "bits_per_weight"),
    ("Weights", "weights_gib"),
    ("KV cache", "kv_cache_gib"),
    ("Activ-\nations", "activations_gib"),
    ("Over-\nhead", "overhead_gib"),
    ("Total", "total_gib"),
    ("Fits", "fits"),
    ("GPU / CPU\nlayers", "layers"),
    ("Decode\ntok/s", "decode_tokens_per_s"),
]
PARTS = [("weights_gib", "Weights"), ("kv_cache_gib", "KV cache"), ("activations_gib", "Activations"),
         ("overhead_gib", "Overhead")]
CONTEXT_PRESETS = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]


class PlanView(QWidget):
    error = Signal(str, str)
    quantize_requested = Signal(str)  # format name of the selected row

    def __init__(self, state: AppState, theme: ThemeManager, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self.theme = theme
        self.rows: list[dict[str, Any]] = []
        self.split_shown: tuple[str, float, float] | None = None  # (format, GiB on GPU, GiB on CPU)

        self.context = QSpinBox()
        self.context.setRange(1, 10_000_000)
        self.context.setSingleStep(1024)
        self.context.setValue(4096)
        self.context.setSuffix(" tokens")
        self.context.setToolTip(TERMS["context"])
        self.context_preset = QComboBox()
        for n in CONTEXT_PRESETS:
            self.context_preset.addItem(f"{n // 1024}k" if n >= 1024 else str(n), n)
        self.context_preset.setCurrentIndex(CONTEXT_PRESETS.index(4096))
        self.context_preset.activated.connect(lambda i: self.context.setValue(self.context_preset.itemData(i)))
        self.batch = QSpinBox()
        self.batch.setRange(1, 4096)
        self.batch.setToolTip(TERMS["batch"])
        self.kv_dtype = QComboBox()
        for name in backend.KV_DTYPES:
            self.kv_dtype.addItem(name)
        self.kv_dtype.setToolTip(TERMS["kv_dtype"])
        self.engine = QComboBox()
        for key, label in backend.engine_profiles():
            self.engine.addItem(label, key)
        self.engine.setToolTip(TERMS["engine"])

        controls = QHBoxLayout()
        for label, widget in (("Context", self.context), ("", self.context_preset), ("Batch", self.batch),
                              ("KV dtype", self.kv_dtype), ("Engine", self.engine)):
            if label:
                controls.addWidget(QLabel(label))
            controls.addWidget(widget)
        controls.addStretch(1)
        self.summary = QLabel()
        self.summary.setObjectName("Muted")
        self.summary.setWordWrap(True)

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels([c for c, _ in COLUMNS])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.itemSelectionChanged.connect(self._selection_changed)

        self.chart = pg.PlotWidget()
        self.chart.setMenuEnabled(False)
        self.chart.setMouseEnabled(x=False, y=False)
        self.chart.showGrid(y=True, alpha=0.25)
        self.chart.setLabel("left", "GiB")
        # Sizes are always GiB: pyqtgraph's automatic SI prefix turned a small quantized model's
        # axis into "GiB (x0.001)".
        self.chart.getPlotItem().getAxis("left").enableAutoSIPrefix(False)
        self.bars: list[pg.BarGraphItem] = []
        for _key, _label in PARTS:
            bar = pg.BarGraphItem(x=[], height=[], width=0.7, y0=[])
            self.chart.addItem(bar)
            self.bars.append(bar)
        # The selected format is framed, and the slider's split is drawn inside its bar as a
        # narrow stack: the part on the GPU and the part left in CPU RAM.
        self.selection_frame = pg.BarGraphItem(x=[], height=[], width=0.86, y0=[])
        self.split_gpu = pg.BarGraphItem(x=[], height=[], width=0.22, y0=[])
        self.split_cpu = pg.BarGraphItem(x=[], height=[], width=0.22, y0=[])
        for item in (self.selection_frame, self.split_gpu, self.split_cpu):
            self.chart.addItem(item)
        self.gpu_line = pg.InfiniteLine(angle=0, movable=False, label="GPU {value:.1f} GiB",
                                        labelOpts={"position": 0.95, "anchors": [(1, 1), (1, 1)]})
        self.chart.addItem(self.gpu_line)
        self.chart.setMinimumHeight(220)
        self.chart.getPlotItem().getAxis("bottom").setHeight(44)  # room for two-line names
        # The legend lives under the plot, not in it: inside the view box it covered the GPU
        # line's label whenever the card's memory sat near the top of the scale.
        self.legend = QLabel()
        self.legend.setObjectName("Muted")
        self.legend.setWordWrap(True)
        self.legend.setTextFormat(Qt.TextFormat.RichText)
        chart_box = QWidget()
        cl = QVBoxLayout(chart_box)
        cl.setContentsMargins(0, 0, 0, 0)
        cl.addWidget(self.chart, 1)
        cl.addWidget(self.legend)

        # Offload panel for the selected format.
        self.offload_format = QLabel("Select a format in the table")
        self.offload_format.setObjectName("Heading")
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(0, 0)
        self.slider.setToolTip("Decoder layers on the GPU; the rest stay in CPU RAM")
        self.slider.valueChanged.connect(self._offload_changed)
        self.offload_text = QLabel()
        self.offload_text.setWordWrap(True)
        self.formula = QLabel()
        self.formula.setObjectName("Formula")
        self.formula.setWordWrap(True)
        self.formula.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.formula.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        offload = QGroupBox("Offload and formulas")
        ol = QVBoxLayout(offload)
        self.quantize_button = QPushButton("Quantize to this")
        self.quantize_button.setEnabled(False)
        self.quantize_button.clicked.connect(self._quantize_selected)
        head = QHBoxLayout()
        head.addWidget(self.offload_format, 1)
        head.addWidget(self.quantize_button)
        ol.addLayout(head)
        ol.addWidget(QLabel("GPU layers"))
        ol.addWidget(self.slider)
        ol.addWidget(self.offload_text)
        formula_scroll = QScrollArea()
        formula_scroll.setWidget(self.formula)
        formula_scroll.setWidgetResizable(True)
        formula_scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        formula_scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        ol.addWidget(formula_scroll, 1)

        lower = QSplitter(Qt.Orientation.Horizontal)
        lower.addWidget(chart_box)
        lower.addWidget(offload)
        lower.setStretchFactor(0, 3)
        lower.setStretchFactor(1, 2)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.table)
        split.addWidget(lower)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)

        layout = QVBoxLayout(self)
        layout.addLayout(controls)
        layout.addWidget(self.summary)
        layout.addWidget(split, 1)

        for signal in (self.context.valueChanged, self.batch.valueChanged, self.kv_dtype.currentIndexChanged,
                       self.engine.currentIndexChanged):
            signal.connect(self.refresh)
        state.model_changed.connect(self.refresh)
        state.gpu_changed.connect(self.refresh)
        theme.changed.connect(self._restyle)
        self._restyle()

    # ------------------------------------------------------------ planning
    def params(self) -> dict[str, Any]:
        return {"context": self.context.value(), "batch": self.batch.value(),
                "kv_dtype": self.kv_dtype.currentText(), "engine": self.engine.currentData()}

    def refresh(self) -> None:
        model, gpu = self.state.model, self.state.gpu
        if model is None or gpu is None:
            self._show([])
            self.summary.setText("Open a model and choose a GPU to see the plan.")
            return
        try:
            self.rows = backend.plan_rows(model.source, gpu, num_gpus=self.state.num_gpus, **self.params())
        except ValueError as exc:
            self.rows = []
            self._show([])
            self.summary.setText(f"Cannot plan: {exc}")
            return
        gpu_total = gpu.memory_gib * self.state.num_gpus
        fits = sum(1 for r in self.rows if r["fits"])
        self.summary.setText(
            f"{model.label} on {self.state.num_gpus}× {gpu.label} ({gpu_total:.0f} GiB): "
            f"{fits} of {len(self.rows)} formats fit entirely on the GPU. "
            "Hover a cell for its formula; select a row to split layers between GPU and CPU."
        )
        self._show(self.rows)

    def _show(self, rows: list[dict[str, Any]]) -> None:
        selected = self.selected_format()
        pal = self.theme.palette
        self.table.setSortingEnabled(False)
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            colour = pal.fits if row["fits"] else pal.offload if row.get("fits_with_offload") else pal.nofit
            for c, (_title, key) in enumerate(COLUMNS):
                item = QTableWidgetItem(self._cell(row, key))
                item.setBackground(QBrush(qcolor(colour)))
                item.setForeground(QBrush(qcolor(pal.foreground)))
                if key != "format":
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                item.setToolTip(self._tooltip(row, key))
                self.table.setItem(r, c, item)
        self._update_chart(rows)
        if rows:
            names = [row["format"] for row in rows]
            # Re-selecting the row that is already selected emits no selection signal, so the
            # panel is refreshed explicitly: a new GPU, model or context changes every figure in it.
            self.table.blockSignals(True)
            self.table.selectRow(names.index(selected) if selected in names else 0)
            self.table.blockSignals(False)
            self._selection_changed()
        else:
            self._draw_split(None, None)
            self.offload_format.setText("Select a format in the table")
            self.slider.setRange(0, 0)
            self.offload_text.setText("")
            self.formula.setText("")

    @staticmethod
    def _cell(row: dict[str, Any], key: str) -> str:
        if key == "format":
            return str(row.get("label") or row["format"]) + ("" if row.get("native", True) else "  ⚠")
        if key == "bits_per_weight":
            return f"{row[key]:.3f}"
        if key == "fits":
            if row["fits"]:
                return "yes"
            if row.get("fits_with_offload"):
                return "with offload"
            return f"no, {row.get('missing_gib', 0):,.0f} GiB short"
        if key == "layers":
            return f"{row.get('gpu_layers', 0)} / {row.get('cpu_layers', 0)}"
        if key == "decode_tokens_per_s":
            value = row.get(key)
            return "—" if not value else f"{value:,.1f}"
        return f"{row[key]:.2f} GiB"

    @staticmethod
    def _tooltip(row: dict[str, Any], key: str) -> str:
        formulas = row.get("formulas") or {}
        part = {"weights_gib": "weights", "kv_cache_gib": "kv_cache", "activations_gib": "activations",
                "overhead_gib": "overhead", "total_gib": "total", "decode_tokens_per_s": "decode",
                "layers": "offload", "fits": "offload", "bits_per_weight": "bits_per_weight"}.get(key)
        text = formulas.get(part, "") if part else ""
        notes = [row.get("support_note") or ""] if key == "format" else []
        if key == "format":
            notes += list(row.get("notes") or [])
        return "\n".join(t for t in (text, *notes) if t)

    def _update_chart(self, rows: list[dict[str, Any]]) -> None:
        x = list(range(len(rows)))
        base = [0.0] * len(rows)
        for bar, (key, _label) in zip(self.bars, PARTS):
            heights = [float(r[key]) for r in rows]
            bar.setOpts(x=x, height=heights, y0=list(base), width=0.7)
            base = [b + h for b, h in zip(base, heights)]
        axis = self.chart.getPlotItem().getAxis("bottom")
        # The table's names, broken at the first space: on one line, eleven of them overlap.
        axis.setTicks([[(i, str(r.get("label") or r["format"]).replace(" ", "\n", 1))
                        for i, r in enumerate(rows)]])
        gpu = self.state.gpu
        biggest = max(base, default=0.0)
        top = max(biggest * 1.15, 0.05)
        if gpu is not None:
            capacity = gpu.memory_gib * self.state.num_gpus
            self.gpu_line.setValue(capacity)
            # A small model next to a big card would be a row of invisible bars: keep the bars
            # readable and say where the GPU line is instead of squeezing them under it.
            if capacity <= 4 * biggest:
                top = max(top, capacity * 1.08)
                self.chart.setTitle("")
            else:
                self.chart.setTitle(f"GPU memory {capacity:.0f} GiB is above this scale "
                                    f"({capacity / max(biggest, 1e-9):.0f}× the largest total)", size="9pt")
        self.chart.setXRange(-0.6, max(len(rows) - 0.4, 0.6), padding=0)
        self.chart.setYRange(0, top, padding=0)

    # ------------------------------------------------------------ offload
    def selected_format(self) -> str | None:
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        if not rows or rows[0].row() >= len(self.rows):
            return None
        return str(self.rows[rows[0].row()]["format"])

    def _selected_row(self) -> dict[str, Any] | None:
        name = self.selected_format()
        return next((r for r in self.rows if r["format"] == name), None)

    def _selection_changed(self) -> None:
        row = self._selected_row()
        if row is None:
            return
        layers = int(row.get("gpu_layers", 0)) + int(row.get("cpu_layers", 0))
        self.offload_format.setText(str(row.get("label") or row["format"]))
        self._update_quantize_button(row)
        self.slider.blockSignals(True)
        self.slider.setRange(0, layers)
        self.slider.setValue(int(row.get("gpu_layers", 0)))
        self.slider.blockSignals(False)
        self._offload_changed(self.slider.value())

    def _offload_changed(self, gpu_layers: int) -> None:
        row = self._selected_row()
        model, gpu = self.state.model, self.state.gpu
        if row is None or model is None or gpu is None:
            return
        try:
            split = backend.offload_split(model.source, gpu, row["format"], gpu_layers,
                                          num_gpus=self.state.num_gpus, **self.params())
        except ValueError as exc:
            self.offload_text.setText(str(exc))
            return
        speed = split.get("decode_tokens_per_s")
        capacity = split.get("capacity_gib", gpu.memory_gib * self.state.num_gpus)
        short = float(split.get("missing_gib", 0) or 0) > 0
        if short:
            # A split that does not fit never runs, so a speed for it would be a made-up number.
            decode = "Decode: — (this split does not fit)"
        elif speed:
            decode = f"Decode ≈ {speed:,.1f} tokens/s (batch 1)"
        else:
            decode = "Decode speed: GPU bandwidth unknown"
        lines = [
            f"GPU: {split['gpu_layers']} layers, {split['gpu_used_gib']:.2f} GiB of {capacity:.1f} GiB usable",
            f"CPU: {split['cpu_layers']} layers, {split['cpu_ram_needed_gib']:.2f} GiB of RAM",
            decode,
        ]
        full = next((r for r in self.rows if r["format"] == row["format"]), None)
        if (speed and not short and full and full.get("decode_tokens_per_s")
                and full["gpu_layers"] != split["gpu_layers"]):
            lines[-1] += f" (planner's split: {full['decode_tokens_per_s']:,.1f} tokens/s)"
        if short:
            lines.append(f"Does not fit: {split['missing_gib']:.2f} GiB short")
        elif not split.get("fits") and not split.get("fits_with_offload"):
            lines.append("Does not fit with this split")
        if split.get("support_note"):
            lines.append(split["support_note"])
        self.offload_text.setText("\n".join(lines))
        self._draw_split(row, split)
        formulas = dict(row.get("formulas") or {})
        formulas.update(split.get("formulas") or {})
        self.formula.setText("\n".join(f"{k}: {v}" for k, v in formulas.items()))
        self.offload_formulas = formulas

    def _update_quantize_button(self, row: dict[str, Any]) -> None:
        model = self.state.model
        settings = backend.plan_format_settings(str(row["format"]))
        if settings is None:
            why = f"{row.get('label') or row['format']} is not written by the Quantize tab (16-bit, GGUF or FP4/FP6)."
        elif model is None or not model.has_weights or model.is_quantized:
            why = "Open the model's own folder (with weights, not quantized) to quantize it."
        else:
            why = ""
        self.quantize_button.setEnabled(not why)
        self.quantize_button.setToolTip(why or f"Set up the Quantize tab for {settings['label']} "
                                               f"({settings['method']}) and open it")

    def _quantize_selected(self) -> None:
        name = self.selected_format()
        if name is not None:
            self.quantize_requested.emit(name)

    def _draw_split(self, row: dict[str, Any] | None, split: dict[str, Any] | None) -> None:
        """Frame the selected format's bar and draw the slider's GPU/CPU split inside it."""
        if row is None or split is None or row not in self.rows:
            for item in (self.selection_frame, self.split_gpu, self.split_cpu):
                item.setOpts(x=[], height=[], y0=[])
            self.split_shown = None
            return
        x = self.rows.index(row)
        on_gpu = float(split.get("gpu_used_gib", 0.0))
        on_cpu = float(split.get("cpu_ram_needed_gib", 0.0))
        self.selection_frame.setOpts(x=[x], height=[float(row["total_gib"])], y0=[0.0])
        self.split_gpu.setOpts(x=[x], height=[on_gpu], y0=[0.0])
        self.split_cpu.setOpts(x=[x], height=[on_cpu], y0=[on_gpu])
        self.split_shown = (str(row["format"]), on_gpu, on_cpu)

    def _legend_html(self) -> str:
        pal = self.theme.palette
        swatch = '<span style="color:{c}">■</span> {t}'
        items = [swatch.format(c=c, t=label) for c, (_k, label) in zip(pal.parts, PARTS)]
        items += [swatch.format(c=pal.modules["gate"], t="on GPU (slider)"),
                  swatch.format(c=pal.modules["o"], t="in CPU RAM (slider)"),
                  f'<span style="color:{pal.modules["o"]}">- -</span> GPU memory']
        return " &nbsp; ".join(items)

    def _restyle(self, *_: object) -> None:
        pal = self.theme.palette
        style_plot(self.chart, pal)
        for bar, colour in zip(self.bars, pal.parts):
            bar.setOpts(brush=pg.mkBrush(colour), pen=pg.mkPen(pal.background, width=1))
        self.gpu_line.setPen(pg.mkPen(pal.modules["o"], width=2,
                                      style=Qt.PenStyle.DashLine))
        self.gpu_line.label.setColor(pal.foreground)
        self.selection_frame.setOpts(brush=pg.mkBrush(0, 0, 0, 0), pen=pg.mkPen(pal.foreground, width=2))
        self.split_gpu.setOpts(brush=pg.mkBrush(pal.modules["gate"]), pen=pg.mkPen(pal.background, width=1))
        self.split_cpu.setOpts(brush=pg.mkBrush(pal.modules["o"]), pen=pg.mkPen(pal.background, width=1))
        self.legend.setText(self._legend_html())
        if self.rows:
            self._show(self.rows)
