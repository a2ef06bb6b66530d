"""GGUF K-quant encoders (Q4_K, Q5_K, Q6_K) in vectorised numpy.

gguf-py dequantizes these types but cannot quantize them, so Quantscope encodes them itself,
following llama.cpp's reference encoders (`quantize_row_q4_K_ref`, `q5_K_ref`, `q6_K_ref`):

* Q4_K / Q5_K: super-blocks of 256 weights = 8 sub-blocks of 32. Each sub-block gets an affine
  grid x ≈ d·sc·q − dmin·m (q in 0..15 or 0..31) found by `make_qkx2_quants`: a weighted
  least-squares fit of scale and min over 20 candidate grid stretches, weights |x| + rms(x).
  The 8 sub-block scales and mins are then themselves quantized to 6 bits against the
  super-block's float16 `d` and `dmin`.
* Q6_K: super-blocks of 256 = 16 sub-blocks of 16 with a symmetric grid q in −32..31 whose scale
  comes from `make_qx_quants` (19 candidate stretches, weighted by x²), and 8-bit sub-block
  scales against a float16 `d`.

Byte layouts are the ones gguf-py's `dequantize_blocks` read (and llama.cpp's `block_q4_K`,
`block_q5_K`, `block_q6_K`). `nearest_int` in llama.cpp rounds half to even, as `np.rint` does.
"""
from __future__ import annotations

import numpy as np

QK_K = 256


def _rint(x: np.ndarray) -> np.ndarray:
    return np.rint(x)


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float = -1.0, rdelta: float = 0.1,
                     nstep: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Affine grid per row of x [n, k] (weights w [n, k]) → (scale [n], min [n]) with
    x ≈ scale·q − min, q = clamp(round((x + min)/scale), 0, nmax), min ≥ 0."""
    xmin = np.minimum(x.min(axis=1), 0.0)
    xmax = x.max(axis=1)
    flat = xmax <= xmin
    span = np.where(flat, 1.0, xmax - xmin)
    sum_w = w.sum(axis=1)
    sum_x = (w * x).sum(axis=1)

    iscale = nmax / span
    scale = 1.0 / iscale
    mn = xmin.copy()
    q = np.clip(_rint(iscale[:, None] * (x - xmin[:, None])), 0, nmax)
    best = (w * (scale[:, None] * q + mn[:, None] - x) ** 2).sum(axis=1)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / span
        q = np.clip(_rint(iscale[:, None] * (x - xmin[:, None])), 0, nmax)
        sum_l = (w * q).sum(axis=1)
        sum_l2 = (w * q * q).sum(axis=1)
        sum_xl = (w * q * x).sum(axis=1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = np.where(ok, det, 1.0)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = this_min > 0
        this_scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, 1.0), this_scale)
        this_min = np.where(positive, 0.0, this_min)
        err = (w * (this_scale[:, None] * q + this_min[:, None] - x) ** 2).sum(axis=1)
        better = ok & (err < best)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    scale = np.where(flat, 0.0, scale)
    return scale, -np.where(flat, xmin, mn)


def make_qx_quants(x: np.ndarray, nmax: int) -> np.ndarray:
    """Symmetric grid scale per row of x [n, k] for codes in −nmax..nmax−1, weighted by x²
    (llama.cpp's rmse_type 1). The returned scale may be negative: the grid is anchored on the
    element of largest magnitude, keeping its sign."""
    idx = np.abs(x).argmax(axis=1)
    xmax = x[np.arange(x.shape[0]), idx]
    tiny = np.abs(xmax) < 1e-15
    safe_max = np.where(tiny, 1.0, xmax)
    w = x * x

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1)
        return (w * x * q).sum(axis=1), (w * q * q).sum(axis=1)

    sumlx, suml2 = fit(-nmax / safe_max)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1.0), 0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        sumlx, suml2 = fit(-(nmax + 0.1 * step) / safe_max)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / np.where(suml2 > 0, suml2, 1.0)
        scale = np.where(better, new_scale, scale)
        best = np.where(better, new_scale * sumlx, best)
    return np.where(tiny, 0.0, scale)


def _blocks(data: np.ndarray) -> np.ndarray:
    x = np.asarray(data, dtype=np.float32)
    if x.shape[-1] % QK_K:
        raise ValueError(f"K-quants need rows that are a multiple of {QK_K} values, got {x.shape[-1]}")
    return x.reshape(-1, QK_K)


def _pack_scale_min_6bit(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """sc, mn uint8 [n, 8] (6-bit) → the 12-byte `scales` field of Q4_K/Q5_K blocks."""
    d = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    m = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    md = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([d, m, md], axis=1).astype(np.uint8)


def _affine_superblocks(x: np.ndarray, nmax: int) -> tuple[np.ndarray, ...]:
    """Shared Q4_K/Q5_K step: codes [n, 8, 32], d/dmin float16 [n], 6-bit sc/mn [n, 8]."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    av = np.sqrt((sub * sub).mean(axis=1, keepdims=True))
    scales, mins = make_qkx2_quants(sub, av + np.abs(sub), nmax)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale, max_min = scales.max(axis=1), mins.max(axis=1)
    inv_scale = np.where(max_scale > 0, 63.0 / np.where(max_scale > 0, max_scale, 1.0), 0.0)
    inv_min = np.where(max_min > 0, 63.0 / np.where(max_min > 0, max_min, 1.0), 0.0)
    sc = np.minimum(_rint(inv_scale[:, None] * scales), 63).astype(np.uint8)
    mn = np.minimum(_rint(inv_min[:, None] * mins), 63).astype(np.uint8)
    d = (max_scale / 63.0).astype(np.float16)
    dmin = (max_min / 63.0).astype(np.float16)
    dj = d.astype(np.float32)[:, None] * sc  # [n, 8]
    mj = dmin.astype(np.float32)[:, None] * mn
    safe = np.where(dj > 0, dj, 1.0)
    q = np.clip(_rint((x.reshape(n, 8, 32) + mj[:, :, None]) / safe[:, :, None]), 0, nmax)
    q = np.where(dj[:, :, None] > 0, q, 0).astype(np.uint8)
    return q, d, dmin, sc, mn


def quantize_q4_k(data: np.ndarray) -> np.ndarray:
    """float [..., k·256] → Q4_K bytes uint8 [..., k·144]."""
    shape = np.shape(data)
    x = _blocks(data)
    q, d, dmin, sc, mn = _affine_superblocks(x, 15)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(x.shape[0], 128)  # sub-block 2c low, 2c+1 high nibble
    out = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8),
                          _pack_scale_min_6bit(sc, mn), qs], axis=1)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * 144)


def quantize_q5_k(data: np.ndarray) -> np.ndarray:
    """float [..., k·256] → Q5_K bytes uint8 [..., k·176]."""
    shape = np.shape(data)
    x = _blocks(data)
    n = x.shape[0]
    q, d, dmin, sc, mn = _affine_superblocks(x, 31)
    low = q & 0x0F
    qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(n, 128)
    high = (q >> 4) & 1  # [n, 8, 32]: bit j of qh[l] is the 5th bit of sub-block j, element l
    qh = np.zeros((n, 32), dtype=np.uint8)
    for j in range(8):
        qh |= (high[:, j] << j).astype(np.uint8)
    out = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8),
                          _pack_scale_min_6bit(sc, mn), qh, qs], axis=1)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * 176)


def quantize_q6_k(data: np.ndarray) -> np.ndarray:
    """float [..., k·256] → Q6_K bytes uint8 [..., k·210]."""
    shape = np.shape(data)
    x = _blocks(data)
    n = x.shape[0]
    scales = make_qx_quants(x.reshape(n * 16, 16), 32).reshape(n, 16)
    pick = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(n), pick]
    zero = np.abs(max_scale) < 1e-15
    iscale = np.where(zero, 0.0, -128.0 / np.where(zero, 1.0, max_scale))
    d = np.where(zero, 0.0, 1.0 / np.where(iscale == 0, 1.0, iscale)).astype(np.float16)
    ls = np.minimum(_rint(iscale[:, None] * scales), 127).astype(np.int8)
    dj = d.astype(np.float32)[:, None] * ls.astype(np.float32)  # [n, 16]
    safe = np.where(dj != 0, dj, 1.0)
    q = np.clip(_rint(x.reshape(n, 16, 16) / safe[:, :, None]), -32, 31) + 32
    q = np.where(dj[:, :, None] != 0, q, 32).astype(np.uint8).reshape(n, 2, 4, 32)  # [half, k, l]
    ql = np.concatenate([(q[:, :, j] & 0x0F) | ((q[:, :, j + 2] & 0x0F) << 4) for j in (0, 1)], axis=2)
    qh = np.zeros((n, 2, 32), dtype=np.uint8)
    for k in range(4):
        qh |= ((q[:, :, k] >> 4) & 0x03) << (2 * k)
    out = np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), ls.view(np.uint8),
                          d.reshape(-1, 1).view(np.uint8)], axis=1)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * 210)
