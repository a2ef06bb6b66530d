"""GPTQ layout: packing conventions, bit-exact read-back, and load-back through an independent
reference dequantizer (transformers' GPTQ path needs gptqmodel, which has no CPU wheel)."""
from __future__ import annotations

import json

import pytest
import torch

from core.config import FourBitConfig, GPTQConfig, RTNConfig
from core.export import exporters_accepting, get_exporter
from core.export.convert import read_weights, refuse_unless_accepted, rtn_quantizer, write_quantized
from core.export.reference import gptq_dequantize, reference_model
from core.export.verify import quantscope_model, verify_export
from core.primitives import quantize_to_intweight
from core.qtensors import IntWeight


def _act_order_weight(w: torch.Tensor, bits: int, group: int, seed: int = 0) -> IntWeight:
    """RTN on a column permutation, stored GPTQ-style: codes in original column order, g_idx
    mapping each column to the group it was quantized in."""
    perm = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(seed))
    q = quantize_to_intweight(w[:, perm].float(), bits, True, "group", group, dtype=torch.float16)
    codes = torch.empty_like(q.codes)
    codes[:, perm] = q.codes
    g_idx = torch.empty(w.shape[1], dtype=torch.int32)
    g_idx[perm] = (torch.arange(w.shape[1]) // group).to(torch.int32)
    return IntWeight(codes=codes, scale=q.scale, zero=q.zero, bits=bits, group_size=group, sym=True, g_idx=g_idx)


@pytest.mark.parametrize("bits,sym,gran", [(4, True, "group"), (4, False, "group"), (3, True, "group"),
                                           (8, False, "channel"), (2, False, "group")])
def test_tensors_read_back_bit_exactly_and_match_reference_dequantizer(bits, sym, gran):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(bits))
    q = quantize_to_intweight(w, bits, sym, gran, 32, dtype=torch.float16)
    q.scale = q.scale.half().float()  # the layout stores float16 scales
    ex = get_exporter("gptq")
    cfg = ex.quantization_config(RTNConfig(bits=bits, group_size=32, sym=sym, granularity=gran), ["m"], [])
    t = ex.tensors("m", q)
    assert t["m.qweight"].dtype == torch.int32 and tuple(t["m.qweight"].shape) == (128 * bits // 32, 64)
    assert tuple(t["m.scales"].shape) == (q.scale.shape[1], 64) and t["m.scales"].dtype == torch.float16
    back = ex.read_weight("m", t.get, cfg)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.zero, q.zero.expand(64, -1))
    assert torch.equal(back.scale, q.scale.expand(64, -1)) and back.g_idx is None
    ref = gptq_dequantize(t["m.qweight"].numpy(), t["m.qzeros"].numpy(), t["m.scales"].numpy(),
                          t["m.g_idx"].numpy(), bits, cfg["checkpoint_format"])
    assert torch.equal(torch.from_numpy(ref), q.dequantize())


def test_symmetric_uses_v1_zero_minus_one_and_asymmetric_gptq_v2():
    ex = get_exporter("gptq")
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    sym = ex.tensors("m", quantize_to_intweight(w, 4, True, "group", 32))
    # zero 8 stored as 7 in every nibble
    assert sym["m.qzeros"].view(torch.uint32).unique().tolist() == [0x77777777]
    assert ex.quantization_config(RTNConfig(bits=4, group_size=32), [], [])["checkpoint_format"] == "gptq"
    asym_cfg = ex.quantization_config(RTNConfig(bits=4, group_size=32, sym=False), [], [])
    assert asym_cfg["checkpoint_format"] == "gptq_v2" and asym_cfg["sym"] is False
    # an all-positive group gives zero 0, which only v2 can hold
    q = quantize_to_intweight(w.abs(), 4, False, "group", 32)
    assert int(q.zero.min()) == 0
    back = ex.read_weight("m", ex.tensors("m", q).get, asym_cfg)
    assert torch.equal(back.zero, q.zero)


def test_act_order_g_idx_is_stored_and_restored():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(2))
    q = _act_order_weight(w, 4, 32)
    q.scale = q.scale.half().float()  # the layout stores float16 scales
    ex = get_exporter("gptq")
    cfg = ex.quantization_config(GPTQConfig(bits=4, group_size=32, act_order=True, static_groups=False), [], [])
    assert cfg["desc_act"] is True
    t = ex.tensors("m", q)
    assert torch.equal(t["m.g_idx"], q.g_idx)
    back = ex.read_weight("m", t.get, cfg)
    assert torch.equal(back.g_idx, q.g_idx)
    assert torch.equal(back.dequantize(), q.dequantize())
    ref = gptq_dequantize(t["m.qweight"].numpy(), t["m.qzeros"].numpy(), t["m.scales"].numpy(),
                          t["m.g_idx"].numpy(), 4, cfg["checkpoint_format"])
    assert torch.equal(torch.from_numpy(ref), back.dequantize())
    # the permuted grouping is more accurate than nothing, but not the natural one
    assert not torch.equal(back.g_idx.long(), torch.arange(128) // 32)


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_folder_verifies_against_independent_reference(tiny_llama_dir, tmp_path, sym):
    cfg = RTNConfig(bits=4, group_size=32, sym=sym)
    out = write_quantized(tiny_llama_dir, tmp_path / "gptq", "gptq", rtn_quantizer(cfg), method_config=cfg)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32
    side = json.loads((out / "quantize_config.json").read_text())
    assert side["bits"] == 4 and side["sym"] is sym and side["checkpoint_format"] == qc["checkpoint_format"]
    report = verify_export(out, tokens=48)
    assert report.ok and report.rel_logit_diff <= 1e-5 and "reference" in report.loader
    assert report.ppl_loader == pytest.approx(report.ppl_quantscope, rel=1e-5)
    with torch.no_grad():
        ids = torch.arange(40)[None]
        diff = (reference_model(out)(ids).logits - quantscope_model(out)(ids).logits).abs().max()
    assert float(diff) < 1e-5
    assert len(read_weights(out)) == 14


def test_nf4_to_gptq_fails_before_work_listing_formats_that_can():
    with pytest.raises(ValueError) as err:
        refuse_unless_accepted(get_exporter("gptq"), FourBitConfig())
    msg = str(err.value)
    assert msg.startswith("cannot export nf4 to gptq")
    can = exporters_accepting(FourBitConfig())
    assert "gptq" not in can and "compressed-tensors" not in can and "awq" not in can
    if can:
        assert f"formats that can: {', '.join(can)}" in msg
    else:
        assert "no export format can store it" in msg
