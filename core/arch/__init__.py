"""Architecture adapters: one module per decoder family (see `core.arch.base.ArchAdapter`).
Adding a family = one module here, listed in `_MODULES`, plus a tiny-model test."""
from __future__ import annotations

import importlib

from core.arch.base import ArchAdapter

_MODULES = ("core.arch.llama", "core.arch.gemma2", "core.arch.gemma3", "core.arch.phi3")

ADAPTERS: tuple[ArchAdapter, ...] = tuple(importlib.import_module(m).ADAPTER for m in _MODULES)

_BY_ARCHITECTURE = {arch: a for a in ADAPTERS for arch in a.architectures}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_BY_ARCHITECTURE)


def supported_families() -> str:
    """The families that can be quantized, for messages."""
    return ", ".join(a.family for a in ADAPTERS)


def unsupported_message(architecture: str) -> str:
    """One line naming the supported families and how to ask for another."""
    return (f"unsupported architecture: {architecture} (supported: {supported_families()}, i.e. "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}; MoE and multimodal checkpoints are not supported yet; "
            "to ask for another family, open an issue with its config.json)")


def adapter_for(architecture: str) -> ArchAdapter:
    """The adapter of an architecture name (config.json `architectures[0]`); ValueError when
    there is none."""
    try:
        return _BY_ARCHITECTURE[architecture]
    except KeyError:
        raise ValueError(unsupported_message(architecture)) from None
