"""AWQ GEMM layout: the interleaved nibble order, bit-exact read-back, and load-back through an
independent reference dequantizer."""
from __future__ import annotations

import json

import pytest
import torch

from core.config import GPTQConfig, Granularity, RTNConfig, SmoothQuantConfig
from core.export import exporters_accepting, get_exporter
from core.export.convert import read_weights, rtn_quantizer, write_quantized
from core.export.reference import awq_dequantize
from core.export.verify import verify_export
from core.primitives import quantize_to_intweight
from core.qtensors import IntWeight


def test_qweight_nibbles_follow_awq_interleaved_order():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8).repeat(8, 1).T.contiguous()  # [out 8, in 8]
    q = IntWeight(codes=codes, scale=torch.ones(8, 1), zero=torch.full((8, 1), 8, dtype=torch.int32), bits=4,
                  group_size=8, sym=True)
    t = get_exporter("awq").tensors("m", q)
    assert tuple(t["m.qweight"].shape) == (8, 1)
    # slot j holds output column [0, 2, 4, 6, 1, 3, 5, 7][j]: nibbles (high→low) 8 6 4 2 7 5 3 1
    assert t["m.qweight"].view(torch.uint32)[0, 0].item() == 0x86427531
    assert t["m.qzeros"].view(torch.uint32)[0, 0].item() == 0x88888888


@pytest.mark.parametrize("sym", [True, False])
def test_tensors_read_back_bit_exactly_and_match_reference(sym):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(3))
    q = quantize_to_intweight(w, 4, sym, "group", 64, dtype=torch.float16)
    q.scale = q.scale.half().float()
    ex = get_exporter("awq")
    cfg = ex.quantization_config(RTNConfig(bits=4, group_size=64, sym=sym), ["m"], ["lm_head"])
    t = ex.tensors("m", q)
    assert tuple(t["m.qweight"].shape) == (256, 6) and tuple(t["m.qzeros"].shape) == (4, 6)
    assert tuple(t["m.scales"].shape) == (4, 48)
    back = ex.read_weight("m", t.get, cfg)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.zero, q.zero) and torch.equal(back.scale, q.scale)
    assert back.group_size == 64 and back.sym is sym
    ref = awq_dequantize(t["m.qweight"].numpy(), t["m.qzeros"].numpy(), t["m.scales"].numpy())
    assert torch.equal(torch.from_numpy(ref), q.dequantize())


def test_accepts_only_4bit_grouped_integer_weights():
    ex = get_exporter("awq")
    assert ex.accepts(RTNConfig(bits=4, group_size=128, sym=False)) is None
    assert "4-bit" in ex.accepts(RTNConfig(bits=8, group_size=128))
    assert "group" in ex.accepts(RTNConfig(bits=4, granularity=Granularity.CHANNEL))
    assert ex.accepts(SmoothQuantConfig()) is not None
    assert ex.accepts(GPTQConfig(act_order=True, static_groups=False)) is not None
    assert "awq" in exporters_accepting(RTNConfig(bits=4, group_size=64, sym=False))
    assert "awq" not in exporters_accepting(RTNConfig(bits=3, group_size=64))


def test_awq_folder_config_and_verification(tiny_llama_dir, tmp_path):
    cfg = RTNConfig(bits=4, group_size=64, sym=False)
    out = write_quantized(tiny_llama_dir, tmp_path / "awq", "awq", rtn_quantizer(cfg), method_config=cfg)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "awq" and qc["version"] == "gemm" and qc["zero_point"] is True
    assert qc["bits"] == qc["w_bit"] == 4 and qc["group_size"] == qc["q_group_size"] == 64
    assert qc["modules_to_not_convert"] == ["lm_head"]
    side = json.loads((out / "quant_config.json").read_text())
    assert side == {"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM"}
    report = verify_export(out, tokens=48)
    assert report.ok and report.rel_logit_diff <= 1e-5 and "reference" in report.loader
    assert len(read_weights(out)) == 14
