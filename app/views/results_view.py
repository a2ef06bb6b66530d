"""Results tab: what the last job produced, before/after perplexity and KL divergence (evaluated
on a worker thread), the per-layer plot, and saving a report (JSON + PNG + HTML)."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from core.events import Progress, StageStarted

from app import backend
from app.device_picker import EVALUATE_AUTO_TIP, DevicePicker
from app.help_text import TERMS
from app.report import build_report, write_report
from app.resources import icon
from app.state import AppState
from app.theme import ThemeManager
from app.views.layer_plot import LayerErrorPlot, LayerPoint
from app.worker import TaskRunner

EVAL_PASSES = 2  # the original model, then the quantized one
EVAL_STEPS = 1000


def _fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60:02d} s"


class ResultsView(QWidget):
    error = Signal(str, str)
    status = Signal(str)
    evaluated = Signal(object)

    def __init__(self, state: AppState, theme: ThemeManager, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self.job: Any = None
        self.result: Any = None
        self.evaluation: dict[str, Any] | None = None
        self.runner = TaskRunner(self)
        self._eval_t0 = 0.0
        self._eval_pass = -1  # 0: the original model, 1: the quantized one
        self._eval_pass_name = ""
        self.verification: dict[str, Any] | None = None  # the export check's outcome, for the report

        self.summary = QLabel("Run a quantization to see its results here.")
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.seq_len = QSpinBox()
        self.seq_len.setRange(16, 8192)
        self.seq_len.setValue(256)
        self.windows = QSpinBox()
        self.windows.setRange(1, 1024)
        self.windows.setValue(8)
        self.windows.setToolTip(TERMS["windows"])
        self.seq_len.setToolTip(TERMS["eval_seq_len"])
        self.device_picker = DevicePicker(state, what="the evaluation", auto_tip=EVALUATE_AUTO_TIP)
        self.auto = QCheckBox("evaluate automatically after each job")
        self.auto.setChecked(True)
        self.eval_button = QPushButton(icon("run"), "Evaluate before / after")
        self.eval_button.setObjectName("Primary")
        self.eval_button.clicked.connect(self.evaluate)
        self.eval_button.setEnabled(False)
        self.eval_cancel = QPushButton(icon("stop"), "Cancel")
        self.eval_cancel.setEnabled(False)
        self.eval_cancel.clicked.connect(self.runner.cancel)
        self.eval_progress = QProgressBar()
        self.eval_progress.setRange(0, 1)
        self.eval_progress.setValue(0)

        self.ppl_before = QLabel("—")
        self.ppl_after = QLabel("—")
        self.ppl_change = QLabel("—")
        self.kl = QLabel("—")
        for lab in (self.ppl_before, self.ppl_after, self.ppl_change, self.kl):
            lab.setObjectName("Heading")
        metrics = QGroupBox("Quality (built-in text)")
        mf = QFormLayout(metrics)
        mf.addRow("Perplexity before", self.ppl_before)
        mf.addRow("Perplexity after", self.ppl_after)
        mf.addRow("Change", self.ppl_change)
        mf.addRow("KL divergence (nats/token)", self.kl)
        controls = QHBoxLayout()
        controls.addWidget(QLabel("Windows"))
        controls.addWidget(self.windows)
        controls.addWidget(QLabel("× tokens"))
        controls.addWidget(self.seq_len)
        mf.addRow(controls)
        mf.addRow("Run on", self.device_picker)
        mf.addRow(self.auto)
        buttons = QHBoxLayout()
        buttons.addWidget(self.eval_button)
        buttons.addWidget(self.eval_cancel)
        mf.addRow(buttons)
        mf.addRow(self.eval_progress)

        # ---------------- verify export: load the written folder with its real consumer
        self.verify_runner = TaskRunner(self)
        self.verify_button = QPushButton(icon("run"), "Verify export")
        self.verify_button.setToolTip("Load the written output with its real consumer (transformers, vLLM "
                                      "layout, llama.cpp) and compare logits and perplexity with Quantscope's model")
        self.verify_button.clicked.connect(self.verify)
        self.verify_button.setEnabled(False)
        self.verify_status = QLabel("Not verified yet.")
        self.verify_status.setWordWrap(True)
        self.verify_status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.verify_report: Any = None
        verify_box = QGroupBox("Export check")
        vf = QVBoxLayout(verify_box)
        vf.addWidget(self.verify_button)
        vf.addWidget(self.verify_status)

        self.save_button = QPushButton(icon("save"), "Save report…")
        self.save_button.setToolTip("report.json, layers.png and report.html into a folder (Ctrl+E)")
        self.save_button.clicked.connect(self._ask_save)
        self.save_button.setEnabled(False)
        self.save_plot_button = QPushButton(icon("save"), "Save plot PNG…")
        self.save_plot_button.clicked.connect(self._ask_save_plot)
        self.save_plot_button.setEnabled(False)
        save_row = QHBoxLayout()
        save_row.addWidget(self.save_button)
        save_row.addWidget(self.save_plot_button)
        save_row.addStretch(1)

        left = QWidget()
        ll = QVBoxLayout(left)
        ll.addWidget(self.summary)
        ll.addWidget(metrics)
        ll.addWidget(verify_box)
        ll.addLayout(save_row)
        ll.addStretch(1)
        self.plot = LayerErrorPlot(theme)
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(left)
        split.addWidget(self.plot)
        split.setStretchFactor(1, 1)
        split.setSizes([380, 800])
        layout = QVBoxLayout(self)
        layout.addWidget(split)

        self.runner.event.connect(self._on_event)
        self.runner.finished.connect(self._on_evaluated)
        self.runner.failed.connect(self._on_failed)
        self.runner.cancelled.connect(self._on_cancelled)
        self.runner.running_changed.connect(self._running_changed)
        self.verify_runner.finished.connect(self._on_verified)
        self.verify_runner.failed.connect(self._on_verify_failed)
        self.verify_runner.cancelled.connect(self._on_verify_cancelled)
        self.verify_runner.running_changed.connect(self._verify_running_changed)

    def runners(self) -> list[TaskRunner]:
        return [self.runner, self.verify_runner]

    # ------------------------------------------------------------ job
    def set_job(self, job: Any, result: Any, points: list[LayerPoint]) -> None:
        self.job, self.result, self.evaluation = job, result, None
        self.plot.set_points(points)
        out = getattr(result, "output", None)
        errors = [p.metrics.get("rel_error") for p in points if p.metrics.get("rel_error") is not None]
        sqnr = [p.metrics.get("sqnr_db") for p in points if math.isfinite(p.metrics.get("sqnr_db", math.nan))]
        lines = [
            f"<b>{getattr(result, 'method', '?')}</b> → {out}",
            f"Export: {getattr(result, 'export', '?')}",
            f"{len(points)} linears, {getattr(result, 'seconds', 0.0):.1f} s in the engine "
            "(read, calibrate, quantize, write), "
            f"peak RSS {getattr(result, 'peak_rss_gib', math.nan):.2f} GiB",
        ]
        src, dst = getattr(result, "source_gib", 0.0), getattr(result, "output_gib", 0.0)
        if src and dst:
            lines.append(f"Size {src:.3f} GiB → {dst:.3f} GiB ({src / dst:.2f}× smaller)")
        if errors:
            lines.append(f"Relative error mean {sum(errors) / len(errors):.4f}, worst {max(errors):.4f}")
        if sqnr:
            lines.append(f"SQNR mean {sum(sqnr) / len(sqnr):.1f} dB, worst {min(sqnr):.1f} dB")
        self.summary.setText("<br>".join(lines))
        for lab in (self.ppl_before, self.ppl_after, self.ppl_change, self.kl):
            lab.setText("—")
        self.eval_button.setEnabled(out is not None)
        self.verify_report = None
        self.verification = None
        self._set_verify_state("", "Not verified yet.")
        self.verify_button.setEnabled(out is not None and not self.verify_runner.running)
        self.save_button.setEnabled(True)
        self.save_plot_button.setEnabled(True)
        if self.auto.isChecked() and out is not None:
            self.evaluate()

    # ------------------------------------------------------------ evaluation
    def evaluate(self) -> bool:
        if self.job is None or self.result is None:
            self.error.emit("Nothing to evaluate", "Run a quantization first.")
            return False
        self._eval_t0 = time.monotonic()
        self._eval_pass, self._eval_pass_name = -1, ""
        self.eval_progress.setRange(0, 0)
        self.eval_progress.setFormat("starting the evaluation…")
        self.runner.start(backend.evaluate_before_after, original=Path(self.job.model),
                          quantized=Path(self.result.output), seq_len=self.seq_len.value(),
                          windows=self.windows.value(), device=self.device_picker.device())
        self.status.emit(f"Evaluating perplexity before and after ({self.device_picker.currentText()})…")
        return True

    # ------------------------------------------------------------ verify export
    def output_path(self) -> Path | None:
        out = getattr(self.result, "output", None)
        return Path(out) if out is not None else None

    def source_path(self) -> Path | None:
        """The model folder the output was made from: the job's model, else what the output's
        report records. A GGUF's tokenization is checked against that folder's tokenizer."""
        model = getattr(self.job, "model", None)
        if model is not None and Path(model).is_dir():
            return Path(model)
        out = self.output_path()
        return backend.recorded_source(out) if out is not None and out.is_dir() else None

    def verify(self) -> bool:
        """Load the written output with its real consumer on a worker thread (core.export.verify)."""
        out = self.output_path()
        if out is None or not out.exists():
            self.error.emit("Nothing to verify", "Run a quantization first; the check loads the folder it wrote.")
            return False
        self.verify_report = None
        self.verification = None
        self._set_verify_state("", f"Verifying {out.name}: loading it with its consumer…")
        self.verify_runner.start(backend.verify_export, path=out, source=self.source_path())
        self.status.emit(f"Verifying the export in {out}…")
        return True

    def _set_verify_state(self, state: str, text: str) -> None:
        """state: "ok", "error" or "" (neutral); the label's objectName picks the theme's colour."""
        names = {"ok": "Success", "error": "Error"}
        self.verify_status.setObjectName(names.get(state, ""))
        self.verify_status.setProperty("verifyState", state)
        color = {"ok": "#1a7f37", "error": "#cf222e"}.get(state)
        self.verify_status.setStyleSheet(f"color: {color}; font-weight: 600;" if color else "")
        self.verify_status.setText(text)

    @Slot(object)
    def _on_verified(self, report: Any) -> None:
        self.verify_report = report
        self.verification = {"status": "ok" if report.ok else "mismatch", "output": str(self.output_path()),
                             **report.to_dict()}
        verdict = "OK" if report.ok else "MISMATCH"
        text = (f"{verdict} — loaded with {report.loader}<br>"
                f"max logit difference {report.max_logit_diff:.3g} (relative {report.rel_logit_diff:.3g}, "
                f"tolerance {report.tolerance:.3g})<br>"
                f"perplexity {report.ppl_loader:.3f} ({report.loader}) vs {report.ppl_quantscope:.3f} (Quantscope) "
                f"on {report.tokens} tokens")
        if getattr(report, "tokenizer_check", None):
            text += f"<br>tokenization agrees with the source model's tokenizer ({report.tokenizer_check})"
        self._set_verify_state("ok" if report.ok else "error", text)
        self.status.emit(f"Export verified: {verdict} with {report.loader}")
        if not report.ok:
            self.error.emit("Export verification failed", text.replace("<br>", "\n"))

    @Slot(object, str)
    def _on_verify_failed(self, exc: object, _tb: str) -> None:
        kind = "MISMATCH" if backend.is_verify_mismatch(exc) else "ERROR"
        msg = str(exc) or type(exc).__name__
        self.verification = {"status": kind.lower(), "output": str(self.output_path()), "message": msg}
        self._set_verify_state("error", f"{kind} — {msg}")
        self.status.emit(f"Export verification: {kind}")
        self.error.emit("Export verification failed", msg)

    @Slot()
    def _on_verify_cancelled(self) -> None:
        self._set_verify_state("", "Verification cancelled.")

    @Slot(bool)
    def _verify_running_changed(self, running: bool) -> None:
        self.verify_button.setEnabled(not running and self.output_path() is not None)

    @Slot(object)
    def _on_event(self, ev: object) -> None:
        """One bar for the whole evaluation: two passes (original, quantized) of equal share, each
        loading its model(s) and then running its windows; the ETA follows the windows done."""
        if isinstance(ev, StageStarted) and ev.stage == backend.COMPARE_STAGE:
            self._eval_pass = min(self._eval_pass + 1, EVAL_PASSES - 1)
            self._eval_pass_name = ev.message
            self._show_eval_progress(0.0, "starting")
        elif isinstance(ev, StageStarted) and ev.stage == "load":
            self._show_eval_progress(0.0, "loading the model" if "reference" not in ev.message
                                     else "loading the reference")
        elif isinstance(ev, StageStarted) and ev.message:
            self._show_eval_progress(0.0, ev.message)
        elif isinstance(ev, Progress) and ev.total:
            self._show_eval_progress(ev.done / ev.total, ev.message or f"{ev.done}/{ev.total}")

    def _show_eval_progress(self, fraction: float, what: str) -> None:
        step = max(self._eval_pass, 0)
        overall = (step + min(max(fraction, 0.0), 1.0)) / EVAL_PASSES
        self.eval_progress.setRange(0, EVAL_STEPS)
        self.eval_progress.setValue(int(overall * EVAL_STEPS))
        elapsed = time.monotonic() - self._eval_t0
        eta = ""
        if fraction > 0 and overall > 0:
            eta = f" · ETA {_fmt_seconds(elapsed / overall * (1.0 - overall))}"
        name = self._eval_pass_name or "evaluation"
        text = f"{name} ({step + 1} of {EVAL_PASSES}): {what} — %p%{eta}"
        self.eval_progress.setFormat(text.replace("%", "%%").replace("%%p%%", "%p%"))

    @Slot(object)
    def _on_evaluated(self, ev: dict[str, Any]) -> None:
        self.evaluation = ev
        self.eval_progress.setRange(0, 1)
        self.eval_progress.setValue(1)
        wall = time.monotonic() - self._eval_t0
        self.eval_progress.setFormat(f"done in {_fmt_seconds(wall)} on {ev.get('device', '?')}")
        self.ppl_before.setText(f"{ev['perplexity_before']:.3f}")
        self.ppl_after.setText(f"{ev['perplexity_after']:.3f}")
        change = ev.get("perplexity_change_pct")
        self.ppl_change.setText("—" if change is None else f"{change:+.2f} %")
        kl = ev.get("kl_divergence")
        self.kl.setText("—" if kl is None else f"{kl:.5f}")
        self.status.emit(f"Perplexity {ev['perplexity_before']:.2f} → {ev['perplexity_after']:.2f}")
        self.evaluated.emit(ev)

    @Slot(object, str)
    def _on_failed(self, exc: object, _tb: str) -> None:
        self.eval_progress.setRange(0, 1)
        self.eval_progress.setValue(0)
        self.eval_progress.setFormat("failed")
        self.error.emit("Evaluation failed", str(exc) or type(exc).__name__)

    @Slot()
    def _on_cancelled(self) -> None:
        self.eval_progress.setRange(0, 1)
        self.eval_progress.setValue(0)
        self.eval_progress.setFormat("cancelled")

    @Slot(bool)
    def _running_changed(self, running: bool) -> None:
        self.eval_button.setEnabled(not running and self.result is not None)
        self.eval_cancel.setEnabled(running)
        self.device_picker.setEnabled(not running)

    # ------------------------------------------------------------ saving
    def report(self) -> dict[str, Any]:
        return build_report(self.job, self.result, [p.to_json() for p in self.plot.points], self.evaluation,
                            self.verification)

    def save_report(self, folder: Path) -> dict[str, Path] | None:
        if self.job is None:
            self.error.emit("No report yet", "Run a quantization first; the report describes that run.")
            return None
        folder.mkdir(parents=True, exist_ok=True)
        png = folder / "layers.png"
        if not self.plot.save_png(str(png)):
            png = None
        try:
            paths = write_report(folder, self.report(), png)
        except OSError as exc:
            self.error.emit("Cannot save the report", f"{folder}: {exc}")
            return None
        self.status.emit(f"Report saved in {folder}")
        return paths

    def _ask_save(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save the report into a folder")
        if folder:
            self.save_report(Path(folder))

    def _ask_save_plot(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save the plot", "layers.png", "PNG (*.png)")
        if path and not self.plot.save_png(path):
            self.error.emit("Cannot save the plot", f"could not write {path}")
