"""compressed-tensors export: the folder loads with transformers + compressed-tensors on CPU and
computes exactly what Quantscope's dequantized model computes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.config import FP8Config, GPTQConfig, Granularity, RTNConfig, SmoothQuantConfig
from core.export import exporters_accepting, get_exporter
from core.export.compressed_tensors import pack_dense_int32, unpack_dense_int32
from core.export.convert import read_weights, rtn_quantizer, write_quantized
from core.export.verify import quantscope_model
from core.primitives import quantize_to_intweight
from core.qtensors import ActQuant, Fp8Weight


def _ids(n: int = 32) -> torch.Tensor:
    return torch.randint(0, 300, (1, n), generator=torch.Generator().manual_seed(0))


def _load_with_transformers(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _max_rel_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    with torch.no_grad():
        la, lb = a(_ids()).logits, b(_ids()).logits
    return float((la - lb).abs().max() / lb.abs().max())


@pytest.mark.parametrize("bits,gran,group", [(4, "group", 32), (8, "channel", 128), (3, "group", 64), (4, "tensor", 128)])
def test_symmetric_int_export_loads_in_transformers_and_matches_dequantized(tiny_llama_dir, tmp_path, bits, gran, group):
    cfg = RTNConfig(bits=bits, group_size=group, granularity=gran)
    out = write_quantized(tiny_llama_dir, tmp_path / "ct", "compressed-tensors", rtn_quantizer(cfg), method_config=cfg)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["quant_method"] == "compressed-tensors"
    assert qc["config_groups"]["group_0"]["weights"]["num_bits"] == bits
    loaded = _load_with_transformers(out)
    ours = quantscope_model(out)
    assert _max_rel_diff(loaded, ours) <= 1e-5
    # and the export is really quantized: it differs from the float model
    assert _max_rel_diff(_load_with_transformers(tiny_llama_dir), ours) > 1e-3


def test_read_weight_restores_codes_scales_and_zeros_bit_exactly(tiny_llama_dir, tmp_path):
    cfg = RTNConfig(bits=4, group_size=32)
    written = {}

    def quantize(name, w):
        q = rtn_quantizer(cfg)(name, w)
        if q is not None:
            written[name] = q
        return q

    out = write_quantized(tiny_llama_dir, tmp_path / "ct", "compressed-tensors", quantize, method_config=cfg)
    back = read_weights(out)
    assert set(back) == set(written) and len(back) == 14
    for name, q in written.items():
        r = back[name]
        assert torch.equal(r.codes, q.codes)
        assert torch.equal(r.zero, q.zero)
        assert torch.equal(r.scale, q.scale.to(r.dtype).float())
        assert r.group_size == 32 and r.bits == 4 and r.sym


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_dense_packing_matches_compressed_tensors_own_packer(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = torch.randint(0, 2**bits, (6, 70), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    signed = (codes - 2 ** (bits - 1)).to(torch.int8)
    for dim in (1, 0):
        ours = pack_dense_int32(codes.to(torch.uint8), bits, dim=dim)
        theirs = pack_to_int32(signed, bits, packed_dim=dim)
        assert torch.equal(ours, theirs)
        n = codes.shape[dim]
        assert torch.equal(unpack_dense_int32(ours, bits, n, dim=dim), codes.to(torch.uint8))


def test_asymmetric_int_is_refused_with_the_formats_that_can_store_it():
    ex = get_exporter("compressed-tensors")
    cfg = RTNConfig(bits=4, group_size=32, sym=False)
    reason = ex.accepts(cfg)
    assert reason is not None and "gptq" in reason
    assert "compressed-tensors" not in exporters_accepting(cfg)
    assert ex.accepts(RTNConfig(bits=4, group_size=32, sym=True)) is None
    assert ex.accepts(GPTQConfig(act_order=True, static_groups=False)) is not None
    assert ex.accepts(FP8Config(fmt="e5m2")) is not None


def test_asymmetric_refusal_happens_before_any_output_is_written(tiny_llama_dir, tmp_path):
    cfg = RTNConfig(bits=4, group_size=32, sym=False)
    with pytest.raises(ValueError, match="gptq"):
        write_quantized(tiny_llama_dir, tmp_path / "ct", "compressed-tensors", rtn_quantizer(cfg), method_config=cfg)
    assert not (tmp_path / "ct").exists()


def _fp8(granularity: Granularity):
    def quantize(name, w):
        if ".layers." not in name:
            return None
        w = w.float()
        amax = w.abs().amax(dim=1, keepdim=True) if granularity is Granularity.CHANNEL else w.abs().max().reshape(1)
        scale = amax / torch.finfo(torch.float8_e4m3fn).max
        return Fp8Weight(weight=(w / scale).to(torch.float8_e4m3fn), scale=scale, dtype=torch.float32)

    return quantize


@pytest.mark.parametrize("granularity", [Granularity.CHANNEL, Granularity.TENSOR])
def test_fp8_export_loads_and_matches(tiny_llama_dir, tmp_path, granularity):
    cfg = FP8Config(granularity=granularity)
    out = write_quantized(tiny_llama_dir, tmp_path / "fp8", "compressed-tensors", _fp8(granularity), method_config=cfg)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "float-quantized"
    assert _max_rel_diff(_load_with_transformers(out), quantscope_model(out)) <= 1e-5


def _w8a8(act: ActQuant):
    def quantize(name, w):
        if ".layers." not in name:
            return None
        q = quantize_to_intweight(w.float(), 8, True, "channel", dtype=torch.float32)
        q.act = act
        return q

    return quantize


def test_w8a8_static_activation_scale_loads_and_matches_exactly(tiny_llama_dir, tmp_path):
    cfg = SmoothQuantConfig(act_scheme="static")
    out = write_quantized(tiny_llama_dir, tmp_path / "w8a8", "compressed-tensors",
                          _w8a8(ActQuant(8, "static", torch.tensor(0.02))), method_config=cfg)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized"
    assert qc["config_groups"]["group_0"]["input_activations"]["strategy"] == "tensor"
    back = read_weights(out)["model.layers.0.mlp.up_proj"]
    assert back.act is not None and back.act.scheme == "static" and float(back.act.scale) == pytest.approx(0.02)
    loaded = _load_with_transformers(out)
    ours = quantscope_model(out)
    assert _max_rel_diff(loaded, ours) <= 1e-5
    # the consumer really quantizes activations: without them the outputs differ
    weight_only = quantscope_model(out)
    for m in weight_only.modules():
        if hasattr(m, "qweight"):
            m.qweight.act = None
    assert _max_rel_diff(loaded, weight_only) > 1e-3


def test_w8a8_dynamic_per_token_loads_and_stays_within_emulation_tolerance(tiny_llama_dir, tmp_path):
    cfg = SmoothQuantConfig(act_scheme="dynamic")
    out = write_quantized(tiny_llama_dir, tmp_path / "w8a8", "compressed-tensors",
                          _w8a8(ActQuant(8, "dynamic")), method_config=cfg)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    inputs = qc["config_groups"]["group_0"]["input_activations"]
    assert inputs["strategy"] == "token" and inputs["dynamic"] is True
    # transformers' emulation divides the token absmax by 127.5, Quantscope by 127: close, not equal
    assert _max_rel_diff(_load_with_transformers(out), quantscope_model(out)) <= 5e-2


def test_quantization_config_round_trips_through_compressed_tensors_models():
    from compressed_tensors.quantization import QuantizationConfig

    ex = get_exporter("compressed-tensors")
    for cfg in (RTNConfig(bits=4, group_size=128), FP8Config(), SmoothQuantConfig(act_scheme="static")):
        qc = ex.quantization_config(cfg, ["model.layers.0.mlp.up_proj"], ["lm_head"])
        again = QuantizationConfig.model_validate(qc).model_dump(mode="json")
        assert again == qc
        assert qc["ignore"] == ["lm_head"] and qc["quantization_status"] == "compressed"


@pytest.mark.parametrize("method", [
    RTNConfig(bits=4, group_size=128), RTNConfig(bits=8, granularity="channel"), RTNConfig(bits=4, sym=True,
                                                                                          granularity="tensor"),
    RTNConfig(bits=2, group_size=64), FP8Config(), FP8Config(granularity="channel"),
    SmoothQuantConfig(act_scheme="dynamic"), SmoothQuantConfig(act_scheme="static"),
])
def test_hand_built_quantization_config_is_what_the_library_writes(method) -> None:
    """The config is spelled out without importing compressed-tensors; the library must read it
    as the config its own classes build for the same settings."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    ours = get_exporter("compressed-tensors").quantization_config(method, ["model.layers.0.mlp.up_proj"],
                                                                   ["lm_head", "model.layers.0.mlp.down_proj"])
    parsed = QuantizationConfig.model_validate(ours)
    group = ours["config_groups"]["group_0"]
    expected = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(
            targets=["Linear"], weights=QuantizationArgs(**group["weights"]),
            input_activations=QuantizationArgs(**group["input_activations"]) if group["input_activations"] else None,
            format=ours["format"])},
        format=ours["format"], quantization_status="compressed",
        ignore=["lm_head", "model.layers.0.mlp.down_proj"],
    )
    assert parsed.model_dump(mode="json") == expected.model_dump(mode="json")
