"""`quantscope gui` / bare `quantscope`: runs the app as `python -m app` with the given model."""
from __future__ import annotations

import argparse
import subprocess
import sys
from typing import Any

import pytest


def test_gui_subcommand_is_the_default_and_forwards_model_and_theme(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.cli import gui, main

    calls: list[list[str]] = []
    monkeypatch.setattr(gui.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert main([]) == 0
    assert main(["gui", "--model", "/models/x", "--theme", "dark"]) == 0
    assert calls[0] == [sys.executable, "-m", "app"]
    assert calls[1] == [sys.executable, "-m", "app", "--model", "/models/x", "--theme", "dark"]


def test_app_module_parses_the_same_options() -> None:
    # `python -m app --help` must work without a display and exit 0.
    proc = subprocess.run([sys.executable, "-m", "app", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "--model" in proc.stdout and "--theme" in proc.stdout


def test_open_default_with_a_catalog_id_plans_it(window: Any) -> None:
    from app import backend

    model_id = backend.catalog_model_ids()[0]
    window.open_default(model_id)
    assert window.state.model is not None and window.state.model.label == model_id
    assert window.plan_view.table.rowCount() >= 1


def test_open_default_without_a_model_opens_the_demo(window: Any, qtbot: Any, smollm2_dir: Any) -> None:
    window.open_default(None)
    qtbot.waitUntil(lambda: window.state.model is not None, timeout=300000)
    assert window.state.model.path == smollm2_dir
    assert window.state.model.source.num_layers == 30


def test_gui_command_builds_child_argv() -> None:
    from core.cli.gui import gui_command

    ns = argparse.Namespace(model=None, theme="light")
    assert gui_command(ns) == [sys.executable, "-m", "app", "--theme", "light"]
