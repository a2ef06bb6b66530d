"""Quantization algorithms, one small module each, registered by config class.

A method sees one decoder layer at a time through `LayerContext` and returns the quantized
weights of that layer's linears; the engine does all I/O.
"""
from __future__ import annotations

from core.methods.base import LayerContext, Quantizer, get_quantizer, register

__all__ = ["LayerContext", "Quantizer", "get_quantizer", "register"]
