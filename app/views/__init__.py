"""The four tabs of the main window: Plan, Quantize, Inspect, Results."""
from __future__ import annotations
