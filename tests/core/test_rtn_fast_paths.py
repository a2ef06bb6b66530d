"""The streaming fast paths of RTN (fused row-chunk quantization, fused weight error, 4-bit int16
packing, finite check) against straightforward whole-tensor references."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

import core.primitives as P
from core import native
from core.engine import _check_finite, layer_weight_error
from core.metrics import weight_error
from core.qtensors import IntWeight


def _reference_codes(w: torch.Tensor, bits: int, sym: bool, gs: int) -> tuple[torch.Tensor, ...]:
    """choose_qparams + quantize_affine spelled out on the whole tensor (the pre-fusion algorithm)."""
    out, n_in = w.shape
    x = w.reshape(out, n_in // gs, gs)
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
    scale, zero = P._qparams_from_range(lo, hi, bits, sym)
    s = scale.squeeze(-1).repeat_interleave(gs, dim=1)
    z = zero.squeeze(-1).float().repeat_interleave(gs, dim=1)
    codes = torch.clamp(torch.round(w / s) + z, 0, 2**bits - 1).to(torch.uint8)
    return codes, scale.squeeze(-1), zero.squeeze(-1)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny chunks so that every shape below goes through the two-worker split.
    monkeypatch.setattr(P, "_CHUNK_ELEMS", 256)


@pytest.mark.parametrize("bits", range(2, 9))
def test_fused_rtn_codes_are_bit_identical_to_whole_tensor_reference(bits: int, small_chunks: None) -> None:
    g = torch.Generator().manual_seed(bits)
    for (out, n_in), sym, gran, gs in itertools.product([(37, 128), (64, 384), (9, 256)], (True, False),
                                                         ("channel", "group"), (32, 128)):
        if gran == "channel" and gs != 32:
            continue
        w = torch.randn(out, n_in, generator=g) * torch.rand(out, 1, generator=g) * 4
        w[3, :] = 0.0  # an all-zero row: scale 1
        eff = n_in if gran == "channel" else P.resolve_group_size(n_in, gran, gs)
        q = P.quantize_to_intweight(w, bits, sym, gran, gs)
        codes, scale, zero = _reference_codes(w, bits, sym, eff)
        assert torch.equal(q.codes, codes), (bits, out, n_in, sym, gran, gs)
        assert torch.equal(q.scale, scale) and torch.equal(q.zero, zero)
        # quantize_affine on the same grid (the path GPTQ/AWQ use) agrees too
        assert torch.equal(P.quantize_affine(w, q.scale, q.zero, bits, eff), codes)


def test_fused_weight_error_matches_float64_reference(small_chunks: None) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g)
    for bits, gran in [(2, "group"), (4, "group"), (8, "channel"), (3, "tensor")]:
        q = P.quantize_to_intweight(w, bits, False, gran, 64)
        ref = weight_error(w, P.dequantize_affine(q.codes, q.scale, q.zero, q.group_size))
        got = layer_weight_error(w, q)
        for k in ("mse", "rel_error", "sqnr_db"):
            assert got[k] == pytest.approx(ref[k], rel=1e-5), (bits, gran, k)
    exact = IntWeight(codes=torch.full((4, 8), 8, dtype=torch.uint8), scale=torch.ones(4, 1),
                      zero=torch.full((4, 1), 8, dtype=torch.int32), bits=4, group_size=8, sym=True)
    m = layer_weight_error(torch.zeros(4, 8), exact)
    assert m["mse"] == 0.0 and m["rel_error"] == 0.0 and m["sqnr_db"] == float("inf")


def test_non_finite_weight_is_named_by_the_fused_pass(small_chunks: None) -> None:
    w = torch.randn(64, 128)
    w[50, 3] = float("inf")
    w[60, 100] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.up_proj contains 2 NaN/Inf"):
        P.quantize_to_intweight(w, 4, True, "group", 64, name="model.layers.2.mlp.up_proj")


def _bitstream_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """pack_codes by its definition: code i at bits i·b … of one little-endian stream per row."""
    rows = []
    for row in codes.tolist():
        acc = sum(int(c) << (i * bits) for i, c in enumerate(row))
        nbytes = -(-len(row) * bits // 8)
        rows.append(list(acc.to_bytes(nbytes, "little")))
    return torch.tensor(rows, dtype=torch.uint8)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_pack_codes_matches_bit_stream_definition(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    for n in (1, 7, 16, 30):
        codes = torch.randint(0, 2**bits, (3, n), generator=g, dtype=torch.uint8)
        assert torch.equal(P.pack_codes(codes, bits), _bitstream_pack(codes, bits)), (bits, n)
    odd_offset = torch.randint(0, 16, (65,), generator=g, dtype=torch.uint8)[1:]  # storage offset 1
    assert torch.equal(P.pack_codes(odd_offset, 4), _bitstream_pack(odd_offset[None], 4)[0])


class _Src:
    class _T:
        file = Path("model-00001.safetensors")

    tensors = {"x": _T()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
def test_finite_check_rejects_inf_and_accepts_large_finite(dtype: torch.dtype) -> None:
    big = torch.full((1000,), 240.0 if dtype == torch.float8_e4m3fn else 6.0e4).to(dtype)
    _check_finite("x", big, _Src())  # an fp16 sum overflows here: only the exact test may decide
    bad = torch.zeros(1000).to(dtype)
    bad[10] = float("nan")
    with pytest.raises(ValueError, match=r"tensor x in model-00001\.safetensors contains 1 NaN/Inf"):
        _check_finite("x", bad, _Src())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_error_measured_while_rounding_equals_separate_error_pass(dtype: torch.dtype, small_chunks: None) -> None:
    g = torch.Generator().manual_seed(7)
    for (out, n_in), gs, bits, sym in itertools.product([(37, 256), (64, 576)], (64, 128, -1), (3, 4, 8),
                                                        (True, False)):
        w = (torch.randn(out, n_in, generator=g) * 0.02).to(dtype)
        measured = P.quantize_to_intweight(w, bits, sym, "group", gs, measure=True)
        plain = P.quantize_to_intweight(w, bits, sym, "group", gs)
        assert plain.error_sums is None and torch.equal(measured.codes, plain.codes)
        noise, signal = measured.error_sums
        ref = weight_error(w.float(), plain.dequantize().float())
        assert noise / out / n_in == pytest.approx(ref["mse"], rel=1e-4)
        assert (noise / signal) ** 0.5 == pytest.approx(ref["rel_error"], rel=1e-4)
        separate = P.affine_error_sums(w, plain.codes, plain.scale, plain.zero, plain.group_size)
        if native.kernels() is not None:  # one pass per group, summed in another order
            assert noise == pytest.approx(separate[0], rel=1e-5) and signal == pytest.approx(separate[1], rel=1e-5)
        elif n_in % (gs if gs > 0 else n_in) == 0:  # no ragged tail: the same float32 ops as the separate pass
            assert (noise, signal) == separate
        assert layer_weight_error(w, measured) == pytest.approx(layer_weight_error(w, plain), rel=1e-5)
