"""Locate the data files the app ships in `resources/` (GPU catalog, model catalog, icons).

The folder sits next to `core/` in a checkout or editable install; a PyInstaller bundle unpacks
it under `sys._MEIPASS/resources` (the spec must add `("resources", "resources")` to `datas`);
`QUANTSCOPE_RESOURCES` overrides both.
"""
from __future__ import annotations

import json
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any


def resources_dir() -> Path:
    """The first existing resources folder: $QUANTSCOPE_RESOURCES, the bundle's, the repo's."""
    candidates: list[Path] = []
    env = os.environ.get("QUANTSCOPE_RESOURCES")
    if env:
        candidates.append(Path(env))
    bundle = getattr(sys, "_MEIPASS", None)
    if bundle:
        candidates.append(Path(bundle) / "resources")
    candidates.append(Path(__file__).resolve().parent.parent / "resources")
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(
        f"Quantscope's resources folder was not found (looked in: {', '.join(map(str, candidates))}); "
        "reinstall Quantscope or set QUANTSCOPE_RESOURCES to the folder holding gpus.json"
    )


def resource_path(name: str) -> Path:
    """Path of a shipped resource file, e.g. resource_path("gpus.json")."""
    path = resources_dir() / name
    if not path.exists():
        raise FileNotFoundError(f"resource {name!r} is missing from {resources_dir()}; reinstall Quantscope")
    return path


@lru_cache(maxsize=None)
def load_json_resource(name: str) -> Any:
    """Parsed JSON resource (cached: treat the result as read-only)."""
    path = resource_path(name)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"corrupt resource {path}: {exc}; reinstall Quantscope") from None
