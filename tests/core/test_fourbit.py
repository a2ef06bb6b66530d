from __future__ import annotations

import pytest
import torch
from torch import nn

from core.config import FourBitConfig
from core.events import CancelToken, Cancelled
from core.fourbit import (
    bits_per_weight,
    block_absmax,
    codebook,
    dequantize_4bit,
    dynamic_map,
    quantize_4bit,
    quantize_blockwise_8bit,
    unpack_nibbles,
)
from core.methods.base import LayerContext, get_quantizer

F = pytest.importorskip("bitsandbytes.functional")

DESIGN_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def _weight(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.05
    # values right at and around zero and exact midpoints exercise the tie rules
    flat = w.view(-1)
    flat[:40] = torch.linspace(-1e-4, 1e-4, 40)
    flat[64:80] = 0.0
    return w.to(dtype)


def test_codebooks_equal_design_and_bitsandbytes() -> None:
    assert codebook("nf4").tolist() == torch.tensor(DESIGN_NF4, dtype=torch.float32).tolist()
    assert torch.equal(codebook("nf4"), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(codebook("fp4"), F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_map(signed=True), F.create_dynamic_map(signed=True))
    with pytest.raises(ValueError, match="nf4"):
        codebook("int4")


SHAPES = [(64, 128), (33, 7), (5, 4096), (1001,)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
def test_packed_codes_and_absmax_bit_exact_with_bitsandbytes(dtype: torch.dtype, quant_type: str, blocksize: int) -> None:
    for i, shape in enumerate(SHAPES):
        w = _weight(shape, dtype, seed=i)
        ref_packed, ref_state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
        q = quantize_4bit(w, quant_type, blocksize)
        assert q.packed.shape == ref_packed.shape and q.packed.dtype == torch.uint8
        assert torch.equal(q.packed, ref_packed)
        assert torch.equal(q.absmax, ref_state.absmax)
        assert q.shape == tuple(shape) and q.dtype == dtype
        # dequantization matches bitsandbytes' own, cast to the source dtype
        ref = F.dequantize_4bit(ref_packed, ref_state).reshape(shape)
        assert torch.equal(dequantize_4bit(q, dtype), ref)
        assert torch.equal(q.dequantize().to(dtype), ref)


def _assert_double_quant_bit_exact(w: torch.Tensor, quant_type: str, blocksize: int, dequant: bool = True) -> None:
    ref_packed, ref_state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
    q = quantize_4bit(w, quant_type, blocksize, double_quant=True)
    assert q.double_quant and q.absmax.dtype == torch.uint8
    assert torch.equal(q.packed, ref_packed)
    assert torch.equal(q.offset, ref_state.offset)
    assert torch.equal(q.absmax, ref_state.absmax)  # nested 8-bit codes, no tolerance
    assert torch.equal(q.nested_absmax, ref_state.state2.absmax)
    assert torch.equal(q.nested_code, ref_state.state2.code)
    assert q.nested_blocksize == ref_state.state2.blocksize == 256
    assert torch.equal(block_absmax(q), F.dequantize_blockwise(ref_state.absmax, ref_state.state2) + ref_state.offset)
    if dequant:
        assert torch.equal(dequantize_4bit(q, w.dtype), F.dequantize_4bit(ref_packed, ref_state).reshape(w.shape))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64])
def test_double_quant_statistics_match_bitsandbytes(dtype: torch.dtype, quant_type: str, blocksize: int) -> None:
    _assert_double_quant_bit_exact(_weight((384, 256), dtype), quant_type, blocksize)
    # odd sizes: a short last 4-bit block and a short last nested block (1001 / 32 -> 32 absmax)
    _assert_double_quant_bit_exact(_weight((7, 1001), dtype, seed=1), quant_type, blocksize)


_LARGE: dict[torch.dtype, torch.Tensor] = {}


def _large_weight(dtype: torch.dtype) -> torch.Tensor:
    if dtype not in _LARGE:
        g = torch.Generator().manual_seed(1234)
        _LARGE[dtype] = (torch.randn(4096, 4096, generator=g) * 0.02).to(dtype)
    return _LARGE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_double_quant_bit_exact_on_large_normal_weights(dtype: torch.dtype, quant_type: str, blocksize: int) -> None:
    # 4096x4096 -> 262144 / 131072 absmax values: enough near-midpoint cases that an
    # exact-nearest rounding would differ from bitsandbytes' 65536-point grid in hundreds of places
    _assert_double_quant_bit_exact(_large_weight(dtype), quant_type, blocksize, dequant=False)


def test_nested_8bit_follows_bitsandbytes_grid_on_crafted_values() -> None:
    # midpoints of the dynamic map and their float neighbours, tiny values, ±0, an all-zero block
    # and a short last block: the cases where the kernel's grid differs from exact nearest rounding
    code = dynamic_map(signed=True)
    mids = (code[:-1] + code[1:]) * 0.5
    x = torch.cat([
        torch.tensor([1.0]), mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)),
        torch.tensor([-1.0]), torch.linspace(-1e-4, 1e-4, 700), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-40]),
        torch.zeros(256), torch.randn(300, generator=torch.Generator().manual_seed(3)) * 7,
    ])
    ref, state = F.quantize_blockwise(x, code=code.clone(), blocksize=256)
    idx, absmax = quantize_blockwise_8bit(x, code, 256)
    assert torch.equal(absmax, state.absmax)
    assert torch.equal(idx, ref)


def test_fp4_zero_signs_follow_bitsandbytes() -> None:
    # tiny negatives map to nibble 0b0000 (+0), tiny positives to 0b1000 (-0) in bitsandbytes
    w = torch.tensor([1.0, -1e-4, 1e-4, 0.0] + [0.5] * 60)
    q = quantize_4bit(w, "fp4", 64)
    ref_packed, _ = F.quantize_4bit(w, blocksize=64, quant_type="fp4")
    assert torch.equal(q.packed, ref_packed)
    nib = unpack_nibbles(q.packed, 4).tolist()
    assert nib[1:] == [0b0000, 0b1000, 0b0000]


@pytest.mark.parametrize("quant_type,bound", [("nf4", 0.11), ("fp4", 0.14)])
def test_round_trip_error_bound(quant_type: str, bound: float) -> None:
    w = _weight((256, 512), torch.float32)
    for dq in (False, True):
        q = quantize_4bit(w, quant_type, 64, dq)
        rel = float((q.dequantize() - w).norm() / w.norm())
        assert 0.02 < rel < bound
    # per-element: never more than half of the widest code gap times the block absmax
    q = quantize_4bit(w, quant_type, 64)
    code = codebook(quant_type).sort().values
    half_gap = float((code[1:] - code[:-1]).max()) / 2
    scale = q.absmax.repeat_interleave(64)[: w.numel()].reshape(w.shape)
    assert torch.all((q.dequantize() - w).abs() <= half_gap * scale + 1e-6)


def test_bits_per_weight() -> None:
    w = _weight((1024, 1024), torch.float16)
    assert bits_per_weight(quantize_4bit(w, "nf4", 64)) == pytest.approx(4.5, abs=1e-3)
    assert bits_per_weight(quantize_4bit(w, "nf4", 64, True)) == pytest.approx(4.127, abs=1e-3)


def test_bad_blocksize_and_dtype_rejected() -> None:
    with pytest.raises(ValueError, match="blocksize"):
        quantize_4bit(torch.randn(64), "nf4", 48)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        quantize_4bit(torch.ones(64, dtype=torch.int32), "nf4", 64)


def _ctx(cancel: CancelToken | None = None) -> LayerContext:
    torch.manual_seed(0)
    m = nn.Module()
    m.up_proj = nn.Linear(64, 96, bias=False)
    m.down_proj = nn.Linear(96, 64, bias=False)
    return LayerContext(index=0, num_layers=1, prefix="model.layers.0", module=m,
                        linears={"mlp.up_proj": m.up_proj, "mlp.down_proj": m.down_proj},
                        cancel=cancel, extra={"source_dtype": torch.float16})


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_fourbit_quantizer_matches_direct_call(quant_type: str) -> None:
    cfg = FourBitConfig(quant_type=quant_type, blocksize=64, double_quant=True)
    quantizer = get_quantizer(cfg)
    assert quantizer.needs_calibration is False
    ctx = _ctx()
    out = quantizer.quantize_layer(ctx)
    assert set(out) == set(ctx.linears)
    for name, q in out.items():
        w = ctx.linears[name].weight.detach()
        ref = quantize_4bit(w.float(), quant_type, 64, True)
        assert torch.equal(q.packed, ref.packed) and q.dtype == torch.float16 and q.shape == tuple(w.shape)
        assert q.quant_type == quant_type and q.double_quant


def test_fourbit_quantizer_honours_cancel() -> None:
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        get_quantizer(FourBitConfig()).quantize_layer(_ctx(token))
