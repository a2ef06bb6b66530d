"""Quantize tab: method and settings → a `QuantJob`; Run starts `core.engine.run_quantization` on
a worker thread; progress, ETA, the live per-layer error plot and the log follow its events."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, QTimer, Signal, Slot
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from core.config import (
    CALIBRATED_METHODS,
    AWQConfig,
    CalibConfig,
    FourBitConfig,
    FP8Config,
    GPTQConfig,
    Granularity,
    LLMInt8Config,
    QuantJob,
    RTNConfig,
    SmoothQuantConfig,
)
from core.events import Finished, LayerDone, Log, MemorySample, Progress, StageStarted

from app import backend
from app.device_picker import QUANTIZE_AUTO_TIP, DevicePicker
from app.help_text import TERMS, tip
from app.resources import icon
from app.state import AppState, ModelChoice
from app.theme import ThemeManager
from app.views.layer_plot import LayerErrorPlot, LayerPoint
from app.views.live_text import LiveText
from app.worker import TaskRunner

METHODS = [
    ("rtn", "RTN — round to nearest (no calibration)"),
    ("gptq", "GPTQ — Hessian-aware rounding"),
    ("awq", "AWQ — activation-aware scales"),
    ("nf4", "NF4 — bitsandbytes 4-bit NormalFloat"),
    ("fp4", "FP4 — bitsandbytes 4-bit float"),
    ("fp8", "FP8 — E4M3 / E5M2"),
    ("smoothquant", "SmoothQuant — W8A8"),
    ("llm_int8", "LLM.int8() — int8 + fp16 outliers"),
]
# Which settings rows each method uses (row keys of `QuantizeView._rows`).
METHOD_ROWS = {
    "rtn": ("bits", "granularity", "group_size", "sym", "clip"),
    "gptq": ("bits", "granularity", "group_size", "sym", "damp", "act_order"),
    "awq": ("bits", "group_size", "sym", "grid", "awq_clip"),
    "nf4": ("blocksize", "double_quant"),
    "fp4": ("blocksize", "double_quant"),
    "fp8": ("fp8_fmt", "fp8_granularity"),
    "smoothquant": ("alpha", "act_scheme"),
    "llm_int8": ("threshold",),
}
LOG_LINES = 2000
# The bar counts in steps of 1/SUBSTEPS of a linear, so a method's progress inside one linear
# (GPTQ's column blocks) moves it smoothly without ever passing the linears done.
SUBSTEPS = 1000
# Progress bar, stage and ETA labels and new log lines reach the widgets at most this often while
# a job runs: every widget update is a repaint on the UI thread (QProgressBar.setValue paints at
# once), and a fast job sends several events per frame.
STATUS_REFRESH_MS = 100


class QuantizeView(QWidget):
    error = Signal(str, str)
    status = Signal(str)
    job_finished = Signal(object)  # QuantResult
    job_started = Signal(object)  # QuantJob
    open_output = Signal(str)

    def __init__(self, state: AppState, theme: ThemeManager, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self.theme = theme
        self.runner = TaskRunner(self)
        self.last_job: QuantJob | None = None
        self.last_result: Any = None
        self._proposed_out = ""  # the output folder this view last filled in itself
        self._t0 = 0.0
        self._stage = ""
        self._layers_total = 0
        self._layers_done = 0
        self._stage_total = 0
        self._current_linear = ""
        self._pending_log: list[str] = []
        self._pending_range: tuple[int, int] | None = None  # progress bar (maximum, value); 0 = busy
        self._pending_stage: str | None = None
        self._pending_eta: str | None = None
        self._status_timer = QTimer(self)
        self._status_timer.setSingleShot(True)
        self._status_timer.setInterval(STATUS_REFRESH_MS)
        self._status_timer.timeout.connect(self._flush_status)

        # ---------------- method and settings
        self.method = QComboBox()
        for key, label in METHODS:
            self.method.addItem(label, key)
        self.bits = QSpinBox()
        self.bits.setRange(2, 8)
        self.bits.setValue(4)
        self.granularity = QComboBox()
        for g in (Granularity.GROUP, Granularity.CHANNEL, Granularity.TENSOR):
            self.granularity.addItem(g.value, g.value)
        self.group_size = QComboBox()
        self.group_size.setEditable(True)
        for g in (32, 64, 128, 256):
            self.group_size.addItem(str(g))
        self.group_size.setCurrentText("128")
        self.sym = QComboBox()
        self.sym.addItem("symmetric", True)
        self.sym.addItem("asymmetric (zero point)", False)
        self.clip = QCheckBox("search clip ratio per group")
        self.damp = QDoubleSpinBox()
        self.damp.setDecimals(3)
        self.damp.setRange(0.001, 0.5)
        self.damp.setSingleStep(0.005)
        self.damp.setValue(0.01)
        self.act_order = QCheckBox("act-order (columns by Hessian diagonal)")
        self.grid = QSpinBox()
        self.grid.setRange(2, 100)
        self.grid.setValue(20)
        self.awq_clip = QCheckBox("clipping search")
        self.awq_clip.setChecked(True)
        self.blocksize = QComboBox()
        for b in (32, 64, 128, 256):
            self.blocksize.addItem(str(b), b)
        self.blocksize.setCurrentIndex(1)
        self.double_quant = QCheckBox("double quantization (quantize the absmax)")
        self.fp8_fmt = QComboBox()
        self.fp8_fmt.addItems(["e4m3", "e5m2"])
        self.fp8_granularity = QComboBox()
        self.fp8_granularity.addItems(["channel", "tensor"])
        self.alpha = QDoubleSpinBox()
        self.alpha.setRange(0.0, 1.0)
        self.alpha.setSingleStep(0.05)
        self.alpha.setValue(0.5)
        self.alpha_auto = QCheckBox("auto (searched per layer)")
        self.alpha_auto.setToolTip("Pick α per layer and input: the value whose W8A8 output error is smallest "
                                   "on a calibration sample")
        self.alpha_auto.toggled.connect(self.alpha.setDisabled)
        alpha_row = QWidget()
        alpha_layout = QHBoxLayout(alpha_row)
        alpha_layout.setContentsMargins(0, 0, 0, 0)
        alpha_layout.addWidget(self.alpha)
        alpha_layout.addWidget(self.alpha_auto)
        self.act_scheme = QComboBox()
        self.act_scheme.addItem("dynamic (per token)", "dynamic")
        self.act_scheme.addItem("static (per tensor, calibrated)", "static")
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.1, 1000)
        self.threshold.setValue(6.0)

        self.settings_form = QFormLayout()
        self.settings_form.addRow("Method", self.method)
        self._rows: dict[str, QWidget] = {}
        for key, label, widget in (
            ("bits", "Bits", self.bits), ("granularity", "Granularity", self.granularity),
            ("group_size", "Group size", self.group_size), ("sym", "Zero point", self.sym),
            ("clip", "", self.clip), ("damp", "Damping", self.damp), ("act_order", "", self.act_order),
            ("grid", "α grid", self.grid), ("awq_clip", "", self.awq_clip), ("blocksize", "Block size", self.blocksize),
            ("double_quant", "", self.double_quant), ("fp8_fmt", "FP8 format", self.fp8_fmt),
            ("fp8_granularity", "Scale", self.fp8_granularity), ("alpha", "α (migration)", alpha_row),
            ("act_scheme", "Activations", self.act_scheme), ("threshold", "Outlier threshold", self.threshold),
        ):
            self.settings_form.addRow(label, widget)
            self._rows[key] = widget
        for key, widget in self._rows.items():
            if key in TERMS:
                (self.alpha if key == "alpha" else widget).setToolTip(TERMS[key])
        # Below the group size: shown when it leaves a ragged last group in the open model.
        self.group_note = QLabel("")
        self.group_note.setWordWrap(True)
        self.settings_form.insertRow(self.settings_form.getWidgetPosition(self.group_size)[0] + 1, "", self.group_note)
        self.settings_form.setRowVisible(self.group_note, False)
        # Right under the method, not below the fold: why these settings cannot run.
        self.settings_error = QLabel("")
        self.settings_error.setObjectName("Error")
        self.settings_error.setWordWrap(True)
        self.settings_form.insertRow(1, "", self.settings_error)
        self.settings_form.setRowVisible(self.settings_error, False)

        # ---------------- calibration
        self.calib_source = QComboBox()
        self.calib_source.addItem("built-in (Python docs)", "builtin")
        self.calib_source.addItem("text / JSONL file…", "file")
        self.calib_file = QLineEdit()
        self.calib_file.setPlaceholderText("path to .txt or .jsonl")
        self.samples = QSpinBox()
        self.samples.setRange(1, 4096)
        self.samples.setValue(128)
        self.seq_len = QSpinBox()
        self.seq_len.setRange(8, 32768)
        self.seq_len.setValue(512)
        self.calib_box = QGroupBox("Calibration")
        cf = QFormLayout(self.calib_box)
        cf.addRow("Source", self.calib_source)
        cf.addRow("File", self.calib_file)
        cf.addRow("Samples", self.samples)
        cf.addRow("Sequence length", self.seq_len)
        self.calib_source.currentIndexChanged.connect(self._calib_source_changed)
        for key in ("samples", "seq_len", "calib_source"):
            getattr(self, key).setToolTip(TERMS[key])

        # ---------------- output
        self.out_dir = QLineEdit()
        self.out_dir.setPlaceholderText("output folder (must not exist unless overwrite)")
        browse = QPushButton(icon("folder"), "")
        browse.setToolTip("Choose the output folder")
        browse.clicked.connect(self._browse_out)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out_dir, 1)
        out_row.addWidget(browse)
        self.export = QComboBox()
        self.export.setToolTip("Checkpoint layouts that can represent this method's output")
        self.overwrite = QCheckBox("overwrite an existing folder")
        self.device_picker = DevicePicker(state, what="the quantization", auto_tip=QUANTIZE_AUTO_TIP)
        out_box = QGroupBox("Output")
        of = QFormLayout(out_box)
        of.addRow("Folder", out_row)
        of.addRow("Format", self.export)
        of.addRow("", self.overwrite)
        of.addRow("Run on", self.device_picker)
        self.out_dir.textChanged.connect(self._update_run_state)
        self.overwrite.toggled.connect(self._update_run_state)

        self.memory = QLabel()
        self.memory.setWordWrap(True)
        self.memory.setObjectName("Muted")

        settings_box = QGroupBox("Method")
        settings_box.setLayout(self.settings_form)
        left = QWidget()
        ll = QVBoxLayout(left)
        ll.setContentsMargins(0, 0, 4, 0)
        ll.addWidget(settings_box)
        ll.addWidget(self.calib_box)
        ll.addWidget(out_box)
        ll.addWidget(self.memory)
        ll.addStretch(1)
        for combo in left.findChildren(QComboBox):
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(10)
        left_scroll = QScrollArea()
        left_scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        left_scroll.setWidget(left)
        left_scroll.setWidgetResizable(True)
        left_scroll.setMinimumWidth(340)

        # ---------------- run panel
        self.run_button = QPushButton(icon("run"), "Run")
        self.run_button.setObjectName("Primary")
        self.run_button.setToolTip("Start quantizing (Ctrl+R)")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton(icon("stop"), "Cancel")
        self.cancel_button.setObjectName("Danger")
        self.cancel_button.setEnabled(False)
        self.cancel_button.setToolTip("Stop after the current linear; nothing is written (Ctrl+.)")
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        # Both change with every event of a running job: LiveText repaints only itself.
        self.stage = LiveText("Idle", sample="quantize: linear 000/000 — model.layers.00.mlp.gate_proj")
        self.eta = LiveText("", sample="elapsed 00 min 00 s · ETA 00 min 00 s")
        self.eta.setAlignment(Qt.AlignmentFlag.AlignRight)
        self.eta.setObjectName("Muted")
        # Why Run is disabled, checked when the model, the settings or the output folder change,
        # instead of a failure seconds after Run (DESIGN: validate where the input is chosen).
        self.run_blocked = QLabel()
        self.run_blocked.setObjectName("Error")
        self.run_blocked.setWordWrap(True)
        self.run_blocked.setVisible(False)
        self._paint_errors()
        theme.changed.connect(self._paint_errors)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.progress, 1)
        info = QHBoxLayout()
        info.addWidget(self.stage, 1)
        info.addWidget(self.eta)

        self.plot = LayerErrorPlot(theme)
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(LOG_LINES)
        self.log.setPlaceholderText("Events from the quantization job appear here.")
        right_split = QSplitter(Qt.Orientation.Vertical)
        right_split.addWidget(self.plot)
        right_split.addWidget(self.log)
        right_split.setStretchFactor(0, 3)
        right_split.setStretchFactor(1, 1)
        right = QWidget()
        rl = QVBoxLayout(right)
        rl.setContentsMargins(4, 0, 0, 0)
        rl.addLayout(buttons)
        rl.addWidget(self.run_blocked)
        rl.addLayout(info)
        rl.addWidget(right_split, 1)

        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(left_scroll)
        split.addWidget(right)
        split.setStretchFactor(1, 1)
        split.setSizes([380, 800])
        layout = QVBoxLayout(self)
        layout.addWidget(split)

        # ---------------- wiring
        self.method.currentIndexChanged.connect(self._method_changed)
        for w in (self.bits, self.samples, self.seq_len):
            w.valueChanged.connect(self._settings_changed)
        for w in (self.granularity, self.sym, self.blocksize, self.fp8_fmt, self.fp8_granularity, self.act_scheme):
            w.currentIndexChanged.connect(self._settings_changed)
        self.group_size.currentTextChanged.connect(self._settings_changed)
        self.double_quant.toggled.connect(self._settings_changed)
        self.runner.event.connect(self._on_event)
        self.runner.finished.connect(self._on_finished)
        self.runner.failed.connect(self._on_failed)
        self.runner.cancelled.connect(self._on_cancelled)
        self.runner.running_changed.connect(self._running_changed)
        state.model_changed.connect(self._model_changed)
        state.gpu_changed.connect(self._settings_changed)
        self._method_changed()
        self._calib_source_changed()

    # ------------------------------------------------------------ config
    def method_key(self) -> str:
        return str(self.method.currentData())

    def set_method(self, key: str) -> None:
        idx = self.method.findData(key)
        if idx < 0:
            raise ValueError(f"unknown method {key!r} (use one of {', '.join(k for k, _ in METHODS)})")
        self.method.setCurrentIndex(idx)

    def _group_size(self) -> int:
        text = self.group_size.currentText().strip()
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"group size must be a whole number such as 128, got {text!r}") from None

    def build_method_config(self) -> Any:
        """The frozen config for the current settings; ValueError (from the config) when invalid."""
        m = self.method_key()
        if m == "rtn":
            return RTNConfig(bits=self.bits.value(), group_size=self._group_size(), sym=self.sym.currentData(),
                             granularity=self.granularity.currentData(), clip_search=self.clip.isChecked())
        if m == "gptq":
            return GPTQConfig(bits=self.bits.value(), group_size=self._group_size(), sym=self.sym.currentData(),
                              granularity=self.granularity.currentData(), damp=self.damp.value(),
                              act_order=self.act_order.isChecked())
        if m == "awq":
            return AWQConfig(bits=self.bits.value(), group_size=self._group_size(), sym=self.sym.currentData(),
                             grid=self.grid.value(), clip=self.awq_clip.isChecked())
        if m in ("nf4", "fp4"):
            return FourBitConfig(quant_type=m, blocksize=int(self.blocksize.currentData()),
                                 double_quant=self.double_quant.isChecked())
        if m == "fp8":
            return FP8Config(fmt=self.fp8_fmt.currentText(), granularity=self.fp8_granularity.currentText())
        if m == "smoothquant":
            alpha = "auto" if self.alpha_auto.isChecked() else self.alpha.value()
            return SmoothQuantConfig(alpha=alpha, act_scheme=self.act_scheme.currentData())
        return LLMInt8Config(threshold=self.threshold.value())

    def build_calib(self) -> CalibConfig | None:
        if self.method_key() not in CALIBRATED_METHODS:
            return None
        source = "builtin" if self.calib_source.currentData() == "builtin" else self.calib_file.text().strip()
        if not source:
            raise ValueError("choose a calibration file (.txt or .jsonl) or the built-in corpus")
        return CalibConfig(source=source, samples=self.samples.value(), seq_len=self.seq_len.value())

    def build_job(self) -> QuantJob:
        model = self.state.model
        if model is None or model.path is None:
            raise ValueError("open a model folder with weights first (catalog entries can only be planned)")
        if not model.has_weights:
            raise ValueError(f"{model.path} has no safetensors weights; quantizing needs them")
        out = self.out_dir.text().strip()
        if not out:
            raise ValueError("choose an output folder")
        out_path = Path(out).expanduser()
        if out_path.resolve() == model.path.resolve():
            raise ValueError("the output folder must differ from the model folder")
        export = self.export.currentData()
        return QuantJob(model=model.path, out=out_path, method=self.build_method_config(), calib=self.build_calib(),
                        export=export, overwrite=self.overwrite.isChecked(), device=self.device_picker.device())

    # ------------------------------------------------------------ run
    def run(self) -> bool:
        if self.runner.running:
            return False
        reason = self.run_blocker()
        if reason:
            self.error.emit("Cannot start", reason)
            return False
        try:
            job = self.build_job()
        except ValueError as exc:
            self.error.emit("Cannot start", str(exc))
            return False
        job = self._ask_resume(job)
        self.last_job = job
        self.last_result = None
        self._drop_status()
        self.plot.clear()
        self.log.clear()
        self._t0 = time.monotonic()
        self._layers_total = self._layers_done = self._stage_total = 0
        self._stage = self._current_linear = ""
        self.progress.setRange(0, 0)
        self.stage.setText("Starting…")
        self.eta.setText("")
        resumed = ", resuming the interrupted run" if job.resume else ""
        self._append_log(f"quantize {job.model} → {job.out} ({job.method.method}, export {job.export or 'default'}, "
                         f"device {job.device}{resumed})")
        self.runner.start(backend.run_quantization, job=job)
        self.job_started.emit(job)
        self.status.emit(f"Quantizing {job.model.name} with {job.method.method}…")
        return True

    def _ask_resume(self, job: QuantJob) -> QuantJob:
        """When an earlier run into the same folder was interrupted, offer to continue it from its
        last finished layer; declining starts afresh (the engine replaces the leftover)."""
        if job.resume:
            return job
        try:
            found = backend.find_interrupted(job.out)
        except (OSError, ValueError):
            found = None
        if found is None:
            return job
        answer = QMessageBox.question(
            self, "Resume interrupted job?", found.describe() + "\n\nResume from the last finished layer?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.Yes)
        if answer == QMessageBox.StandardButton.Yes:
            return dataclasses.replace(job, resume=True)
        return job

    def cancel(self) -> None:
        if self.runner.running:
            self._flush_status()
            self.stage.setText("Cancelling…")
            self.runner.cancel()

    def runners(self) -> list[TaskRunner]:
        return [self.runner]

    def layer_points(self) -> list[LayerPoint]:
        return list(self.plot.points)

    @Slot(object)
    def _on_event(self, ev: object) -> None:
        if isinstance(ev, LayerDone):
            self.plot.add_point(ev.name, ev.index, ev.metrics, ev.seconds)
            self._layers_total = ev.total
            done = ev.index + 1
            self._layers_done = done
            self._current_linear = ev.name
            self._pending_range = (max(ev.total, 1) * SUBSTEPS, done * SUBSTEPS)
            self._pending_stage = f"{self._stage or 'quantize'}: linear {done}/{ev.total} — {ev.name}"
            self._update_eta(done, ev.total)
        elif isinstance(ev, Progress):
            if ev.total:
                self._on_progress(ev)
        elif isinstance(ev, StageStarted):
            self._stage = ev.stage
            self._stage_total = ev.total
            if ev.stage == "quantize" and ev.total:
                self._layers_total = ev.total
            self._pending_stage = f"{ev.stage} {ev.message}".strip()
            self._pending_range = (ev.total * SUBSTEPS, 0) if ev.total else (0, 0)
            self._queue_log(f"[{ev.stage}] {ev.message}".rstrip())
        elif isinstance(ev, Log):
            self._queue_log(f"{ev.level}: {ev.message}")
        elif isinstance(ev, MemorySample):
            gpu = f", GPU {ev.gpu_gib:.2f} GiB" if ev.gpu_gib is not None else ""
            self.eta.setToolTip(f"RSS {ev.rss_gib:.2f} GiB{gpu}")
            return
        else:
            return  # Finished: the function's return value arrives through `finished`
        if not self._status_timer.isActive():
            self._status_timer.start()

    def _on_progress(self, ev: Progress) -> None:
        """A Progress of the stage that is running moves the bar; one from a different stage is
        a step *inside* the current linear (GPTQ's column blocks): it advances the bar within that
        linear's share and is named after the linear, so the bar never jumps to 100 % and back."""
        if ev.stage == self._stage or not self._stage:
            if ev.stage == "quantize":
                self._layers_total, self._layers_done = ev.total, ev.done
            self._pending_range = (ev.total * SUBSTEPS, ev.done * SUBSTEPS)
            if ev.stage != "quantize":
                self._pending_stage = f"{ev.stage}: {ev.done}/{ev.total} {ev.message}".strip()
            return
        total = self._layers_total
        if total <= 0:
            return  # a nested step before the run has said how many linears there are
        fraction = min(max(ev.done / ev.total, 0.0), 1.0)
        base = min(self._layers_done, total - 1)
        self._pending_range = (total * SUBSTEPS, base * SUBSTEPS + int(fraction * (SUBSTEPS - 1)))
        name = ev.message or self._current_linear
        self._pending_stage = (f"{self._stage}: linear {base + 1}/{total} — {name} "
                               f"({ev.stage} {ev.done}/{ev.total} columns)")
        self._update_eta(base + fraction, total)

    def _update_eta(self, done: float, total: int) -> None:
        elapsed = time.monotonic() - self._t0
        if done <= 0 or total <= 0:
            return
        remaining = elapsed / done * (total - done)
        self._pending_eta = f"elapsed {_fmt_seconds(elapsed)} · ETA {_fmt_seconds(remaining)}"

    def _queue_log(self, line: str) -> None:
        self._pending_log.append(f"{time.strftime('%H:%M:%S')}  {line}")

    def _flush_status(self) -> None:
        """Show what the job's events changed since the last refresh."""
        self._status_timer.stop()
        if self._pending_range is not None:
            maximum, value = self._pending_range
            self.progress.setRange(0, maximum)
            self.progress.setValue(value)
        if self._pending_stage is not None:
            self.stage.setText(self._pending_stage)
        if self._pending_eta is not None:
            self.eta.setText(self._pending_eta)
        if self._pending_log:
            self.log.appendPlainText("\n".join(self._pending_log))
        self._drop_status()

    def _drop_status(self) -> None:
        self._status_timer.stop()
        self._pending_log = []
        self._pending_range = self._pending_stage = self._pending_eta = None

    @Slot(object)
    def _on_finished(self, result: Any) -> None:
        self._flush_status()
        self.plot.flush()
        self.last_result = result
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        wall = time.monotonic() - self._t0
        seconds = float(getattr(result, "seconds", wall))
        out = getattr(result, "output", None)
        # Two clocks, both named: the wall time the user waited (job process start-up, imports
        # and export included) and the engine's own time (read, calibrate, quantize, write).
        self.stage.setText(f"Done in {_fmt_seconds(wall)} (engine {_fmt_seconds(seconds)}) → {out}")
        self.stage.setToolTip(f"{_fmt_seconds(wall)}: wall time from Run to the result, including starting the "
                              f"job process and importing torch/transformers.\n{_fmt_seconds(seconds)}: the "
                              "engine's own time to read, calibrate, quantize and write the output.")
        self.eta.setText(f"peak RSS {getattr(result, 'peak_rss_gib', float('nan')):.2f} GiB")
        self._append_log(f"finished: {len(self.plot.points)} linears on {getattr(result, 'device', '?')}, "
                         f"{wall:.1f} s wall time ({seconds:.1f} s in the engine), output {out}")
        self.status.emit(f"Quantized into {out}")
        self.job_finished.emit(result)

    @Slot(object, str)
    def _on_failed(self, exc: object, tb: str) -> None:
        self._flush_status()
        self.plot.flush()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.stage.setText("Failed")
        self._append_log(f"error: {exc}")
        self.error.emit("Quantization failed", self.gui_words(str(exc) or type(exc).__name__))
        self._update_run_state()

    def gui_words(self, message: str) -> str:
        """A core message names CLI flags; here the same advice names this window's controls."""
        for flag, words in ((" pass --overwrite", f" tick “{self.overwrite.text()}”"),
                            ("--overwrite", f"“{self.overwrite.text()}”"), ("another --out", "another output folder"),
                            ("--out", "the output folder"), ("another --method", "another method"),
                            ("another --export", "another output format"), ("--export", "the output format"),
                            ("--group-size", "the group size"), ("--bits", "the bits"), ("--samples", "the samples"),
                            ("--seq-len", "the sequence length"), ("--calib", "the calibration source"),
                            ("group_size", "group size")):
            message = message.replace(flag, words)
        return message

    @Slot()
    def _on_cancelled(self) -> None:
        self._flush_status()
        self.plot.flush()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.stage.setText("Cancelled — nothing was written")
        self.eta.setText("")
        self._append_log("cancelled by user; partial output removed")
        self.status.emit("Quantization cancelled")

    @Slot(bool)
    def _running_changed(self, running: bool) -> None:
        # A job that just finished has created its output folder: Run is blocked until the
        # overwrite box is ticked or another folder chosen, and the panel says so.
        self._update_run_state()
        self.cancel_button.setEnabled(running)
        self.method.setEnabled(not running)
        self.device_picker.setEnabled(not running)

    def _append_log(self, line: str) -> None:
        self._queue_log(line)
        self._flush_status()

    # ------------------------------------------------------------ form updates
    def apply_plan_format(self, fmt_name: str) -> bool:
        """Set method and settings that produce the Plan row `fmt_name`; False when this tab
        cannot write that format."""
        settings = backend.plan_format_settings(fmt_name)
        if settings is None:
            return False
        self.set_method(settings["method"])
        if "bits" in settings and settings["method"] in ("rtn", "gptq", "awq"):
            self.bits.setValue(settings["bits"])
        group = settings.get("group_size")
        if settings["method"] in ("rtn", "gptq", "awq"):
            if group:
                self.granularity.setCurrentIndex(self.granularity.findData(Granularity.GROUP.value))
                self.group_size.setCurrentText(str(group))
            else:
                self.granularity.setCurrentIndex(self.granularity.findData(Granularity.CHANNEL.value))
            self.sym.setCurrentIndex(self.sym.findData(bool(settings.get("sym", True))))
        if "double_quant" in settings:
            self.double_quant.setChecked(settings["double_quant"])
        if settings.get("blocksize"):
            idx = self.blocksize.findData(settings["blocksize"])
            if idx >= 0:
                self.blocksize.setCurrentIndex(idx)
        self._settings_changed()
        self.status.emit(f"Quantize set up for {settings['label']} ({self.method.currentText()})")
        return True

    def _method_changed(self) -> None:
        m = self.method_key()
        used = METHOD_ROWS[m]
        for key, widget in self._rows.items():
            self.settings_form.setRowVisible(widget, key in used)
        if m == "awq":
            self.sym.setCurrentIndex(1)  # AWQ's usual layout is asymmetric with zero points
        self.calib_box.setVisible(m in CALIBRATED_METHODS)
        self._refresh_default_out()
        self._settings_changed()

    def _paint_errors(self, *_: object) -> None:
        # The style sheets have no error colour; the theme's red, as the Results tab does.
        colour = self.theme.palette.modules["o"]
        for label in (self.settings_error, self.run_blocked):
            label.setStyleSheet(f"color: {colour}; font-weight: 600;")

    def set_out_dir(self, path: str) -> None:
        """An output folder chosen outside this view (remembered for the model): kept like a typed one."""
        self._proposed_out = ""
        self.out_dir.setText(path)

    def default_out(self) -> str:
        """`<model folder>-<method>` beside the model folder ("" without a local model)."""
        model = self.state.model
        if model is None or model.path is None:
            return ""
        return str(model.path.parent / f"{model.path.name}-{self.method_key()}")

    def _refresh_default_out(self) -> None:
        """Follow the model and the method while the folder is the one this view proposed; a
        folder the user typed or browsed to is theirs and stays."""
        text = self.out_dir.text().strip()
        if text and text != self._proposed_out:
            return
        proposed = self.default_out()
        if proposed:
            self._proposed_out = proposed
            self.out_dir.setText(proposed)

    def _calib_source_changed(self) -> None:
        is_file = self.calib_source.currentData() == "file"
        self.calib_file.setEnabled(is_file)
        if is_file and not self.calib_file.text():
            path, _ = QFileDialog.getOpenFileName(self, "Calibration text", "", "Text (*.txt *.jsonl);;All files (*)")
            if path:
                self.calib_file.setText(path)
        self._settings_changed()

    def _model_changed(self, choice: ModelChoice | None) -> None:
        # A folder typed for the previous model was that model's; the new one gets its own
        # proposal (the main window then restores the folder remembered for it, if any).
        self._proposed_out = self.out_dir.text().strip()
        self._refresh_default_out()
        if choice is not None and choice.has_weights:
            self._offer_group_sizes(backend.valid_group_sizes(choice.source))
        self._settings_changed()

    def _offer_group_sizes(self, sizes: list[int]) -> None:
        """Offer the group sizes that fit the model (one that does not divide a linear's width,
        such as 128 on SmolLM2's 576, leaves a ragged last group: see `group_note`), keeping the
        current choice when it still fits, else the largest up to 128."""
        if not sizes:
            return
        current = self.group_size.currentText()
        self.group_size.blockSignals(True)
        self.group_size.clear()
        for g in sizes:
            self.group_size.addItem(str(g))
        if current in {str(g) for g in sizes}:
            self.group_size.setCurrentText(current)
        else:
            self.group_size.setCurrentText(str(max((g for g in sizes if g <= 128), default=sizes[0])))
        self.group_size.blockSignals(False)

    def _browse_out(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Output folder (a new folder is created inside)")
        if folder:
            name = self.state.model.label if self.state.model else "model"
            self.out_dir.setText(str(Path(folder) / f"{name}-{self.method_key()}"))

    def _settings_changed(self, *_: object) -> None:
        try:
            config = self.build_method_config()
        except ValueError as exc:
            # Nothing derived from the last valid settings may stay: the ragged note described
            # another group size, and an empty Format box looked like a bug.
            self.settings_error.setText(f"⚠ {self.gui_words(str(exc))}")
            self.settings_form.setRowVisible(self.settings_error, True)
            self.group_note.setText("")
            self.group_size.setToolTip(tip("group_size"))
            self.settings_form.setRowVisible(self.group_note, False)
            self.memory.setText("")
            self.export.clear()
            self.export.addItem("— fix the settings above —", None)
            self.export.setEnabled(False)
            self._update_run_state()
            return
        self.settings_error.setText("")
        self.settings_form.setRowVisible(self.settings_error, False)
        self.export.setEnabled(True)
        self._refresh_exports(config)
        self._refresh_memory(config)
        self._update_run_state()

    def run_blocker(self) -> str:
        """Why Run cannot start with what is chosen now, in the words of this window; "" when it can."""
        model = self.state.model
        if model is None:
            return "Open a model folder to quantize (File ▸ Open, or drop a folder on the window)."
        if model.path is None:
            return f"{model.label} is a catalog entry (config only): it can be planned, not quantized. Open its model folder."
        if not model.has_weights:
            return f"{model.path.name} has no safetensors weights: quantizing needs them."
        if model.is_quantized:
            return (f"{model.path.name} is already quantized. Open the original model folder to quantize "
                    "it again; this one can be planned, inspected and evaluated.")
        if not getattr(model.source, "supported", True):
            arch = getattr(model.source, "architecture", "?")
            return (f"The {arch} architecture cannot be quantized yet (supported: "
                    f"{', '.join(backend.supported_architectures())}). Plan and Inspect still work.")
        try:
            self.build_method_config()
        except ValueError as exc:
            return f"Method settings: {self.gui_words(str(exc))}"
        out = self.out_dir.text().strip()
        if not out:
            return "Choose an output folder."
        out_path = Path(out).expanduser()
        if out_path.resolve() == model.path.resolve():
            return "The output folder must differ from the model folder."
        if out_path.exists() and not out_path.is_dir():
            return f"{out_path} is a file; choose a folder for the output."
        if not out_path.exists() and not out_path.parent.is_dir():
            return f"The folder {out_path.parent} does not exist: create it or choose another output folder."
        if out_path.exists() and not self.overwrite.isChecked():
            return (f"The output folder {out_path.name} already exists: tick “{self.overwrite.text()}” "
                    "or choose another folder.")
        return ""

    def _update_run_state(self, *_: object) -> None:
        reason = self.run_blocker()
        self.run_blocked.setText(reason if self.state.model is not None else "")
        self.run_blocked.setVisible(bool(reason) and self.state.model is not None)
        self.run_button.setEnabled(not self.runner.running and not reason)
        self.run_button.setToolTip(reason or "Start quantizing (Ctrl+R)")

    def _refresh_exports(self, config: Any) -> None:
        current = self.export.currentData()
        model = self.state.model
        source = model.source if model is not None and model.has_weights else None
        names = backend.exports_for(config, source)
        default = backend.default_export_for(config, source)
        note = backend.ragged_group_note(source, config) if source is not None else ""
        self.group_note.setText(note)
        self.group_size.setToolTip(tip("group_size", note))
        self.settings_form.setRowVisible(self.group_note, bool(note))
        self.export.blockSignals(True)
        self.export.clear()
        for name in names:
            self.export.addItem(f"{name} (default)" if name == default else name, name)
        idx = self.export.findData(current if current in names else default)
        self.export.setCurrentIndex(max(idx, 0))
        self.export.blockSignals(False)

    def _refresh_memory(self, config: Any) -> None:
        model = self.state.model
        if model is None:
            self.memory.setText("Open a model to see the memory this job needs.")
            return
        try:
            calib = self.build_calib()
        except ValueError:
            calib = None
        text, tip = backend.quantize_memory_text(model.source, config, calib)
        self.memory.setText(text)
        self.memory.setToolTip(tip)


def _fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"
