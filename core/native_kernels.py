"""The numba kernels behind `core.native` (imported only through `core.native.kernels()`, which
falls back to the torch path when this module cannot be imported or compiled).

Each kernel works on a row range [r0, r1) so that two Python threads can run it on two halves at
once (nogil). Shapes: src [out, in] raw elements (float32; uint16 bit patterns of bf16; int16 bit
patterns of fp16, decoded through `lut`, the float32 value of each pattern),
scale float32 / zero int32 [out, ceil(in / gs)], codes uint8 [out, in].
"""
from __future__ import annotations

import sys

import numba  # noqa: F401 - core.native.status reports its version
import numpy as np
from numba import njit, types
from numba.extending import overload

# Frozen apps have no source files for numba's cache to key on.
_CACHE = not getattr(sys, "frozen", False)
# reassoc/nsz let the sums vectorize and contract lets the error sums use FMA; no flag that may
# change a division or a rounding ('arcp', 'afn', 'nnan', 'ninf' stay off), so scales, zeros and
# codes stay IEEE-exact (bit-identical to the torch path).
_FAST = {"reassoc", "nsz", "contract"}
_F32_EXP = np.int32(0x7F800000)
_ABS_MASK = np.int32(0x7FFFFFFF)
_jit = njit(nogil=True, cache=_CACHE, fastmath=_FAST, boundscheck=False, error_model="numpy")


def load_group(row, lut, c0, m, fbuf, ibuf):
    """Decode row[c0:c0 + m] into the float32 group buffer fbuf (ibuf: its int32 view). This is
    the interpreted version (NUMBA_DISABLE_JIT=1); compiled kernels use the overload below."""
    if row.dtype == np.uint16:
        ibuf[:m] = row[c0:c0 + m].astype(np.int32) << 16
    elif row.dtype == np.int16:
        fbuf[:m] = lut[row[c0:c0 + m].astype(np.intp) & 0xFFFF]
    else:
        fbuf[:m] = row[c0:c0 + m]


@overload(load_group, inline="always", jit_options={"fastmath": _FAST})
def _load_group_for(row, lut, c0, m, fbuf, ibuf):
    # Chosen by the element type at compile time, so the kernels have no per-group dtype branch
    # (one was 40% slower): uint16 holds bf16 bit patterns, int16 fp16 bit patterns (decoded by
    # table), float32 is read as it is.
    if row.dtype == types.uint16:
        def bf16(row, lut, c0, m, fbuf, ibuf):
            for k in range(m):
                ibuf[k] = np.int32(row[c0 + k]) << 16
        return bf16
    if row.dtype == types.int16:
        def fp16(row, lut, c0, m, fbuf, ibuf):
            for k in range(m):
                fbuf[k] = lut[np.intp(row[c0 + k]) & 0xFFFF]
        return fp16
    if row.dtype == types.float32:
        def fp32(row, lut, c0, m, fbuf, ibuf):
            for k in range(m):
                fbuf[k] = row[c0 + k]
        return fp32
    return None


@_jit
def rtn_rows(src, lut, r0, r1, gs, bits, sym, scale, zero, codes, measure):
    """Round-to-nearest of rows [r0, r1) in groups of gs columns (the last one ragged when gs does
    not divide the width): scale/zero/codes filled in place; returns (Σ(w − ŵ)², Σw²) over those
    rows when `measure` (else zeros). A group holding NaN/Inf gets a NaN scale."""
    n_in = src.shape[1]
    f0 = np.float32(0.0)
    qmax = np.float32(2**bits - 1)
    half = np.float32(2 ** (bits - 1))
    denom = np.float32(2 ** (bits - 1) - 1)
    fbuf = np.empty(gs, np.float32)
    ibuf = fbuf.view(np.int32)
    cast_f = np.empty(2, np.float32)  # bit casts int32 → float32
    cast_i = cast_f.view(np.int32)
    n_groups = (n_in + gs - 1) // gs
    noise = 0.0
    signal = 0.0
    for r in range(r0, r1):
        row = src[r]
        crow = codes[r]
        for g in range(n_groups):
            c0 = g * gs
            m = min(gs, n_in - c0)
            load_group(row, lut, c0, m, fbuf, ibuf)
            # min/max over "ordered" bit patterns: b ^ ((b >> 31) & 0x7FFFFFFF) sorts as integers
            # exactly as the finite floats do. Integer reductions vectorize; float ones with
            # IEEE NaN semantics do not (4x slower). Starting at 0 (+0.0) clamps lo ≤ 0 ≤ hi.
            lo_o = np.int32(0)
            hi_o = np.int32(0)
            bad = 0  # elements whose exponent bits are all set: NaN or ±Inf
            for k in range(m):
                b = ibuf[k]
                o = b ^ ((b >> 31) & _ABS_MASK)
                lo_o = min(lo_o, o)
                hi_o = max(hi_o, o)
                bad += (b & _F32_EXP) == _F32_EXP
            cast_i[0] = lo_o ^ ((lo_o >> 31) & _ABS_MASK)
            cast_i[1] = hi_o ^ ((hi_o >> 31) & _ABS_MASK)
            lo = cast_f[0]
            hi = cast_f[1]
            z = half
            if sym:
                s = max(-lo, hi) / denom
            else:
                s = (hi - lo) / qmax
            if s == f0:
                s = np.float32(1.0)  # an all-zero group: scale 1 decodes to 0
            if not sym:
                z = min(max(np.rint(-lo / s), f0), qmax)
            if bad:  # the caller finds the NaN scale and names the weight; no codes for it
                scale[r, g] = np.float32(np.nan)
                zero[r, g] = np.int32(half)
                continue
            scale[r, g] = s
            zero[r, g] = np.int32(z)
            for k in range(m):
                q = np.rint(fbuf[k] / s) + z
                q = qmax if q > qmax else (f0 if q < f0 else q)
                crow[c0 + k] = np.uint8(np.int32(q))
            if measure:  # from the codes just written, while the group is in L1
                ns = f0
                ss = f0
                for k in range(m):
                    x = fbuf[k]
                    d = (np.float32(crow[c0 + k]) - z) * s - x
                    ns += d * d
                    ss += x * x
                noise += ns
                signal += ss
    return noise, signal


@_jit
def pack4_rows(codes, out, r0, r1):
    """out[r, k] = codes[r, 2k] | codes[r, 2k + 1] << 4 for rows [r0, r1)."""
    half = out.shape[1]
    for r in range(r0, r1):
        c = codes[r]
        o = out[r]
        for k in range(half):
            o[k] = c[2 * k] | (c[2 * k + 1] << 4)


@_jit
def count_exp_all_set(raw, mask):
    """How many of the raw float bit patterns have every exponent bit set (NaN or ±Inf)."""
    n = 0
    for i in range(raw.shape[0]):
        n += (raw[i] & mask) == mask
    return n
