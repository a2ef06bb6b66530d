"""Fused native kernels for the streaming hot loops, compiled by numba on first use.

Round-to-nearest of a whole model is a few arithmetic operations per weight; written as torch
calls it is a dozen passes over every row chunk, each a Python-level dispatch that holds the GIL
(so two workers cannot both be busy): about 2 ns per weight per core, where a disk delivering
2 GB/s of bf16 hands over a weight every 1 ns. These kernels do the same operations in one pass
per group with the GIL released (about 0.33 ns per weight per core here), so the two workers of
`core.primitives` both run flat out:

* `rtn_rows`: ranges, scale, zero, codes and the reconstruction error sums of per-group /
  per-channel RTN, reading bf16/fp16/fp32 as stored. Bit-identical scales, zeros and codes to the
  torch path (the same IEEE float32 operations: x / s, round half to even, + z, clamp).
* `pack4_rows`: 4-bit codes → bytes, the first code of a pair in the low nibble.
* `count_non_finite`: NaN/Inf count of a float tensor from its bit patterns.

Everything here is optional: when numba is missing, cannot compile, or QUANTSCOPE_NATIVE=0 is set,
`kernels()` returns None and callers keep their torch path (the reference the tests compare to).
Compiled code is cached (numba's cache, next to this file or in numba's user cache folder), so
only the first run on a machine pays the compilation (~1.5 s on two cores); later runs load it
in ~0.4 s with the numba import, which the engine overlaps with reading the first layer
(`warm_up`).
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

_ENV = "QUANTSCOPE_NATIVE"
_lock = threading.Lock()
_kernels: Any = None
_tried = False
_failure = ""

# dtype → the numpy element type the kernels read it as; the element type picks the decoder
# (uint16: bf16 bit patterns, int16: fp16 bit patterns decoded by table).
_VIEWS: dict[torch.dtype, Any] = {torch.float32: np.float32, torch.bfloat16: np.uint16, torch.float16: np.int16}
# Exponent bits all set = Inf or NaN, per storage width.
_EXP_MASK: dict[torch.dtype, tuple[Any, int]] = {
    torch.float32: (np.uint32, 0x7F800000),
    torch.bfloat16: (np.uint16, 0x7F80),
    torch.float16: (np.uint16, 0x7C00),
}


def enabled() -> bool:
    """False when the user turned the kernels off (QUANTSCOPE_NATIVE=0)."""
    return os.environ.get(_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def kernels() -> Any:
    """The compiled kernels (a namespace), or None when numba is unavailable or disabled."""
    global _kernels, _tried, _failure
    if not enabled():
        return None
    if _tried:
        return _kernels
    with _lock:
        if not _tried:
            try:
                _kernels = _build()
            except Exception as exc:  # noqa: BLE001 - any numba failure means: use the torch path
                _failure = f"{type(exc).__name__}: {exc}"
                log.warning("native kernels unavailable (%s); using the slower torch path", _failure)
                _kernels = None
            _tried = True
    return _kernels


def status() -> tuple[str, str]:
    """(log level, one line) saying whether the kernels are in use, for a job's log."""
    if not enabled():
        return "info", f"native kernels off ({_ENV}=0): rounding on the slower torch path"
    k = kernels()
    if k is None:
        return "warning", f"native kernels unavailable ({_failure}): rounding on the slower torch path"
    return "info", f"rounding with native kernels (numba {k.numba.__version__})"


def as_numpy(t: torch.Tensor) -> np.ndarray | None:
    """The raw elements of a contiguous 2-D CPU float32/bf16/fp16 tensor as the kernels read them
    (see _VIEWS), without a copy; None for anything else."""
    view = _VIEWS.get(t.dtype)
    if view is None or t.device.type != "cpu" or not t.is_contiguous() or t.dim() != 2:
        return None
    t = t.detach()
    return (t if view is np.float32 else t.view(torch.int16)).numpy().view(view)


_FP16: np.ndarray | None = None
_NO_TABLE = np.empty(0, np.float32)


def fp16_table() -> np.ndarray:
    """float32 value of every fp16 bit pattern (the kernels decode fp16 by lookup)."""
    global _FP16
    if _FP16 is None:
        _FP16 = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16).float().numpy()
    return _FP16


def table_for(dtype: torch.dtype) -> np.ndarray:
    """The `lut` argument of `rtn_rows` for weights of `dtype` (empty unless fp16)."""
    return fp16_table() if dtype == torch.float16 else _NO_TABLE


def count_non_finite(t: torch.Tensor) -> int | None:
    """Number of NaN/Inf elements of a float32/bf16/fp16 CPU tensor, None when no kernel applies."""
    k = kernels()
    spec = _EXP_MASK.get(t.dtype)
    if k is None or spec is None or t.device.type != "cpu" or not t.is_contiguous():
        return None
    view, mask = spec
    return int(k.count_exp_all_set(_raw_bits(t, view), view(mask)))


def _raw_bits(t: torch.Tensor, view: Any) -> np.ndarray:
    """The bit patterns of a contiguous float tensor as a flat unsigned array (uint16 or uint32)."""
    t = t.detach()
    return (t.view(torch.int16) if view is np.uint16 else t.view(torch.int32)).reshape(-1).numpy().view(view)


def _build() -> Any:
    from core import native_kernels  # imports numba: only here, on first use

    # Compile (or load) the bf16 variants now, inside kernels()'s try: a numba that imports but
    # cannot compile here (a frozen app missing a piece, an unsupported CPU) then means the torch
    # path, not a failed job.
    _exercise(native_kernels, torch.bfloat16)
    log.debug("native kernels ready (numba %s)", native_kernels.numba.__version__)
    return native_kernels


def _exercise(k: Any, dtype: torch.dtype) -> None:
    """Run every kernel once on tiny `dtype` inputs (compiling or loading that variant)."""
    w = torch.zeros(2, 8, dtype=dtype if dtype in _VIEWS else torch.float32)
    src = as_numpy(w)
    lut = table_for(w.dtype)
    scale, zero = np.empty((2, 1), np.float32), np.empty((2, 1), np.int32)
    codes, packed = np.empty((2, 8), np.uint8), np.empty((2, 4), np.uint8)
    k.rtn_rows(src, lut, 0, 2, 8, 4, True, scale, zero, codes, True)
    k.pack4_rows(codes, packed, 0, 2)
    view, mask = _EXP_MASK[w.dtype]
    k.count_exp_all_set(_raw_bits(w, view), view(mask))


def warm_up(dtype: torch.dtype) -> None:
    """Load (or compile) the kernels a streaming job on `dtype` weights will call, on tiny inputs,
    so that the first layer does not wait for it (~0.4 s from numba's cache, ~1.5 s to compile)."""
    k = kernels()
    if k is not None:
        _exercise(k, dtype)
