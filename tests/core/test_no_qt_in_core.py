"""The engine never depends on the GUI: every `core` module imports with PySide6, shiboken6,
pyqtgraph and `app` made unimportable, and no `core` source names them in an import."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "core"
FORBIDDEN = ("PySide6", "shiboken6", "pyqtgraph", "app", "PyQt5", "PyQt6", "qtpy")

# Runs in a fresh interpreter: a meta-path finder placed first refuses the GUI packages, then
# every module under core/ is imported. Prints {"failed": {module: error}, "imported": [...],
# "gui_loaded": [...]} as JSON.
_IMPORT_ALL = textwrap.dedent(
    """
    import importlib, importlib.abc, json, pkgutil, sys, traceback
    FORBIDDEN = set(sys.argv[1].split(","))

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in FORBIDDEN:
                raise ImportError(f"blocked import of {name} (core must not import GUI packages)")
            return None

    sys.meta_path.insert(0, Blocker())
    probe = sys.argv[2] if len(sys.argv) > 2 else ""
    if probe:
        try:
            importlib.import_module(probe)
            print(json.dumps({"probe_imported": True}))
        except ImportError as exc:
            print(json.dumps({"probe_imported": False, "error": str(exc)}))
        raise SystemExit(0)

    import core
    names = ["core"] + [m.name for m in pkgutil.walk_packages(core.__path__, "core.")]
    failed, imported = {}, []
    for name in names:
        if name == "core.__main__":  # runs the CLI on import
            continue
        try:
            importlib.import_module(name)
            imported.append(name)
        except BaseException as exc:
            failed[name] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    gui = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
    print(json.dumps({"failed": failed, "imported": imported, "gui_loaded": gui}))
    """
)


def _run(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL, ",".join(FORBIDDEN), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_blocker_really_refuses_gui_packages() -> None:
    # Without this the main test could pass vacuously with a finder that blocks nothing.
    result = _run("PySide6.QtCore")
    assert result == {"probe_imported": False, "error": result["error"]}
    assert "blocked import of PySide6" in result["error"]


def test_every_core_module_imports_with_gui_packages_blocked() -> None:
    expected = {"core", "core.cli", "core.events", "core.config", "core.methods.base", "core.export.base"}
    expected |= {"core." + p.stem for p in CORE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    result = _run()
    assert result["failed"] == {}, "core modules that need a GUI package:\n" + "\n".join(
        f"{k}: {v}" for k, v in result["failed"].items()
    )
    assert expected <= set(result["imported"])
    assert result["gui_loaded"] == []


def _gui_imports(source: str) -> list[str]:
    """Module names from FORBIDDEN that a source file imports: import statements anywhere (also
    inside functions) and importlib.import_module / __import__ calls with a literal name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        found += [n for n in names if n.split(".")[0] in FORBIDDEN]
    return found


def test_source_scan_flags_gui_imports_in_any_form() -> None:
    snippet = textwrap.dedent(
        """
        import os
        from PySide6.QtCore import QObject
        def later():
            import pyqtgraph as pg
            importlib.import_module("app.main")
        from apply import x
        """
    )
    assert _gui_imports(snippet) == ["PySide6.QtCore", "pyqtgraph", "app.main"]


def test_no_core_source_imports_a_gui_package() -> None:
    sources = sorted(CORE.rglob("*.py"))
    assert len(sources) >= 5
    offenders = {
        str(p.relative_to(ROOT)): hits for p in sources if (hits := _gui_imports(p.read_text(encoding="utf-8")))
    }
    assert offenders == {}
