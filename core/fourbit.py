"""NF4 / FP4 blockwise 4-bit quantization, bit-for-bit the layout of bitsandbytes'
`quantize_4bit` / `dequantize_4bit` (verified against bitsandbytes 0.50 on CPU in the tests).

Layout: the tensor is flattened and cut into blocks of `blocksize` values; each block stores its
absmax (float32) and each value the index of the nearest codebook entry of x/absmax. Two indices
per byte, the first element in the high nibble; an odd count is padded with a zero value.
Double quantization ("compress_statistics") subtracts the mean of the absmax values and stores
them as 8-bit indices into the signed dynamic map, blockwise (256) with their own float32 absmax.
"""
from __future__ import annotations

import torch

from core.qtensors import FourBitWeight

# bitsandbytes get_4bit_type("nf4"): quantiles of N(0, 1), normalised to [-1, 1] (DESIGN §4).
NF4_VALUES: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# bitsandbytes FP4: 1 sign, 2 exponent, 1 mantissa bit, exponent bias 2, listed in bit-pattern
# order (index = the stored nibble), then divided by the largest magnitude (12).
_FP4_RAW: tuple[float, ...] = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                               -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
FP4_VALUES: tuple[float, ...] = tuple(v / 12.0 for v in _FP4_RAW)

_CODEBOOKS: dict[str, tuple[float, ...]] = {"nf4": NF4_VALUES, "fp4": FP4_VALUES}

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256


def codebook(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 code values of "nf4" or "fp4", float32 [16] on `device`, indexed by the stored nibble."""
    if quant_type not in _CODEBOOKS:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return torch.tensor(_CODEBOOKS[quant_type], dtype=torch.float32, device=device)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic-exponent map (create_dynamic_map), float32 [256], sorted.

    For each exponent e = 0 … max_exponent_bits−1 the fraction range [0.1, 1] is cut into
    2^(e + non_sign − max_exp) (signed) equal bins whose midpoints, scaled by 10^(e − max_exp + 1),
    become code values (and their negatives); 0 and 1 complete the map. Arithmetic is float32 as
    in bitsandbytes so the values agree exactly.
    """
    non_sign = total_bits - 1
    extra = 2 ** (non_sign - max_exponent_bits) - 1
    values: list[float] = []

    def add(items: int, exponent: int) -> None:
        # Built on the CPU whatever `device` is: the map is a constant, computed once the same way.
        edges = torch.linspace(0.1, 1, items, dtype=torch.float32, device="cpu")
        mids = (edges[:-1] + edges[1:]) / 2.0
        magnitude = 10 ** (-(max_exponent_bits - 1) + exponent)
        values.extend((magnitude * mids).tolist())
        if signed:
            values.extend((-magnitude * mids).tolist())

    for e in range(max_exponent_bits):
        fraction_bits = e + non_sign - max_exponent_bits + (0 if signed else 1)
        add(2**fraction_bits + 1, e)
    if extra > 0:
        add(extra + 1, max_exponent_bits - 1)
    values += [0.0, 1.0]
    values += [0.0] * (2**total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def _nibble_order(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between sorted code values and the nibble of each sorted position.

    A value exactly on a midpoint goes to the lower code (bucketize, right=False) — the CPU
    reference's tie rule. FP4 has +0 and −0; the stable sort keeps +0 first, so (−0.03, 0] maps to
    nibble 0b0000 and (0, 0.03] to 0b1000, as bitsandbytes does."""
    order = torch.argsort(code, stable=True)
    sorted_code = code[order]
    return (sorted_code[:-1] + sorted_code[1:]) / 2, order


def _block_absmax_and_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flat float32 [n] → (absmax float32 [ceil(n/blocksize)], x/absmax clamped to [-1, 1]).

    Full blocks multiply by the reciprocal of absmax (an all-zero block keeps absmax 0 and divides
    by 1e-38); a short last block divides by its absmax floored at 1e-38 and stores that floor —
    the exact arithmetic of bitsandbytes' reference kernel, which decides the rounding of ties."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=-1) if full else torch.empty(0, dtype=torch.float32, device=flat.device)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    if rem:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_max, -1, 1)])
    return absmax, scaled


# bitsandbytes 0.50's CPU kernel (quantize_cpu_impl in libbitsandbytes_cpu.so) does not search the
# code per value: it discretises [-1, 1] into a 65536-entry grid and precomputes, once per code
# table, the code index for every grid point. The helpers below reproduce that arithmetic
# step for step in float32 (checked against the disassembly of the shipped .so and by probing it
# with midpoints ± 1 ulp, tiny values, ±0 and all-zero blocks).
_LUT_SIZE = 65536


def _grid_lut(code: torch.Tensor) -> torch.Tensor:
    """int64 [65536]: the code index bitsandbytes assigns to grid point i.

    Grid point i is the float32 value (2·i)/65535 − 1 (rounded after the division and after the
    subtraction, as the kernel does), and gets the first code whose midpoint
    0.5·(code[j] + code[j+1]) (float32) is not below it: a grid point exactly on a midpoint takes
    the lower code."""
    # Built on the CPU and moved: a GPU divides by the Python scalar as a product with its
    # reciprocal, which moves some grid points by an ulp (and so their codes).
    c = code.detach().float().to("cpu").contiguous()
    mids = ((c[:-1] + c[1:]) * 0.5).contiguous()
    grid = (torch.arange(_LUT_SIZE, dtype=torch.float32, device="cpu") * 2.0) / float(_LUT_SIZE - 1) - 1.0
    return torch.searchsorted(mids, grid, right=False).clamp(max=c.numel() - 1).to(code.device)


def _grid_index(normed: torch.Tensor) -> torch.Tensor:
    """float32 values (already x·(1/absmax)) → int64 grid index as the kernel computes it:
    clamp to [-1, 1], t = (v + 1)·0.5 in float32, then fma(t, 65535, 0.5) with ONE rounding to
    float32 (the .so uses vfmadd213ss), truncated toward zero and kept to 16 bits. The fma is
    exact in float64 here (t·65535 + 0.5 needs < 53 bits), so rounding that to float32 is the
    fused result."""
    v = torch.clamp(normed, -1.0, 1.0)
    t = (v + 1.0) * 0.5
    fused = (t.double() * float(_LUT_SIZE - 1) + 0.5).float()
    return fused.long() & 0xFFFF


def quantize_blockwise_8bit(
    x: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization onto a sorted 256-entry map (used for nested absmax).

    x [n] (converted to float32) → (indices uint8 [n], absmax float32 [ceil(n/blocksize)]),
    bit for bit bitsandbytes 0.50's CPU `quantize_blockwise`: each value is multiplied by the
    float32 reciprocal of its block's absmax (not divided), mapped onto the 65536-point grid
    (`_grid_index`) and takes that grid point's code (`_grid_lut`). This is nearest-code rounding
    only up to the grid step (~3e-5): values within half a grid step of a midpoint, and the tiny
    values whose codes are closer together than the grid, take the code of their grid point —
    exactly as bitsandbytes stores them. A block whose values are all 0 gets index 0 (bitsandbytes
    zero-fills it; absmax 0 decodes it to 0 whatever the index).
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    inv = 1.0 / absmax
    idx = _grid_lut(code)[_grid_index(blocks * inv.unsqueeze(1))]
    idx = torch.where((absmax == 0).unsqueeze(1), torch.zeros_like(idx), idx)
    return idx.reshape(-1)[:n].to(torch.uint8), absmax


def dequantize_blockwise_8bit(
    idx: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> torch.Tensor:
    """indices uint8 [n] → float32 [n] = code[idx] · absmax[block]."""
    vals = code.float()[idx.reshape(-1).long()]
    n = vals.numel()
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return vals * scale


def quantize_4bit(
    w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False
) -> FourBitWeight:
    """Blockwise NF4/FP4 of w (float32/float16/bfloat16, any shape) → FourBitWeight.

    packed uint8 [ceil(n/2), 1]; absmax float32 [ceil(n/blocksize)], or with double_quant uint8
    indices plus nested_absmax float32 [ceil(n_blocks/256)], nested_code (dynamic map) and
    offset (float32 scalar, the mean absmax)."""
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, got {blocksize}")
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"4-bit quantization needs a float32/float16/bfloat16 tensor, got {w.dtype}")
    bounds, order = _nibble_order(codebook(quant_type, w.device))
    absmax, scaled = _block_absmax_and_scaled(w.reshape(-1).float(), blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    nibbles = order[torch.bucketize(scaled, bounds)].to(torch.uint8)
    packed = ((nibbles[0::2] << 4) | nibbles[1::2]).unsqueeze(1)
    q = FourBitWeight(packed=packed, absmax=absmax, quant_type=quant_type, blocksize=blocksize,
                      shape=tuple(w.shape), dtype=w.dtype)
    if double_quant:
        # The mean on the CPU whatever the device: a GPU's reduction sums in another order, and
        # the last bit of the offset decides nested codes.
        offset = absmax.to("cpu").mean().to(absmax.device)
        nested_code = dynamic_map(signed=True, device=w.device)
        idx, nested_absmax = quantize_blockwise_8bit(absmax - offset, nested_code, NESTED_BLOCKSIZE)
        q.absmax = idx
        q.nested_absmax = nested_absmax
        q.nested_code = nested_code
        q.nested_blocksize = NESTED_BLOCKSIZE
        q.offset = offset
    return q


def block_absmax(q: FourBitWeight) -> torch.Tensor:
    """The per-block float32 absmax, undoing double quantization when present."""
    if not q.double_quant:
        return q.absmax.float()
    code = q.nested_code if q.nested_code is not None else dynamic_map(signed=True, device=q.absmax.device)
    absmax = dequantize_blockwise_8bit(q.absmax, q.nested_absmax, code, q.nested_blocksize)
    return absmax + q.offset.float()


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """packed uint8 [ceil(n/2), 1] (high nibble first) → uint8 [n] codebook indices."""
    flat = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    nibbles = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)
    return nibbles[:n]


def dequantize_4bit(q: FourBitWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FourBitWeight → tensor of q.shape: code[nibble] · absmax[block] computed in float32, then
    cast to `dtype` (casting to q.dtype reproduces bitsandbytes' dequantize_4bit exactly)."""
    n = 1
    for d in q.shape:
        n *= int(d)
    values = codebook(q.quant_type, q.packed.device)[unpack_nibbles(q.packed, n).long()]
    scale = block_absmax(q).repeat_interleave(q.blocksize)[:n]
    return (values * scale).reshape(q.shape).to(dtype)


def bits_per_weight(q: FourBitWeight) -> float:
    """Stored bits per weight including absmax and nested statistics (not the 16-entry codebook
    and not the per-tensor JSON metadata)."""
    n = 1
    for d in q.shape:
        n *= int(d)
    total = q.packed.numel() * q.packed.element_size() + q.absmax.numel() * q.absmax.element_size()
    if q.double_quant:
        total += q.nested_absmax.numel() * q.nested_absmax.element_size() + 4  # + float32 offset
    return 8.0 * total / n
