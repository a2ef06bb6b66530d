"""Quantscope core engine: planning, quantization, evaluation and export. Never imports Qt."""
from __future__ import annotations

__version__ = "0.1.0"
