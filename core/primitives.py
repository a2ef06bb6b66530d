"""Stateless affine-quantization primitives: choose qparams, quantize, dequantize, pack, unpack.

One granularity notion covers per-tensor, per-channel and per-group (torchao-style block view):
a weight [out, in] is viewed as [rows, G, group] where

  TENSOR  -> rows = 1,   G = 1,            group = out·in   (scale [1, 1])
  CHANNEL -> rows = out, G = 1,            group = in       (scale [out, 1])
  GROUP   -> rows = out, G = ceil(in/group_size), group = group_size (scale [out, G])

When group_size does not divide in, the last group is *ragged*: it holds the in % group_size
columns that are left, and its range is taken over those columns only (the reference GPTQ
implementation and the GPTQ checkpoint layout do the same: ceil(in/group_size) scale rows,
g_idx = column // group_size). Internally such a weight is handled as two parts, the
[rows, in // group_size, group_size] block view of the dividing columns and the [rows, 1, tail]
view of the tail, so that a dividing group size runs exactly the operations it always did.

Grid (DESIGN §4): q = clamp(round(x/s) + z, 0, 2^b − 1), x̂ = s·(q − z). Codes are always stored
unsigned; symmetric uses z = 2^(b−1) and s = absmax/(2^(b−1) − 1), so the code 0 is never produced
and the grid is symmetric around z. Asymmetric stretches [min, max] (widened to include 0) over
the full range with z = round(−min/s).
"""
from __future__ import annotations

import math
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, TypeVar

import torch

from core import buffers, native
from core.config import Granularity
from core.qtensors import IntWeight

T = TypeVar("T")

# Candidate clip ratios for the range search: 1.0 down to 0.5 in 20 steps.
CLIP_RATIOS: tuple[float, ...] = tuple(1.0 - 0.5 * i / 19 for i in range(20))

# Bits -> (codes per chunk, bytes per chunk): the smallest run of codes that fills whole bytes.
_BYTE_CHUNKS: dict[int, tuple[int, int]] = {
    1: (8, 1),
    2: (4, 1),
    3: (8, 3),
    4: (2, 1),
    5: (8, 5),
    6: (4, 3),
    7: (8, 7),
    8: (1, 1),
}

# Bits -> codes per int32 word, for the GPTQ/AWQ/compressed-tensors layouts (no cross-word codes).
_INT32_PER_WORD: dict[int, int] = {2: 16, 4: 8, 8: 4}


def _label(name: str | None) -> str:
    return f" of {name}" if name else ""


def _divisor_hint(in_features: int, group_size: int) -> str:
    """Up to three group sizes (multiples of 8 that divide in_features) closest to the request."""
    divisors = [d for d in range(8, in_features, 8) if in_features % d == 0]
    divisors.sort(key=lambda d: (abs(d - group_size), d))
    picks = sorted(divisors[:3])
    if not picks:
        return "use -1 (per-channel)"
    if len(picks) == 1:
        return f"use {picks[0]} or -1 (per-channel)"
    return f"use {', '.join(map(str, picks))} or -1 (per-channel)"


def common_divisor_hint(widths: list[int] | set[int] | tuple[int, ...], group_size: int, sep: str = "/") -> str:
    """Up to three group sizes (multiples of 8) that divide every width in `widths`, closest to
    `group_size`, joined by `sep` ("64/96/192"); "" when there is none."""
    g = 0
    for w in widths:
        g = math.gcd(g, int(w))
    divisors = [d for d in range(8, g + 1, 8) if g % d == 0]
    divisors.sort(key=lambda d: (abs(d - group_size), d))
    return sep.join(map(str, sorted(divisors[:3])))


def resolve_group_size(
    in_features: int, granularity: Granularity | str, group_size: int, name: str | None = None
) -> int:
    """Columns per scale group for a weight with `in_features` columns.

    group_size ≤ 0 (e.g. -1) or ≥ in_features with GROUP means one group per row (per-channel).
    A group size that does not divide in_features is returned as it is: the last of the
    ceil(in_features / group_size) groups is ragged (see `ragged_tail`). `name` is accepted for
    the callers' messages and unused.
    """
    granularity = Granularity(granularity)
    if granularity is not Granularity.GROUP or group_size <= 0 or group_size >= in_features:
        return in_features
    return group_size


def num_groups(in_features: int, group_size: int) -> int:
    """Scale groups per row: ceil(in_features / group_size) (1 for group_size ≤ 0)."""
    return -(-in_features // group_size) if 0 < group_size < in_features else 1


def ragged_tail(in_features: int, group_size: int) -> int:
    """Columns in the ragged last group (0 when group_size divides in_features or is per-channel)."""
    return in_features % group_size if 0 < group_size < in_features else 0


def _blocks(w: torch.Tensor, granularity: Granularity, group_size: int) -> list[torch.Tensor]:
    """w [out, in] as [rows, G, group] block views (see module docstring): one part when the
    groups tile the columns, else the dividing columns [out, in // gs, gs] and the ragged tail
    [out, 1, in % gs]. Concatenating per-part results along dim 1 gives the [rows, G] grid."""
    out, n_in = w.shape
    if granularity is Granularity.TENSOR:
        return [w.reshape(1, 1, out * n_in)]
    full = n_in // group_size
    if full * group_size == n_in:
        return [w.reshape(out, full, group_size)]
    main = full * group_size
    return [w[:, :main].reshape(out, full, group_size), w[:, main:].unsqueeze(1)]


def _cat_groups(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def exact_divisor(t: torch.Tensor, d: float) -> float | torch.Tensor:
    """`d` as the divisor of `t / d` that gives the correctly rounded quotient on t's device.

    On a GPU, torch divides by a Python (or CPU) scalar as t · (1/d), which is off by one ulp for
    some values, so scales and codes would differ from the CPU's in the last bit; a 0-dim tensor
    on the same device takes the true division. The CPU already divides exactly."""
    return d if t.device.type == "cpu" else torch.full((), d, dtype=t.dtype, device=t.device)


def _qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale/zero for ranges lo ≤ 0 ≤ hi (float32, any shape)."""
    if sym:
        qmax = 2 ** (bits - 1) - 1
        amax = torch.maximum(-lo, hi)
        # An all-zero group has no range; scale 1 keeps the grid finite and still decodes to 0.
        scale = torch.where(amax > 0, amax / exact_divisor(amax, qmax), torch.ones_like(amax))
        zero = torch.full_like(scale, 2 ** (bits - 1), dtype=torch.int32)
        return scale, zero
    qmax = 2**bits - 1
    span = hi - lo
    scale = torch.where(span > 0, span / exact_divisor(span, qmax), torch.ones_like(span))
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax).to(torch.int32)
    return scale, zero


def _fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """x [..., group] with scale/zero [..., 1] → dequantized grid values, float32."""
    zf = zero.float()
    q = torch.clamp(torch.round(x / scale) + zf, 0, 2**bits - 1)
    return (q - zf) * scale


def choose_qparams(
    w: torch.Tensor,
    bits: int,
    sym: bool,
    granularity: Granularity | str = Granularity.GROUP,
    group_size: int = 128,
    clip_search: bool = False,
    name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the affine grid for weight w.

    w: float [out, in]. Returns scale float32 [rows, G] and zero int32 [rows, G] with rows/G as in
    the module docstring ([1, 1] per-tensor, [out, 1] per-channel, [out, ceil(in/group_size)]
    per-group; a ragged last group's range covers its own columns only).
    clip_search: for each group try every ratio of CLIP_RATIOS on its range and keep the one with
    the lowest reconstruction MSE (all groups at once; one pass per ratio). The squared errors
    are summed in float64, where a group's sum of float32 squares is exact in practice: the
    choice then does not depend on the summation order, which differs between CPU and GPU.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in]{_label(name)}, got shape {tuple(w.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be between 1 and 8{_label(name)}, got {bits}")
    granularity = Granularity(granularity)
    gs = resolve_group_size(w.shape[1], granularity, group_size, name)
    parts = _blocks(w if w.dtype == torch.float32 else w.float(), granularity, gs)
    # amin and amax separately: torch's fused aminmax over the last dim is ~6x slower on CPU.
    ranges = [(x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)) for x in parts]
    lo, hi = _cat_groups([r[0] for r in ranges]), _cat_groups([r[1] for r in ranges])
    # A NaN/Inf anywhere in a group makes its min or max non-finite: the only full-tensor finite
    # check this weight needs.
    if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())):
        _raise_non_finite(w, name)
    lo = lo.clamp_(max=0)
    hi = hi.clamp_(min=0)
    scale, zero = _qparams_from_range(lo, hi, bits, sym)
    if clip_search:
        best_err = torch.full_like(scale, math.inf, dtype=torch.float64)
        bounds = [0, parts[0].shape[1], lo.shape[1]]
        for ratio in CLIP_RATIOS:
            s, z = _qparams_from_range(lo * ratio, hi * ratio, bits, sym)
            if len(parts) == 1:
                err = (_fake_quant(parts[0], s, z, bits) - parts[0]).square().sum(dim=-1, keepdim=True,
                                                                                    dtype=torch.float64)
            else:
                err = torch.cat([(_fake_quant(x, s[:, g0:g1], z[:, g0:g1], bits) - x).square().sum(
                    dim=-1, keepdim=True, dtype=torch.float64)
                                 for x, g0, g1 in zip(parts, bounds, bounds[1:])], dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    return scale.squeeze(-1), zero.squeeze(-1)


def _expand_groups(t: torch.Tensor, n_in: int, group_size: int) -> torch.Tensor:
    """[rows, G] per-group values → [rows, in] (or [rows, 1] when G == 1, left to broadcasting)."""
    if t.shape[1] == 1:
        return t
    return t.repeat_interleave(group_size, dim=1)[:, :n_in]


# Elements per chunk of the fused row loops: a 1 MiB float32 scratch per worker stays in cache
# with the weight rows it came from, and the per-chunk Python overhead stays below a few percent
# (measured on 8192×2048: 1 << 16 was 30% slower, 1 << 20 no faster).
_CHUNK_ELEMS = 1 << 18

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _workers(n: int) -> ThreadPoolExecutor:
    """A pool with at least `n` threads (grown, never shrunk, when a job asks for more)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < n:
            old = _pool
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="quantscope-chunks")
            _pool_size = n
            if old is not None:
                old.shutdown(wait=False)
        return _pool


def _group_view(n_in: int, scale: torch.Tensor, group_size: int) -> tuple[int, int, int] | None:
    """(columns per group, full groups, ragged tail columns) when (scale, group_size) cover the
    columns as ceil(n_in / group_size) groups (the last one possibly ragged), else None."""
    groups = scale.shape[1]
    if groups == 1:
        return n_in, 1, 0
    if group_size <= 0 or groups != -(-n_in // group_size):
        return None
    return group_size, n_in // group_size, n_in % group_size


def _over_row_chunks(out: int, n_in: int, fn: Callable[[int, int, torch.Tensor], T], scratches: int = 1,
                     device: torch.device | None = None) -> list[T]:
    """fn(r0, r1, scratch) for consecutive row chunks of an [out, n_in] weight on `device` (that of
    the weight; None = CPU); results in row order. `scratch` is a float32 buffer of `scratches`
    chunks on the same device.

    On the CPU the chunks are split between `row_workers()` Python workers (the job's thread
    count, see core.devices) that each run single-threaded torch ops (torch releases the GIL) and
    own a float32 scratch. Small elementwise ops on several OpenMP threads pay a barrier per op,
    and on a busy machine every barrier waits for a descheduled thread: measured 4× slower than
    this split on the 2-core CI box under load. torch's thread count is process-wide, so it is
    lowered only for the duration. On a GPU the whole weight is one chunk: a kernel covers it and
    per-chunk launches would only add latency.
    """
    if device is not None and device.type != "cpu":
        scratch = torch.empty(scratches * out * n_in, dtype=torch.float32, device=device)
        return [fn(0, out, scratch)]
    step = max(1, _CHUNK_ELEMS // max(n_in, 1))
    spans = [(r0, min(r0 + step, out)) for r0 in range(0, out, step)]
    rows = min(step, out)

    def run(part: list[tuple[int, int]]) -> list[T]:
        scratch = torch.empty(scratches * rows * n_in, dtype=torch.float32, device="cpu")
        return [fn(r0, r1, scratch) for r0, r1 in part]

    workers = min(_row_workers(), len(spans) // 2)
    if workers < 2:
        return run(spans)
    per = -(-len(spans) // workers)
    parts = [spans[k:k + per] for k in range(0, len(spans), per)]
    with single_threaded_torch():
        pool = _workers(len(parts) - 1)
        futures = [pool.submit(run, part) for part in parts[:-1]]
        last = run(parts[-1])
        return [r for f in futures for r in f.result()] + last


# torch's thread count from before `single_threaded_torch` lowered it to 1, while it is lowered.
_lowered_from: int | None = None


def torch_threads_outside() -> int:
    """torch's thread count as set outside any `single_threaded_torch` section."""
    return _lowered_from or torch.get_num_threads()


def _row_workers() -> int:
    """How many Python workers the row loops split their work between: the job's thread count
    (core.devices.row_workers; torch's thread count outside a job)."""
    from core.devices import row_workers

    return row_workers()


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """torch ops single-threaded for the duration; the row loops still use their workers.

    Small torch ops on several OpenMP threads pay a barrier each, and while the workers, the reader
    and the writer keep the cores busy, every barrier waits for a descheduled thread and the idle
    OpenMP threads spin meanwhile (a third of a streaming run's CPU time went there on 2 cores).
    The thread count is process-wide, so it is lowered only for the duration (nested uses are
    no-ops)."""
    global _lowered_from
    threads = torch.get_num_threads()
    if _lowered_from is not None or threads < 2:
        yield
        return
    _lowered_from = threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _lowered_from = None


def quantize_affine(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Codes of w on the grid (scale, zero).

    w: float [out, in]; scale float [rows, G], zero int [rows, G] with rows ∈ {1, out} and
    G = ceil(in/group_size) (or 1). Returns uint8 [out, in] in [0, 2^bits − 1].
    """
    out, n_in = w.shape
    view = _group_view(n_in, scale, group_size)
    qmax = 2**bits - 1
    if view is None:
        s = _expand_groups(scale.float(), n_in, group_size)
        z = _expand_groups(zero.float(), n_in, group_size)
        return torch.clamp(torch.round(w.float() / s) + z, 0, qmax).to(torch.uint8)
    # Row chunks through a float32 scratch: divide, round, shift and clamp in place while the
    # chunk is in cache, then narrow straight into the codes. Same operations, same order, as
    # clamp(round(w / s) + z) on the whole tensor, so the codes are bit-identical. A ragged last
    # group is the same four operations on the chunk's tail columns.
    gs, groups, tail = view
    main = groups * gs
    s3 = scale.float().reshape(scale.shape[0], -1, 1)
    z3 = zero.float().reshape(zero.shape[0], -1, 1)
    per_row = scale.shape[0] != 1
    codes = torch.empty(out, n_in, dtype=torch.uint8, device=w.device)

    def chunk(r0: int, r1: int, scratch: torch.Tensor) -> None:
        rows = r1 - r0
        s = s3[r0:r1] if per_row else s3
        z = z3[r0:r1] if per_row else z3
        x = (w[r0:r1] if not tail else w[r0:r1, :main]).reshape(rows, groups, gs)
        buf = scratch[: rows * main].view(rows, groups, gs)
        torch.div(x, s[:, :groups] if tail else s, out=buf)
        buf.round_().add_(z[:, :groups] if tail else z).clamp_(0, qmax)
        (codes[r0:r1] if not tail else codes[r0:r1, :main]).view(rows, groups, gs).copy_(buf)
        if tail:
            tbuf = scratch[rows * main: rows * n_in].view(rows, tail)
            torch.div(w[r0:r1, main:], s[:, groups], out=tbuf)
            tbuf.round_().add_(z[:, groups]).clamp_(0, qmax)
            codes[r0:r1, main:].copy_(tbuf)

    _over_row_chunks(out, n_in, chunk, device=w.device)
    return codes


def dequantize_affine(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:
    """x̂ = scale·(codes − zero). codes uint8 [out, in]; scale/zero [rows, G] (G = ceil(in/group_size),
    the last group possibly ragged). Returns float32 [out, in]."""
    n_in = codes.shape[1]
    s = _expand_groups(scale.float(), n_in, group_size)
    z = _expand_groups(zero.float(), n_in, group_size)
    return (codes.float() - z) * s


def affine_error_sums(
    w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> tuple[float, float] | None:
    """(Σ(w − x̂)², Σw²) for x̂ = dequantize_affine(codes, scale, zero), without materialising x̂.

    Row chunks: x̂ is rebuilt in a float32 scratch exactly as dequantize_affine computes it, the
    difference taken in float32, each chunk's squares summed in float32 and the chunk sums added
    in float64 (a ragged last group is rebuilt beside the others in the same scratch). Returns
    None when (scale, group_size) do not cover the columns (the caller then dequantizes in full).
    """
    out, n_in = codes.shape
    view = _group_view(n_in, scale, group_size)
    if view is None or tuple(w.shape) != (out, n_in):
        return None
    gs, groups, tail = view
    main = groups * gs
    s3 = scale.float().reshape(scale.shape[0], -1, 1)
    z3 = zero.float().reshape(zero.shape[0], -1, 1)
    per_row = scale.shape[0] != 1

    def chunk(r0: int, r1: int, scratch: torch.Tensor) -> tuple[float, float]:
        rows = r1 - r0
        s = s3[r0:r1] if per_row else s3
        z = z3[r0:r1] if per_row else z3
        x = (w[r0:r1] if not tail else w[r0:r1, :main]).reshape(rows, groups, gs)
        buf = scratch[: rows * main].view(rows, groups, gs)
        buf.copy_((codes[r0:r1] if not tail else codes[r0:r1, :main]).view(rows, groups, gs))
        buf.sub_(z[:, :groups] if tail else z).mul_(s[:, :groups] if tail else s)
        buf.sub_(x)
        xf = x.reshape(-1) if x.dtype == torch.float32 else x.reshape(-1).float()
        noise, signal = float(torch.linalg.vecdot(buf.view(-1), buf.view(-1))), float(torch.linalg.vecdot(xf, xf))
        if tail:
            xt = w[r0:r1, main:]
            tbuf = scratch[rows * main: rows * n_in].view(rows, tail)
            tbuf.copy_(codes[r0:r1, main:])
            tbuf.sub_(z[:, groups]).mul_(s[:, groups]).sub_(xt)
            xtf = xt.reshape(-1).float()
            noise += float(torch.linalg.vecdot(tbuf.view(-1), tbuf.view(-1)))
            signal += float(torch.linalg.vecdot(xtf, xtf))
        return noise, signal

    sums = _over_row_chunks(out, n_in, chunk, device=w.device)
    return math.fsum(n for n, _ in sums), math.fsum(s for _, s in sums)


def quantize_to_intweight(
    w: torch.Tensor,
    bits: int,
    sym: bool,
    granularity: Granularity | str = Granularity.GROUP,
    group_size: int = 128,
    clip_search: bool = False,
    dtype: torch.dtype = torch.float16,
    name: str | None = None,
    measure: bool = False,
) -> IntWeight:
    """Round-to-nearest in one call: w float [out, in] → IntWeight (codes uint8 [out, in],
    scale float32 / zero int32 [rows, G], G = ceil(in/group_size) with a ragged last group when
    group_size does not divide in). `dtype` records the source precision; `name` is used in
    error messages. With `measure`, the fused path also records the reconstruction error sums in
    `error_sums` (as `affine_error_sums` computes them) while each chunk is still in cache."""
    granularity = Granularity(granularity)
    gs = resolve_group_size(w.shape[1], granularity, group_size, name) if w.dim() == 2 else group_size
    sums = None
    if clip_search or granularity is Granularity.TENSOR or w.dim() != 2 or not 1 <= bits <= 8:
        scale, zero = choose_qparams(w, bits, sym, granularity, gs, clip_search, name)
        codes = quantize_affine(w, scale, zero, bits, gs)
    else:
        scale, zero, codes, sums = _rtn_rows(w, bits, sym, gs, name, measure)
    return IntWeight(codes=codes, scale=scale, zero=zero, bits=bits, group_size=gs, sym=sym, dtype=dtype,
                     error_sums=sums)


def _split_rows(out: int, fn: Callable[[int, int], T], min_rows: int = 64) -> list[T]:
    """fn(r0, r1) over [0, out) in contiguous parts of at least `min_rows` rows, one per row worker
    (`_row_workers`; fn must release the GIL, as the native kernels do), else in one call;
    results in row order."""
    workers = min(_row_workers(), out // min_rows)
    if workers < 2:
        return [fn(0, out)]
    bounds = [out * k // workers for k in range(workers + 1)]
    pool = _workers(workers - 1)
    futures = [pool.submit(fn, r0, r1) for r0, r1 in zip(bounds[:-2], bounds[1:-1])]
    last = fn(bounds[-2], bounds[-1])
    return [f.result() for f in futures] + [last]


def _rtn_rows_native(
    w: torch.Tensor, bits: int, sym: bool, gs: int, name: str | None, measure: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[float, float] | None] | None:
    """_rtn_rows in one native pass per group (core.native), None when no kernel applies (numba
    missing or disabled, a dtype or layout the kernel does not read)."""
    k = native.kernels()
    src = native.as_numpy(w) if k is not None else None
    if src is None:
        return None
    out, n_in = w.shape
    n_groups = -(-n_in // gs)
    # The kernels write through numpy views: host memory (as_numpy only accepts CPU weights).
    scale = torch.empty(out, n_groups, dtype=torch.float32, device="cpu")
    zero = torch.empty(out, n_groups, dtype=torch.int32, device="cpu")
    codes = buffers.pool.empty((out, n_in), torch.uint8)
    lut = native.table_for(w.dtype)
    s_np, z_np, c_np = scale.numpy(), zero.numpy(), codes.numpy()
    parts = _split_rows(out, lambda r0, r1: k.rtn_rows(src, lut, r0, r1, gs, bits, sym, s_np, z_np, c_np,
                                                       measure))
    if not bool(torch.isfinite(scale).all()):
        _raise_non_finite(w, name)
    sums = (math.fsum(p[0] for p in parts), math.fsum(p[1] for p in parts)) if measure else None
    return scale, zero, codes, sums


def _rtn_rows(
    w: torch.Tensor, bits: int, sym: bool, gs: int, name: str | None, measure: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[float, float] | None]:
    """choose_qparams + quantize_affine for per-group / per-channel grids in one pass over w: each
    row chunk gets its ranges, qparams and codes while it is in cache. Per group these are the
    same operations as the two-step path, so scale, zero and codes are bit-identical. A ragged
    last group (gs not dividing in) is handled in the same chunk from its own columns. With
    `measure` the chunk is then dequantized in the same scratch for (Σ(w − x̂)², Σw²): the same
    float32 operations as `affine_error_sums`, without reading the weight and codes again."""
    fused = _rtn_rows_native(w, bits, sym, gs, name, measure)
    if fused is not None:
        return fused
    out, n_in = w.shape
    groups, tail = n_in // gs, n_in % gs
    main = groups * gs
    qmax = 2**bits - 1
    n_groups = groups + (1 if tail else 0)
    dev = w.device
    scale = torch.empty(out, n_groups, dtype=torch.float32, device=dev)
    zero = torch.empty(out, n_groups, dtype=torch.int32, device=dev)
    codes = torch.empty(out, n_in, dtype=torch.uint8, device=dev)
    half = 2 ** (bits - 1)
    if sym:
        zero.fill_(half)

    # Written with as few torch calls per chunk as possible: the two workers share the GIL, and
    # per-call dispatch, not arithmetic, bounds this loop. Each step equals the corresponding one
    # of _qparams_from_range / quantize_affine (bit-identical scales, zeros and codes); non-finite
    # values make their group's scale non-finite and are reported once for the whole weight.
    def grid(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor | None:
        """Scale of every group of x [rows, G, g] (float32) into s [rows, G, 1]; for asymmetric
        grids the zero into z and its float copy returned."""
        lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
        if sym:
            torch.maximum(lo.neg_(), hi, out=s)  # max(−min(lo, 0), max(hi, 0)) once clamped at 0
            s.clamp_(min=0).div_(exact_divisor(s, half - 1))
            s.masked_fill_(s == 0, 1.0)  # an all-zero group: scale 1 decodes to 0
            return None
        lo.clamp_(max=0)
        torch.sub(hi.clamp_(min=0), lo, out=s)
        s.div_(exact_divisor(s, qmax)).masked_fill_(s == 0, 1.0)
        zf = lo.neg_().div_(s).round_().clamp_(0, qmax)
        z.copy_(zf)
        return zf

    def round_into(x: torch.Tensor, buf: torch.Tensor, s: torch.Tensor, zf: torch.Tensor | None,
                   dest: torch.Tensor, ints: torch.Tensor) -> tuple[float, float]:
        torch.div(x, s, out=buf)
        buf.round_().add_(half if zf is None else zf).clamp_(0, qmax)
        # float32 → int32 → uint8 is ~1.5x faster than float32 → uint8 in one copy.
        ints.copy_(buf)
        dest.copy_(ints)
        if not measure:
            return 0.0, 0.0
        buf.sub_(half if zf is None else zf).mul_(s).sub_(x)
        xv = x.reshape(-1)
        return float(torch.linalg.vecdot(buf.view(-1), buf.view(-1))), float(torch.linalg.vecdot(xv, xv))

    def chunk(r0: int, r1: int, scratch: torch.Tensor) -> tuple[float, float]:
        rows = r1 - r0
        m = rows * n_in
        if w.dtype == torch.float32:
            xf = w[r0:r1]
        else:  # one exact conversion; float32 reductions are ~5x faster than bf16 ones
            xf = scratch[:m].view(rows, n_in)
            xf.copy_(w[r0:r1])
        work = scratch[m: 2 * m]
        ints = scratch[2 * m: 3 * m].view(torch.int32)
        x = (xf if not tail else xf[:, :main]).view(rows, groups, gs)
        s = scale[r0:r1, :groups].unsqueeze(-1)
        zf = grid(x, s, zero[r0:r1, :groups].unsqueeze(-1))
        dest = (codes[r0:r1] if not tail else codes[r0:r1, :main]).view(rows, groups, gs)
        noise, signal = round_into(x, work[: rows * main].view(rows, groups, gs), s, zf, dest,
                                   ints[: rows * main].view(rows, groups, gs))
        if tail:
            xt = xf[:, main:]
            st = scale[r0:r1, groups:]
            zt = grid(xt, st, zero[r0:r1, groups:])
            n_t, s_t = round_into(xt, work[rows * main: m].view(rows, tail), st, zt, codes[r0:r1, main:],
                                  ints[rows * main: m].view(rows, tail))
            noise, signal = noise + n_t, signal + s_t
        return noise, signal

    parts = _over_row_chunks(out, n_in, chunk, scratches=3, device=dev)
    if not bool(torch.isfinite(scale).all()):
        _raise_non_finite(w, name)
    sums = (math.fsum(p[0] for p in parts), math.fsum(p[1] for p in parts)) if measure else None
    return scale, zero, codes, sums


def _raise_non_finite(w: torch.Tensor, name: str | None) -> None:
    # A NaN/Inf anywhere in a group makes its min or max, hence its scale, non-finite.
    n_bad = int((~torch.isfinite(w)).sum())
    raise ValueError(f"weight{_label(name)} contains {n_bad} NaN/Inf value(s); the checkpoint is damaged, "
                     "re-download or repair it before quantizing")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes uint8 [..., n] (values < 2^bits) into uint8 [..., ceil(n·bits/8)].

    Element order: one little-endian bit stream per row — code i occupies bits i·b … i·b + b − 1
    counted from the least significant bit of byte 0. So 4-bit puts the first code in the low
    nibble, and 3-bit stores 8 codes in 3 bytes. A short tail is zero-padded.
    """
    if bits not in _BYTE_CHUNKS:
        raise ValueError(f"cannot pack {bits}-bit codes; supported: {', '.join(map(str, _BYTE_CHUNKS))}")
    per_chunk, chunk_bytes = _BYTE_CHUNKS[bits]
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    c = codes if codes.dtype == torch.uint8 else codes.to(torch.uint8)
    if bits == 8:
        return c.clone(memory_format=torch.contiguous_format)
    if bits == 4 and n % 2 == 0 and sys.byteorder == "little" and c.is_contiguous() and c.storage_offset() % 2 == 0:
        # Each pair of codes read as one little-endian int16 v = lo + 256·hi: the byte of
        # v | (v >> 4) is lo | hi << 4. Two contiguous passes instead of strided ones (1.7× faster).
        # A contiguous tensor may still carry an odd stride on a size-1 dimension (a transposed
        # [n, 1] column is [1, n] with stride (1, 1)), which view(int16) refuses; re-viewing the
        # flat storage gives the canonical strides without a copy.
        c = c.view(-1).view(c.shape)
        if c.dim() == 2 and c.numel() >= _CHUNK_ELEMS * 4:
            return _pack4_rows(c)
        v = c.view(torch.int16)
        packed = v >> 4
        packed |= v
        return packed.to(torch.uint8)
    pad = (-n) % per_chunk
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*lead, -1, per_chunk)
    # The narrowest integer that holds a chunk: a byte for 1/2/4 bits (no widening at all), int32
    # for the 24-bit chunks of 3/6 bits, int64 only for the 40/56-bit chunks of 5/7 bits.
    wide = torch.uint8 if chunk_bytes == 1 else (torch.int32 if chunk_bytes <= 3 else torch.int64)
    word = c[..., 0].to(wide, copy=True)  # never OR into the caller's codes
    for j in range(1, per_chunk):  # ≤ 8 whole-tensor shifts, one per code slot of a chunk
        word |= c[..., j].to(wide) << (j * bits)
    if chunk_bytes == 1:
        out = word
    else:
        out = torch.empty(*word.shape, chunk_bytes, dtype=torch.uint8, device=word.device)
        for k in range(chunk_bytes):
            out[..., k] = (word >> (8 * k)) & 0xFF
        out = out.reshape(*lead, -1)
    return out[..., : math.ceil(n * bits / 8)].contiguous()


def _pack4_rows(c: torch.Tensor) -> torch.Tensor:
    """The int16 nibble packing of pack_codes for a large 2-D code matrix, by row chunks on the
    two workers of _over_row_chunks (a streaming job packs every layer of a model)."""
    rows, n = c.shape
    out = buffers.pool.empty((rows, n // 2), torch.uint8)
    k = native.kernels()
    if k is not None:
        c_np, o_np = c.numpy(), out.numpy()
        _split_rows(rows, lambda r0, r1: k.pack4_rows(c_np, o_np, r0, r1))
        return out
    v = c.view(torch.int16)

    def chunk(r0: int, r1: int, scratch: torch.Tensor) -> None:
        tmp = scratch.view(torch.int16)[: (r1 - r0) * (n // 2)].view(r1 - r0, n // 2)
        torch.bitwise_right_shift(v[r0:r1], 4, out=tmp)
        tmp.bitwise_or_(v[r0:r1])
        out[r0:r1].copy_(tmp)

    _over_row_chunks(rows, n, chunk)
    return out


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 [..., ceil(n·bits/8)] → uint8 [..., n]."""
    if bits not in _BYTE_CHUNKS:
        raise ValueError(f"cannot unpack {bits}-bit codes; supported: {', '.join(map(str, _BYTE_CHUNKS))}")
    per_chunk, chunk_bytes = _BYTE_CHUNKS[bits]
    lead = packed.shape[:-1]
    p = packed.to(torch.int64)
    pad = (-p.shape[-1]) % chunk_bytes
    if pad:
        p = torch.nn.functional.pad(p, (0, pad))
    p = p.reshape(*lead, -1, chunk_bytes)
    word = (p << (torch.arange(chunk_bytes, dtype=torch.int64, device=p.device) * 8)).sum(dim=-1, keepdim=True)
    codes = (word >> (torch.arange(per_chunk, dtype=torch.int64, device=word.device) * bits)) & (2**bits - 1)
    codes = codes.reshape(*lead, -1)
    if codes.shape[-1] < n:
        raise ValueError(f"packed tensor holds {codes.shape[-1]} {bits}-bit codes, fewer than the {n} requested")
    return codes[..., :n].to(torch.uint8).contiguous()


def pack_int32(codes: torch.Tensor, bits: int, axis: int = -1, order: list[int] | None = None) -> torch.Tensor:
    """Pack unsigned codes into int32 words along `axis` (GPTQ / AWQ / compressed-tensors layout).

    32/bits consecutive codes along `axis` form one word; code j of a word sits in bits
    j·b … j·b + b − 1 (little end first: the first code is in the least significant bits).
    `order` permutes the codes inside each word before packing: slot j holds code order[j]
    (AWQ's GEMM layout uses [0, 2, 4, 6, 1, 3, 5, 7] for 4-bit). The length along `axis` must be a
    multiple of 32/bits. Returns int32 with that axis shortened by 32/bits; words with the top bit
    set are negative (two's complement), as the loaders store them.
    """
    if bits not in _INT32_PER_WORD:
        raise ValueError(f"int32 packing supports {', '.join(map(str, _INT32_PER_WORD))} bits, got {bits}")
    per = _INT32_PER_WORD[bits]
    c = codes.to(torch.int64).movedim(axis, -1)
    n = c.shape[-1]
    if n % per:
        raise ValueError(f"cannot pack {n} {bits}-bit codes into int32: the count must be a multiple of {per}")
    c = c.reshape(*c.shape[:-1], n // per, per)
    if order is not None:
        c = c[..., order]
    shifts = torch.arange(per, dtype=torch.int64, device=c.device) * bits
    word = (c << shifts).sum(dim=-1)
    word = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
    return word.movedim(-1, axis).contiguous()


def unpack_int32(
    packed: torch.Tensor, bits: int, axis: int = -1, order: list[int] | None = None
) -> torch.Tensor:
    """Inverse of pack_int32: int32 words → uint8 codes, `axis` lengthened by 32/bits."""
    if bits not in _INT32_PER_WORD:
        raise ValueError(f"int32 packing supports {', '.join(map(str, _INT32_PER_WORD))} bits, got {bits}")
    per = _INT32_PER_WORD[bits]
    p = packed.to(torch.int64).movedim(axis, -1) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64, device=p.device) * bits
    c = (p.unsqueeze(-1) >> shifts) & (2**bits - 1)
    if order is not None:
        inverse = [0] * per
        for slot, src in enumerate(order):
            inverse[src] = slot
        c = c[..., inverse]
    c = c.reshape(*c.shape[:-2], -1).to(torch.uint8)
    return c.movedim(-1, axis).contiguous()
