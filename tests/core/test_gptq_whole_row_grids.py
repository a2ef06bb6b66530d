"""Whole-row grids: GPTQ with a group size at least a layer's width, and per-channel (asymmetric)
zero points packed into the GPTQ layout. Both used to crash (a None scale in the GPTQ sweep; an
odd stride refused by the 4-bit packer)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from core.config import CalibConfig, GPTQConfig, Granularity, QuantJob, RTNConfig
from core.engine import run_quantization
from core.export import get_exporter
from core.export.reference import gptq_dequantize
from core.export.verify import verify_export
from core.methods.gptq import GPTQ, gptq_quantize
from core.primitives import pack_codes, quantize_to_intweight, unpack_codes


def _correlated(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, dim // 4, generator=g)
    x = z @ torch.randn(dim // 4, dim, generator=g) + 0.1 * torch.randn(n, dim, generator=g)
    x[:, :: dim // 8] *= 5.0
    return x


def _hessian(x: torch.Tensor) -> torch.Tensor:
    g = GPTQ(x.shape[1])
    g.add_batch(x)
    return g.H


@pytest.mark.parametrize("group_size", [64, 128, 1024])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_group_size_at_least_in_features_is_the_per_channel_solution(group_size: int, act_order: bool, sym: bool):
    torch.manual_seed(11)
    w = torch.randn(48, 64)
    x = _correlated(1024, 64)
    H = _hessian(x)
    res = gptq_quantize(w, H, GPTQConfig(bits=4, group_size=group_size, sym=sym, act_order=act_order))
    channel = gptq_quantize(w, H, GPTQConfig(bits=4, sym=sym, granularity=Granularity.CHANNEL,
                                             act_order=act_order))
    q = res.weight
    assert q.scale.shape == (48, 1) and q.zero.shape == (48, 1) and q.group_size == 64 and q.g_idx is None
    assert torch.equal(q.codes, channel.weight.codes) and torch.equal(q.scale, channel.weight.scale)
    assert torch.equal(q.zero, channel.weight.zero)
    # still GPTQ, not plain rounding: the output error is well below RTN on the same grid
    rtn = quantize_to_intweight(w, 4, sym, Granularity.CHANNEL, 64)
    gptq_err = float((x @ (w - q.dequantize()).t()).square().sum())
    rtn_err = float((x @ (w - rtn.dequantize()).t()).square().sum())
    assert gptq_err < 0.8 * rtn_err, (gptq_err, rtn_err)


def test_packing_a_transposed_column_of_codes():
    # [n, 1] zero points transposed to [1, n] keep stride (1, 1): contiguous, but not viewable as
    # int16 without re-viewing the storage
    col = torch.arange(40, dtype=torch.uint8).remainder(16).reshape(40, 1)
    row = col.T
    assert row.is_contiguous() and row.stride() == (1, 1)
    packed = pack_codes(row, 4)
    assert packed.shape == (1, 20)
    assert packed[0, :2].tolist() == [0x10, 0x32]
    assert torch.equal(unpack_codes(packed, 4, 40), row)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_per_channel_asymmetric_zero_points_pack_into_the_gptq_layout(bits: int):
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(bits)) + 0.3
    q = quantize_to_intweight(w, bits, False, Granularity.CHANNEL, 96, dtype=torch.float16)
    q.scale = q.scale.half().float()  # the layout stores float16 scales
    assert q.zero.shape == (64, 1) and q.zero.stride() == (1, 1)
    ex = get_exporter("gptq")
    cfg = ex.quantization_config(RTNConfig(bits=bits, sym=False, granularity=Granularity.CHANNEL), ["m"], [])
    assert cfg["group_size"] == -1 and cfg["checkpoint_format"] == "gptq_v2"
    t = ex.tensors("m", q)
    assert tuple(t["m.qzeros"].shape) == (1, 64 * bits // 32) and tuple(t["m.scales"].shape) == (1, 64)
    back = ex.read_weight("m", t.get, cfg)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.zero, q.zero)
    ref = gptq_dequantize(t["m.qweight"].numpy(), t["m.qzeros"].numpy(), t["m.scales"].numpy(),
                          t["m.g_idx"].numpy(), bits, cfg["checkpoint_format"])
    assert torch.equal(torch.from_numpy(ref), q.dequantize())


def _quantize(model_dir, out, method, export: str | None = "gptq"):
    job = QuantJob(model=model_dir, out=out, method=method, export=export, calib=CalibConfig(samples=4, seq_len=32))
    return run_quantization(job, sink=lambda e: None)


def test_gptq_with_group_size_of_the_hidden_width_exports_and_loads(tiny_llama_dir, tmp_path):
    # hidden 128: q/k/v/o/gate/up have 128 input columns (one whole-row group), down_proj 256 (two)
    res = _quantize(tiny_llama_dir, tmp_path / "g128", GPTQConfig(bits=4, group_size=128))
    assert len(res.layers) == 14 and all(math.isfinite(r["mse"]) for r in res.layers)
    qc = json.loads((tmp_path / "g128" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["group_size"] == 128
    report = verify_export(tmp_path / "g128", tokens=48)
    assert report.ok and report.rel_logit_diff <= 1e-5 and "reference" in report.loader


def test_rtn_asymmetric_per_channel_exports_to_gptq_and_loads(tiny_llama_dir, tmp_path):
    res = _quantize(tiny_llama_dir, tmp_path / "asym", RTNConfig(bits=4, sym=False, granularity=Granularity.CHANNEL),
                    export=None)
    assert len(res.layers) == 14
    qc = json.loads((tmp_path / "asym" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq_v2" and qc["group_size"] == -1
    report = verify_export(tmp_path / "asym", tokens=48)
    assert report.ok and report.rel_logit_diff <= 1e-5
