"""Checkpoint layouts that real loaders read. One small writer+reader per format.

The engine streams: for every quantized linear it asks the exporter for the tensors to store
(`tensors`), and at the end for the `quantization_config` to put into config.json. The same
exporter reads its layout back (`read_weight`) so Quantscope can evaluate, inspect and plan
any folder it wrote.
"""
from __future__ import annotations

from core.export.base import (
    Exporter,
    default_export,
    detect_exporter,
    exporters_accepting,
    get_exporter,
    ragged_linears,
    ragged_refusal,
    register_exporter,
)

__all__ = [
    "Exporter",
    "default_export",
    "detect_exporter",
    "exporters_accepting",
    "get_exporter",
    "ragged_linears",
    "ragged_refusal",
    "register_exporter",
]
