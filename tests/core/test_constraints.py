"""The dependency lock (constraints.txt): every runtime dependency is pinned inside pyproject's
ranges, .venv holds exactly the pinned versions (so moving the lock is a deliberate, tested
change), the set-up scripts install from it, and the bundle spec carries what the locked packages
read at run time (the data and metadata whose absence broke the frozen app with transformers 5.25)."""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="reads pyproject.toml with tomllib (3.11+)")


def _bundle_deps() -> types.ModuleType:
    # packaging/ is not an importable package (it would shadow the `packaging` distribution)
    spec = importlib.util.spec_from_file_location("bundle_deps", ROOT / "packaging" / "bundle_deps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pins() -> dict[str, str]:
    """constraints.txt as canonical name -> pinned version."""
    out: dict[str, str] = {}
    for raw in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version and " " not in line, f"constraints.txt: {line!r} is not NAME==VERSION"
        key = canonicalize_name(name)
        assert key not in out, f"constraints.txt pins {name} twice"
        out[key] = version
    return out


def test_the_lock_pins_exact_versions_and_not_the_project_itself() -> None:
    locked = pins()
    assert "quantscope" not in locked
    assert locked["torch"] == "2.13.0"  # the CPU build's local label is left to the index
    assert len(locked) >= 50


def test_every_runtime_and_test_dependency_is_pinned_inside_pyproject_ranges() -> None:
    deps = _bundle_deps()
    locked = pins()
    for req in deps.project_requirements(("test",)):
        key = canonicalize_name(req.name)
        assert key in locked, f"{req.name} ({req}) is not pinned in constraints.txt"
        assert SpecifierSet(str(req.specifier)).contains(locked[key], prereleases=True), \
            f"constraints.txt pins {req.name}=={locked[key]} outside pyproject's {req}"
    # ... and what they need in turn: nothing a fresh install resolves is left floating
    unpinned = sorted(set(deps.runtime_distributions(("test",))) - set(locked))
    assert unpinned == [], f"installed at run time but not pinned in constraints.txt: {unpinned}"


def test_installed_versions_are_the_locked_ones() -> None:
    # Everything this interpreter needs at run time and for the tests (pins that only another
    # Python's markers select may be absent here).
    locked = pins()
    drift = []
    for name, dist in sorted(_bundle_deps().runtime_distributions(("test",)).items()):
        if name in locked and not SpecifierSet(f"=={locked[name]}").contains(dist.version, prereleases=True):
            drift.append(f"{name}: {dist.version} installed, {locked[name]} locked")
    assert drift == [], ("the environment differs from constraints.txt (./dev.sh setup installs the lock; "
                         "to move it, see README.md 'Moving the dependency lock'): " + "; ".join(drift))


def test_dev_sh_and_build_sh_install_from_the_lock_and_reinstall_when_it_changes() -> None:
    dev = (ROOT / "dev.sh").read_text(encoding="utf-8")
    assert "pipq install -c constraints.txt -e '.[test]'" in dev
    assert "cat pyproject.toml constraints.txt | sha1sum" in dev  # the stamp covers the lock
    build = (ROOT / "packaging" / "build.sh").read_text(encoding="utf-8")
    assert "\n./dev.sh setup\n" in build and "-c constraints.txt" in build


def test_runtime_dependencies_with_data_files_are_bundled_or_ruled_out() -> None:
    deps = _bundle_deps()
    undecided = {}
    for key, dist in deps.runtime_distributions().items():
        files = deps.data_files(dist)
        if not files or key in deps.HOOKED or key in deps.NOT_NEEDED:
            continue
        missing = sorted({f.split("/")[0] for f in files} - set(deps.COLLECT_DATA))
        if missing:
            undecided[key] = files[:3]
    assert undecided == {}, ("runtime dependencies ship data files the bundle spec neither collects nor rules out "
                             f"(decide in packaging/bundle_deps.py): {undecided}")
    # the file whose absence broke the frozen app
    kernels = deps.runtime_distributions()["kernels"]
    assert "kernels/_internals/python_depends.json" in deps.data_files(kernels) and "kernels" in deps.COLLECT_DATA


def test_spec_collects_kernels_data_and_the_metadata_of_every_runtime_dependency(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run quantscope.spec with PyInstaller's hook helpers and build steps recorded instead of
    executed (building the bundle takes 10-20 minutes; packaging/build.sh does that)."""
    calls: dict[str, list[str]] = {"collect_data_files": [], "copy_metadata": [], "collect_submodules": []}

    def recorder(kind: str) -> Any:
        def record(name: str, *args: Any, **kwargs: Any) -> list[Any]:
            calls[kind].append(name)
            return [(f"/src/{kind}/{name}", name)] if kind != "collect_submodules" else [name]
        return record

    hooks = types.ModuleType("PyInstaller.utils.hooks")
    for kind in calls:
        setattr(hooks, kind, recorder(kind))
    for name, module in (("PyInstaller", types.ModuleType("PyInstaller")),
                         ("PyInstaller.utils", types.ModuleType("PyInstaller.utils")),
                         ("PyInstaller.utils.hooks", hooks)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(sys, "path", list(sys.path))

    analysis: dict[str, Any] = {}

    class Analysis:
        def __init__(self, scripts: list[str], **kwargs: Any) -> None:
            analysis.update(kwargs)
            self.datas, self.binaries, self.pure, self.scripts = list(kwargs["datas"]), [], [], scripts

    spec_globals = {"SPECPATH": str(ROOT / "packaging"), "__name__": "__main__", "Analysis": Analysis,
                    "PYZ": lambda *a, **k: None, "EXE": lambda *a, **k: None, "COLLECT": lambda *a, **k: None}
    code = compile((ROOT / "packaging" / "quantscope.spec").read_text(encoding="utf-8"), "quantscope.spec", "exec")
    exec(code, spec_globals)

    assert "kernels" in calls["collect_data_files"] and "kernels" in calls["collect_submodules"]
    assert ("/src/collect_data_files/kernels", "kernels") in analysis["datas"]
    runtime = set(_bundle_deps().runtime_distributions())
    assert {"kernels", "transformers", "huggingface-hub", "tokenizers", "torch"} <= runtime
    assert runtime | {"quantscope"} <= set(calls["copy_metadata"])
