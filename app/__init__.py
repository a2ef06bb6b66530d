"""Quantscope desktop application (PySide6 + pyqtgraph).

Panels build config objects, start core functions in worker threads and show the events those
functions emit. Nothing in `core/` knows this package exists.
"""
from __future__ import annotations
