"""The main window: model and GPU sidebar, Plan / Quantize / Inspect / Results tabs, menus,
status bar, drag and drop, themes and remembered state."""
from __future__ import annotations

import logging
from pathlib import Path

from PySide6.QtCore import Qt, Slot
from PySide6.QtGui import QAction, QActionGroup, QCloseEvent, QDragEnterEvent, QDropEvent, QKeySequence
from PySide6.QtWidgets import (
    QFileDialog,
    QMainWindow,
    QMessageBox,
    QScrollArea,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

import core
from app import backend
from app.device_picker import DevicePicker
from app.gpu_picker import GpuPicker
from app.model_picker import ModelPicker
from app.resources import icon
from app.settings import AppSettings, apply_widget_values, model_key, widget_values
from app.state import AppState, ModelChoice
from app.status import MemoryStatusBar
from app.theme import ThemeManager
from app.views.inspect_view import InspectView
from app.views.plan_view import PlanView
from app.views.quantize_view import QuantizeView
from app.views.results_view import ResultsView
from app.worker import TaskRunner

log = logging.getLogger(__name__)


class MainWindow(QMainWindow):
    def __init__(self, settings: AppSettings | None = None, theme: ThemeManager | None = None) -> None:
        super().__init__()
        self.setWindowTitle("Quantscope")
        self.setWindowIcon(icon("quantscope"))
        self.setAcceptDrops(True)
        self.settings = settings if settings is not None else AppSettings()
        self.theme = theme if theme is not None else ThemeManager(self)
        self.state = AppState(self)

        self.model_picker = ModelPicker()
        self.gpu_picker = GpuPicker(self.state)
        sidebar = QWidget()
        sidebar.setObjectName("Sidebar")
        side = QVBoxLayout(sidebar)
        side.setContentsMargins(8, 4, 8, 8)
        side.addWidget(self.model_picker)
        side.addWidget(self.gpu_picker)
        side.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidget(sidebar)
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setMinimumWidth(300)

        self.plan_view = PlanView(self.state, self.theme)
        self.quantize_view = QuantizeView(self.state, self.theme)
        self.inspect_view = InspectView(self.state, self.theme)
        self.results_view = ResultsView(self.state, self.theme)
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.tabs.addTab(self.plan_view, icon("plan"), "Plan")
        self.tabs.addTab(self.quantize_view, icon("quantize"), "Quantize")
        self.tabs.addTab(self.inspect_view, icon("inspect"), "Inspect")
        self.tabs.addTab(self.results_view, icon("results"), "Results")

        splitter = QSplitter(Qt.Orientation.Horizontal)
        splitter.setObjectName("MainSplitter")
        splitter.addWidget(scroll)
        splitter.addWidget(self.tabs)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([330, 1000])
        splitter.setChildrenCollapsible(False)
        self.splitter = splitter
        self.setCentralWidget(splitter)

        self.status = MemoryStatusBar(self)
        self.setStatusBar(self.status)

        # Demo-model preparation runs on its own worker so the window is usable meanwhile.
        self.demo_runner = TaskRunner(self)
        self.demo_runner.event.connect(self._on_demo_event)
        self.demo_runner.finished.connect(self._on_demo_ready)
        self.demo_runner.failed.connect(self._on_demo_failed)

        self.model_picker.chosen.connect(self.set_model)
        self.model_picker.error.connect(self.show_error)
        self.state.model_changed.connect(self.model_picker.show_model)
        self.quantize_view.error.connect(self.show_error)
        self.quantize_view.job_finished.connect(self._on_job_finished)
        self.quantize_view.open_output.connect(self.open_model_folder)
        self.results_view.error.connect(self.show_error)
        self.inspect_view.error.connect(self.show_error)
        self.plan_view.error.connect(self.show_error)
        self.plan_view.quantize_requested.connect(self.quantize_plan_format)
        # After the Quantize tab's own handler (connected first): the remembered folder wins over
        # the proposed one.
        self.state.model_changed.connect(self._restore_model_choices)
        self.quantize_view.job_started.connect(self._remember_model_choices)
        for view in (self.quantize_view, self.inspect_view, self.results_view):
            view.status.connect(self.status.show_message)

        self._build_menus()
        self.model_picker.set_recent(self.settings.recent_models())
        self._refresh_recent_menu()
        self.resize(1360, 860)
        geometry, state = self.settings.geometry(), self.settings.window_state()
        if geometry is not None:
            self.restoreGeometry(geometry)
        if state is not None:
            self.restoreState(state)
        self.apply_theme(self.settings.theme())
        self.restore_controls()

    # ------------------------------------------------------------ menus
    def _build_menus(self) -> None:
        bar = self.menuBar()
        file_menu = bar.addMenu("&File")
        self.open_action = QAction(icon("folder"), "&Open model folder…", self)
        self.open_action.setShortcut(QKeySequence.StandardKey.Open)
        self.open_action.triggered.connect(self.model_picker.browse)
        file_menu.addAction(self.open_action)
        self.demo_action = QAction("Open the &demo model (SmolLM2-135M)", self)
        self.demo_action.setShortcut(QKeySequence("Ctrl+D"))
        self.demo_action.triggered.connect(self.open_demo)
        file_menu.addAction(self.demo_action)
        self.recent_menu = file_menu.addMenu("Open &recent")
        file_menu.addSeparator()
        self.report_action = QAction(icon("report"), "&Export report…", self)
        self.report_action.setShortcut(QKeySequence("Ctrl+E"))
        self.report_action.triggered.connect(self.export_report)
        file_menu.addAction(self.report_action)
        file_menu.addSeparator()
        quit_action = QAction("&Quit", self)
        quit_action.setShortcut(QKeySequence.StandardKey.Quit)
        quit_action.triggered.connect(self.close)
        file_menu.addAction(quit_action)

        view_menu = bar.addMenu("&View")
        group = QActionGroup(self)
        self.theme_actions: dict[str, QAction] = {}
        for name in ("light", "dark"):
            act = QAction(f"{name.title()} theme", self, checkable=True)
            act.triggered.connect(lambda _=False, n=name: self.apply_theme(n))
            group.addAction(act)
            view_menu.addAction(act)
            self.theme_actions[name] = act
        toggle = QAction("Toggle theme", self)
        toggle.setShortcut(QKeySequence("Ctrl+Shift+T"))
        toggle.triggered.connect(lambda: self.apply_theme("dark" if self.theme.name == "light" else "light"))
        view_menu.addAction(toggle)
        view_menu.addSeparator()
        for i, name in enumerate(("Plan", "Quantize", "Inspect", "Results")):
            act = QAction(name, self)
            act.setShortcut(QKeySequence(f"Ctrl+{i + 1}"))
            act.triggered.connect(lambda _=False, idx=i: self.tabs.setCurrentIndex(idx))
            view_menu.addAction(act)

        run_menu = bar.addMenu("&Run")
        self.run_action = QAction(icon("run"), "&Quantize", self)
        self.run_action.setShortcut(QKeySequence("Ctrl+R"))
        self.run_action.triggered.connect(self._run_quantize)
        run_menu.addAction(self.run_action)
        self.cancel_action = QAction(icon("stop"), "&Cancel", self)
        self.cancel_action.setShortcut(QKeySequence("Ctrl+."))
        self.cancel_action.triggered.connect(self.quantize_view.cancel)
        run_menu.addAction(self.cancel_action)
        self.eval_action = QAction("&Evaluate before/after", self)
        self.eval_action.setShortcut(QKeySequence("Ctrl+Shift+E"))
        self.eval_action.triggered.connect(self.results_view.evaluate)
        run_menu.addAction(self.eval_action)

        help_menu = bar.addMenu("&Help")
        about = QAction("&About Quantscope", self)
        about.setShortcut(QKeySequence.StandardKey.HelpContents)
        about.triggered.connect(self.show_about)
        help_menu.addAction(about)

    def _refresh_recent_menu(self) -> None:
        self.recent_menu.clear()
        recent = self.settings.recent_models()
        for path in recent:
            act = self.recent_menu.addAction(path)
            act.triggered.connect(lambda _=False, p=path: self.open_model_folder(p))
        self.recent_menu.setEnabled(bool(recent))

    # ------------------------------------------------------------ models
    @Slot(object)
    def set_model(self, choice: ModelChoice) -> None:
        if choice.path is not None:
            recent = self.settings.add_recent_model(str(choice.path))
            self.model_picker.set_recent(recent)
            self._refresh_recent_menu()
        self.state.set_model(choice)
        self.setWindowTitle(f"Quantscope — {choice.label}")
        self.status.show_message(f"Opened {choice.label}")

    def open_model_folder(self, path: str | Path) -> ModelChoice | None:
        return self.model_picker.open_folder(path)

    def open_default(self, model: str | None = None) -> None:
        """What `quantscope gui` opens: the given folder or catalog id, else the demo model."""
        if model:
            if Path(model).expanduser().exists():
                self.open_model_folder(model)
            else:
                self.model_picker.open_catalog(model)
            return
        self.open_demo()

    def open_demo(self) -> None:
        ready = backend.demo_model_ready()
        if ready is not None:
            self.open_model_folder(ready)
            return
        self.status.show_message("Preparing the SmolLM2-135M demo model (first run only)…")
        self.status.show_progress(0, 0)
        self.demo_runner.start(backend.prepare_demo)

    @Slot(object)
    def _on_demo_event(self, event: object) -> None:
        text = getattr(event, "message", "") or getattr(event, "stage", "")
        done, total = getattr(event, "done", None), getattr(event, "total", None)
        if done is not None and total:
            self.status.show_progress(done, total)
        if text:
            self.status.show_message(f"Demo model: {text}")

    @Slot(object)
    def _on_demo_ready(self, path: object) -> None:
        self.status.hide_progress()
        self.open_model_folder(str(path))

    @Slot(object, str)
    def _on_demo_failed(self, exc: object, _tb: str) -> None:
        self.status.hide_progress()
        fallback = backend.fallback_catalog_id()
        if fallback is not None:
            self.status.show_message(f"Demo model unavailable ({exc}); showing catalog entry {fallback}")
            self.model_picker.open_catalog(fallback)
        else:
            self.show_error("Demo model unavailable", f"{exc}\n\nOpen a model folder with File ▸ Open.")

    # ------------------------------------------------------------ drag and drop
    def dragEnterEvent(self, event: QDragEnterEvent) -> None:  # noqa: N802 - Qt override
        if self._dropped_folder(event) is not None:
            event.acceptProposedAction()
        else:
            event.ignore()

    def dropEvent(self, event: QDropEvent) -> None:  # noqa: N802 - Qt override
        folder = self._dropped_folder(event)
        if folder is not None:
            event.acceptProposedAction()
            self.open_model_folder(folder)

    @staticmethod
    def _dropped_folder(event: QDragEnterEvent | QDropEvent) -> Path | None:
        mime = event.mimeData()
        if not mime.hasUrls():
            return None
        for url in mime.urls():
            if url.isLocalFile():
                p = Path(url.toLocalFile())
                return p if p.is_dir() else p.parent if p.name == "config.json" else None
        return None

    # ------------------------------------------------------------ actions
    def _run_quantize(self) -> None:
        self.tabs.setCurrentWidget(self.quantize_view)
        self.quantize_view.run()

    @Slot(object)
    def _on_job_finished(self, result: object) -> None:
        self.results_view.set_job(self.quantize_view.last_job, result, self.quantize_view.layer_points())
        self.tabs.setCurrentWidget(self.results_view)

    @Slot(str)
    def quantize_plan_format(self, fmt_name: str) -> None:
        """Plan → Quantize in one click: the row's format becomes the Quantize tab's settings."""
        if self.quantize_view.apply_plan_format(fmt_name):
            self.tabs.setCurrentWidget(self.quantize_view)

    def export_report(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save the report into a folder")
        if folder:
            self.results_view.save_report(Path(folder))

    def apply_theme(self, name: str) -> None:
        self.theme.apply(name)
        self.settings.set_theme(name)
        if name in getattr(self, "theme_actions", {}):
            self.theme_actions[name].setChecked(True)

    def show_about(self) -> None:
        QMessageBox.about(
            self,
            "About Quantscope",
            f"<h3>Quantscope {core.__version__}</h3>"
            "<p>Plan VRAM for, quantize, inspect and evaluate large language models on your workstation.</p>"
            "<p>Apache-2.0.</p>",
        )

    @Slot(str, str)
    def show_error(self, title: str, message: str) -> None:
        self.status.show_message(f"{title}: {message.splitlines()[0] if message else ''}")
        QMessageBox.critical(self, title, message)

    # ------------------------------------------------------------ remembered controls
    def persisted_controls(self) -> dict[str, dict[str, QWidget]]:
        """The controls whose values survive a restart, by settings group."""
        g, p, q = self.gpu_picker, self.plan_view, self.quantize_view
        return {
            "gpu": {"gpu": g.combo, "count": g.count, "custom_memory": g.custom_memory,
                    "custom_bandwidth": g.custom_bandwidth},
            "plan": {"context": p.context, "batch": p.batch, "kv_dtype": p.kv_dtype, "engine": p.engine},
            # The method first: choosing it resets method-specific defaults (AWQ's zero point).
            "quantize": {"method": q.method, "bits": q.bits, "granularity": q.granularity,
                         "group_size": q.group_size, "sym": q.sym, "clip": q.clip, "damp": q.damp,
                         "act_order": q.act_order, "grid": q.grid, "awq_clip": q.awq_clip,
                         "blocksize": q.blocksize, "double_quant": q.double_quant, "fp8_fmt": q.fp8_fmt,
                         "fp8_granularity": q.fp8_granularity, "alpha": q.alpha, "alpha_auto": q.alpha_auto,
                         "act_scheme": q.act_scheme, "threshold": q.threshold, "samples": q.samples,
                         "seq_len": q.seq_len},
        }

    def device_pickers(self) -> dict[str, DevicePicker]:
        """The device pickers whose choice survives a restart, by settings key."""
        return {"quantize": self.quantize_view.device_picker, "evaluate": self.results_view.device_picker}

    def save_controls(self) -> None:
        for name, widgets in self.persisted_controls().items():
            self.settings.set_group(name, widget_values(widgets))
        # Only a choice the user made is kept: a picker still following the GPU panel keeps
        # following it after a restart.
        self.settings.set_device_choices({key: picker.saved_choice() for key, picker in self.device_pickers().items()})

    def _model_controls(self) -> dict[str, QWidget]:
        q = self.quantize_view
        return {"calib_source": q.calib_source, "calib_file": q.calib_file}

    @Slot(object)
    def _remember_model_choices(self, job: object) -> None:
        """Calibration and output folder of the job just started, for its model."""
        values = widget_values(self._model_controls())
        values["out"] = str(getattr(job, "out", ""))
        self.settings.set_group(f"model-{model_key(str(getattr(job, 'model', '')))}", values)

    @Slot(object)
    def _restore_model_choices(self, choice: ModelChoice | None) -> None:
        if choice is None or choice.path is None:
            return
        values = self.settings.group(f"model-{model_key(str(choice.path))}")
        if not values:
            return
        q = self.quantize_view
        q.calib_source.blockSignals(True)  # no file dialog: the remembered file comes with it
        apply_widget_values(self._model_controls(), values)
        q.calib_source.blockSignals(False)
        q.calib_file.setEnabled(q.calib_source.currentData() == "file")
        if values.get("out"):
            q.set_out_dir(str(values["out"]))

    def restore_controls(self) -> None:
        for name, widgets in self.persisted_controls().items():
            apply_widget_values(widgets, self.settings.group(name))
        saved = self.settings.device_choices()
        for key, picker in self.device_pickers().items():
            # A GPU that is no longer here (another machine, a card removed) leaves the default.
            if key in saved:
                picker.choose(saved[key])

    # ------------------------------------------------------------ shutdown
    def runners(self) -> list[TaskRunner]:
        return [self.demo_runner, *self.quantize_view.runners(), *self.inspect_view.runners(),
                *self.results_view.runners()]

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 - Qt override
        # Cancel first so all workers stop in parallel, then wait for each.
        for runner in self.runners():
            runner.cancel()
        for runner in self.runners():
            runner.shutdown()
        self.status.timer.stop()
        self.settings.save_window(self.saveGeometry(), self.saveState())
        self.save_controls()
        super().closeEvent(event)
