from __future__ import annotations

import pytest
import torch
from torch import nn

from core.config import Granularity, RTNConfig
from core.events import CancelToken, Cancelled
from core.methods.base import LayerContext, get_quantizer
from core.primitives import (
    choose_qparams,
    dequantize_affine,
    pack_codes,
    pack_int32,
    quantize_affine,
    quantize_to_intweight,
    unpack_codes,
    unpack_int32,
)


def _w(out: int = 48, n_in: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, n_in, generator=g) * 0.05


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gran", list(Granularity))
def test_round_trip_error_within_half_step(bits: int, sym: bool, gran: Granularity) -> None:
    w = _w()
    q = quantize_to_intweight(w, bits, sym, gran, 64)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == w.shape
    assert int(q.codes.max()) <= 2**bits - 1
    expected_shape = {Granularity.TENSOR: (1, 1), Granularity.CHANNEL: (48, 1), Granularity.GROUP: (48, 4)}[gran]
    assert tuple(q.scale.shape) == expected_shape and q.scale.dtype == torch.float32
    assert q.zero.dtype == torch.int32 and tuple(q.zero.shape) == expected_shape
    w_hat = q.dequantize()
    # without clipping every value lies on the grid's range, so the error is at most half a step
    step = q.scale.expand(48, -1).repeat_interleave(w.shape[1] // q.scale.shape[1], dim=1)
    assert torch.all((w - w_hat).abs() <= step / 2 + 1e-7)


def test_error_shrinks_with_bits_and_finer_groups() -> None:
    w = _w()
    errs = [(quantize_to_intweight(w, b, True, "group", 64).dequantize() - w).square().mean() for b in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2]
    by_gran = [
        (quantize_to_intweight(w, 4, False, g, 32).dequantize() - w).square().mean()
        for g in ("tensor", "channel", "group")
    ]
    assert by_gran[0] > by_gran[1] > by_gran[2]


def test_symmetric_scale_is_absmax_over_qmax_with_zero_at_midpoint() -> None:
    w = torch.tensor([[0.7, -1.4, 0.25, 0.0], [0.2, 0.3, -0.1, 0.05]])
    scale, zero = choose_qparams(w, 4, True, "channel", -1)
    assert torch.allclose(scale[:, 0], torch.tensor([1.4 / 7, 0.3 / 7]))
    assert zero.tolist() == [[8], [8]]
    codes = quantize_affine(w, scale, zero, 4, 4)
    assert codes[0].tolist() == [8 + 4, 8 - 7, 8 + 1, 8]


def test_asymmetric_range_includes_zero_and_zero_point_is_exact() -> None:
    w = torch.tensor([[0.5, 1.0, 2.0, 3.0]])  # all positive: the range is widened to [0, 3]
    scale, zero = choose_qparams(w, 8, False, "channel", -1)
    assert torch.allclose(scale, torch.tensor([[3.0 / 255]]))
    assert zero.item() == 0
    w_hat = dequantize_affine(quantize_affine(w, scale, zero, 8, 4), scale, zero, 4)
    assert torch.zeros(1).item() == dequantize_affine(zero.to(torch.uint8), scale, zero, 4).item()
    assert torch.allclose(w_hat, w, atol=3.0 / 255 / 2)
    w2 = torch.tensor([[-1.0, 0.0, 2.0, 0.5]])
    scale, zero = choose_qparams(w2, 4, False, "channel", -1)
    assert zero.item() == round(1.0 / (3.0 / 15))


def test_all_zero_group_decodes_to_zero() -> None:
    w = torch.zeros(4, 64)
    w[0, :32] = torch.linspace(-1, 1, 32)
    for sym in (True, False):
        q = quantize_to_intweight(w, 4, sym, "group", 32)
        assert torch.isfinite(q.scale).all()
        assert torch.equal(q.dequantize()[1:], torch.zeros(3, 64))


def test_clip_search_lowers_error_on_heavy_tailed_weights() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g)
    w[torch.rand(64, 256, generator=g) < 0.01] *= 12  # a few large outliers stretch the range
    for sym in (True, False):
        plain = (quantize_to_intweight(w, 3, sym, "group", 128).dequantize() - w).square().mean()
        clipped = (quantize_to_intweight(w, 3, sym, "group", 128, clip_search=True).dequantize() - w).square().mean()
        assert clipped < 0.9 * plain
        # never worse on any group, since ratio 1.0 is among the candidates
        qa = quantize_to_intweight(w, 3, sym, "group", 128)
        qb = quantize_to_intweight(w, 3, sym, "group", 128, clip_search=True)
        ea = (qa.dequantize() - w).square().reshape(64, 2, 128).sum(-1)
        eb = (qb.dequantize() - w).square().reshape(64, 2, 128).sum(-1)
        assert torch.all(eb <= ea + 1e-6)


def test_group_size_not_dividing_in_features_gives_ceil_groups_with_a_ragged_last_one() -> None:
    w = torch.randn(8, 200)
    q = quantize_to_intweight(w, 4, True, "group", 128, name="model.layers.0.mlp.down_proj")
    assert q.group_size == 128 and tuple(q.scale.shape) == (8, 2)
    # the ragged last group (72 columns) has the grid of those columns alone
    tail = quantize_to_intweight(w[:, 128:], 4, True, "channel", -1)
    assert torch.equal(q.scale[:, 1:], tail.scale) and torch.equal(q.codes[:, 128:], tail.codes)


def test_minus_one_group_size_means_per_channel() -> None:
    w = _w()
    a = quantize_to_intweight(w, 4, True, "group", -1)
    b = quantize_to_intweight(w, 4, True, "channel", 128)
    assert a.group_size == 256 and torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 64, 67])
def test_pack_codes_round_trip_and_size(bits: int, n: int) -> None:
    codes = torch.randint(0, 2**bits, (3, n), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, -(-n * bits // 8))
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_pack_codes_bit_order_is_little_endian_stream() -> None:
    assert pack_codes(torch.tensor([1, 2], dtype=torch.uint8), 4).tolist() == [0x21]
    assert pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [0b00111001]
    # 3-bit: codes 0..7 → bit stream 000 001 010 011 100 101 110 111 (LSB first)
    stream = sum(i << (3 * i) for i in range(8))
    expected = [(stream >> (8 * k)) & 0xFF for k in range(3)]
    assert pack_codes(torch.arange(8, dtype=torch.uint8), 3).tolist() == expected


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", [0, 1])
def test_pack_int32_round_trip(bits: int, axis: int) -> None:
    per = 32 // bits
    shape = (per * 3, per * 2)
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    packed = pack_int32(codes, bits, axis)
    assert packed.dtype == torch.int32
    assert packed.shape[axis] == shape[axis] // per and packed.shape[1 - axis] == shape[1 - axis]
    assert torch.equal(unpack_int32(packed, bits, axis), codes)
    order = [0, 2, 4, 6, 1, 3, 5, 7] if bits == 4 else None
    assert torch.equal(unpack_int32(pack_int32(codes, bits, axis, order), bits, axis, order), codes)


def test_pack_int32_little_end_first_and_sign_wrap() -> None:
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.uint8)
    word = pack_int32(codes, 4, axis=1)
    expected = 0xF7654321 - 2**32
    assert word.tolist() == [[expected]]
    awq = pack_int32(codes, 4, axis=1, order=[0, 2, 4, 6, 1, 3, 5, 7])
    assert awq.tolist() == [[0xF6427531 - 2**32]]
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int32(codes[:, :7], 4, axis=1)
    with pytest.raises(ValueError, match="3"):
        pack_int32(codes, 3)


def _layer_ctx(cancel: CancelToken | None = None, dtype: torch.dtype = torch.float32) -> LayerContext:
    torch.manual_seed(0)
    module = nn.Module()
    module.q_proj = nn.Linear(64, 64, bias=False)
    module.down_proj = nn.Linear(128, 64, bias=False)
    linears = {"self_attn.q_proj": module.q_proj, "mlp.down_proj": module.down_proj}
    return LayerContext(index=0, num_layers=1, prefix="model.layers.0", module=module, linears=linears,
                        cancel=cancel, extra={"source_dtype": dtype})


def test_rtn_quantizer_quantizes_every_linear_with_source_dtype() -> None:
    ctx = _layer_ctx(dtype=torch.bfloat16)
    quantizer = get_quantizer(RTNConfig(bits=4, group_size=32, sym=True))
    assert quantizer.needs_calibration is False
    out = quantizer.quantize_layer(ctx)
    assert set(out) == set(ctx.linears)
    for name, q in out.items():
        w = ctx.linears[name].weight.detach()
        assert q.dtype == torch.bfloat16 and q.bits == 4 and q.group_size == 32
        rel = (q.dequantize() - w).norm() / w.norm()
        assert 0 < rel < 0.12


def test_rtn_quantizer_honours_cancel_and_quantizes_ragged_groups() -> None:
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        get_quantizer(RTNConfig()).quantize_layer(_layer_ctx(token))
    out = get_quantizer(RTNConfig(group_size=48)).quantize_layer(_layer_ctx())
    assert tuple(out["self_attn.q_proj"].scale.shape) == (64, 2) and tuple(out["mlp.down_proj"].scale.shape) == (64, 3)
