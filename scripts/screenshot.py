"""Render each view of the app to PNG, offscreen, so UI changes can be looked at.

    .venv/bin/python scripts/screenshot.py [--out docs/screenshots] [--model PATH] [--theme light|dark]

Without --model it uses the real SmolLM2-135M demo (prepared into the cache if needed), falling
back to a tiny random Llama built in a temp folder. It runs a real RTN quantization (and the
before/after evaluation) so the Quantize and Results views show real data.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _tiny_model(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import build_tokenizer  # the test suite's offline tokenizer

    tok = build_tokenizer()
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _wait(app: object, predicate: object, timeout_s: float) -> bool:
    """Run the Qt event loop until predicate() or the timeout (scripts may spin the loop; the
    app itself never does)."""
    from PySide6.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    timer = QTimer()
    timer.setInterval(50)
    timer.timeout.connect(lambda: loop.quit() if predicate() else None)
    timer.start()
    QTimer.singleShot(int(timeout_s * 1000), loop.quit)
    loop.exec()
    timer.stop()
    return bool(predicate())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--theme", choices=("light", "dark", "both"), default="both")
    parser.add_argument("--size", default="1440x900")
    args = parser.parse_args(argv)

    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QMessageBox

    from app.main import make_application

    # Modal dialogs would block an offscreen run; print what they would have said.
    def _report(_parent: object, title: str, text: str, *a: object, **k: object) -> QMessageBox.StandardButton:
        print(f"dialog: {title}: {text}", file=sys.stderr)
        return QMessageBox.StandardButton.Ok

    QMessageBox.critical = _report  # type: ignore[method-assign]
    QMessageBox.warning = _report  # type: ignore[method-assign]
    from app.settings import AppSettings

    app = make_application()
    from app.main_window import MainWindow

    work = Path(tempfile.mkdtemp(prefix="quantscope-shots-"))
    model = args.model
    if model is None:
        try:
            from core.demo import prepare_smollm2

            model = prepare_smollm2()
        except (OSError, ValueError, ImportError) as exc:
            print(f"demo model unavailable ({exc}); using a tiny random Llama", file=sys.stderr)
            model = _tiny_model(work / "tiny-llama")
    settings = AppSettings(QSettings(str(work / "settings.ini"), QSettings.Format.IniFormat))
    win = MainWindow(settings)
    w, h = (int(x) for x in args.size.split("x"))
    win.resize(w, h)
    win.show()
    if win.open_model_folder(model) is None:
        print(f"cannot open {model}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    themes = ["light", "dark"] if args.theme == "both" else [args.theme]

    # Quantize for real so Quantize and Results have data.
    q = win.quantize_view
    q.set_method("rtn")
    q.out_dir.setText(str(work / "out-rtn"))
    win.results_view.windows.setValue(4)
    win.results_view.seq_len.setValue(128)
    win.tabs.setCurrentWidget(q)
    q.run()
    _wait(app, lambda: win.results_view.evaluation is not None or q.stage.text().startswith(("Failed", "Cancelled")),
          900)
    win.inspect_view.linears.setCurrentRow(min(3, win.inspect_view.linears.count() - 1))
    _wait(app, lambda: win.inspect_view.detail is not None and bool(win.inspect_view.overview), 300)

    written = []
    for theme in themes:
        win.apply_theme(theme)
        for index, name in enumerate(("plan", "quantize", "inspect", "results")):
            win.tabs.setCurrentIndex(index)
            _wait(app, lambda: False, 0.3)  # let layouts settle
            path = args.out / f"{name}-{theme}.png"
            win.grab().save(str(path))
            written.append(path)
    for p in written:
        print(p)
    win.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
