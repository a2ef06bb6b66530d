"""`quantscope gui [--model PATH|CATALOG_ID]`: the desktop application (also what a bare
`quantscope` runs).

The app runs as `python -m app` in a child process rather than being imported here: core never
imports the GUI (tests/core/test_no_qt_in_core.py), and the CLI keeps working on machines
without Qt.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("gui", help="launch the desktop application")
    p.add_argument("--model", metavar="PATH|CATALOG_ID", default=None,
                   help="model folder or catalog id to open (default: the built-in SmolLM2-135M demo)")
    p.add_argument("--theme", choices=("light", "dark"), default=None, help="colour theme (default: last used)")
    p.set_defaults(func=run)


def gui_command(args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "app"]
    if args.model:
        cmd += ["--model", str(args.model)]
    if args.theme:
        cmd += ["--theme", args.theme]
    return cmd


def run(args: argparse.Namespace) -> int:
    for module in ("PySide6", "pyqtgraph"):
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"the desktop app needs {module}, which is not installed; run ./dev.sh setup")
    try:
        return subprocess.call(gui_command(args))
    except KeyboardInterrupt:
        return 130
