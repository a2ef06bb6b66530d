"""What the standalone bundle must carry besides the modules PyInstaller finds by import analysis:
the distribution metadata of every runtime dependency, and the data files of the packages that read
their own files at run time. Used by quantscope.spec, and by tests/core/test_constraints.py to check
that a moved lock (constraints.txt) brings no dependency the spec does not know about.

Why metadata for all of them: transformers decides whether an optional package is usable with
`importlib.metadata.version(name)` and, when the metadata is missing, imports the package to ask it
(`transformers.utils.import_utils._is_package_available`). transformers 5.25 added `kernels` to its
requirements; the frozen app had the module but neither its metadata nor its
`_internals/python_depends.json`, so that import failed with "Cannot load dependency data, is
`kernels` correctly installed?".
"""
from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

# Import packages whose non-Python files the spec collects with collect_data_files: they open
# their own files at run time (or import time, like kernels).
COLLECT_DATA = (
    "core", "app", "gguf", "compressed_tensors", "kernels", "certifi", "sentencepiece", "pyqtgraph",
    "huggingface_hub",
)

# Distributions whose non-Python files PyInstaller's own hooks (pyinstaller, pyinstaller-hooks-contrib)
# collect or whose libraries its binary analysis follows.
HOOKED = frozenset({"torch", "numpy", "numba", "llvmlite", "pyside6-essentials", "shiboken6"})

# Distributions that ship non-Python files Quantscope never reaches at run time (why, per entry).
NOT_NEEDED = {
    "markdown-it-py": "port.yaml records the upstream port; rich renders without it",
    "markupsafe": "_speedups.c is the source of the compiled extension",
    "networkx": "the data of networkx.generators.atlas; torch uses networkx only to partition graphs",
    "setuptools": "vendored wheels and launchers for building packages",
    "sympy": "parser grammars and examples for torch's symbolic shapes, which never parse files",
    "tokenizers": "the notebook visualizer's CSS",
    "tqdm": "shell completion and man page",
    "typer": "agent skill notes and the vendored click's licence",
    "urllib3": "the emscripten (browser) fetch worker",
}

# File names that are never data a package reads.
_NOT_DATA_SUFFIXES = (
    ".py", ".pyc", ".pyi", ".so", ".pyd", ".dylib", ".dll", ".h", ".hpp", ".c", ".cc", ".cpp", ".cu",
    ".cuh", ".pxd", ".pyx", ".cmake", ".pth", "py.typed", "LICENSE", "LICENSE.txt", "COPYING",
)


def project_requirements(extras: tuple[str, ...] = ()) -> list[Requirement]:
    """The requirements of pyproject.toml (and of `extras`) that apply to this interpreter."""
    import tomllib  # Python >= 3.11, as packaging/build.sh needs anyway

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    reqs = [Requirement(line) for line in lines]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(default_environment())]


def runtime_distributions(extras: tuple[str, ...] = ()) -> dict[str, md.Distribution]:
    """Every installed distribution Quantscope needs at run time: pyproject's requirements and,
    recursively, theirs (markers evaluated for this interpreter, extras followed). Keys are
    canonical names. A requirement that is not installed is left out (it fails elsewhere)."""
    found: dict[str, md.Distribution] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(r.name, frozenset(r.extras)) for r in project_requirements(extras)]
    while todo:
        name, wanted = todo.pop()
        key = canonicalize_name(name)
        if (key, wanted) in seen:
            continue
        seen.add((key, wanted))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        found[key] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [dict(default_environment(), extra=e) for e in sorted(wanted)] or [dict(default_environment(), extra="")]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras)))
    return found


def data_files(dist: md.Distribution) -> list[str]:
    """The files a distribution installs that are neither code, headers, licences nor metadata."""
    out = []
    for f in dist.files or []:
        path = str(f)
        parts = path.split("/")
        if path.startswith("..") or ".dist-info" in path or "__pycache__" in parts or parts[0].endswith(".libs"):
            continue
        if any(p in ("include", "tests", "test") for p in parts) or path.endswith(_NOT_DATA_SUFFIXES):
            continue
        out.append(path)
    return out


def metadata_distributions() -> list[str]:
    """Names of the distributions whose metadata the bundle carries: the whole runtime set."""
    return sorted(runtime_distributions())
