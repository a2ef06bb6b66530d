from __future__ import annotations

import pytest

from core import catalog
from core.formats import (
    FORMATS,
    GGUF_TYPES,
    format_from_quantization_config,
    get_format,
    gguf_tensor_type,
    support,
)
from core.planner import plan

REQUIRED = ("fp32", "bf16", "fp16", "fp8", "int8", "int4_g128", "int3_g128", "nf4", "nf4_dq", "q8_0", "q6_k",
            "q5_k_m", "q4_k_m", "q3_k_m", "q2_k", "mxfp4", "nvfp4", "fp6")


def test_registry_has_every_required_format() -> None:
    assert set(REQUIRED) <= set(FORMATS)


@pytest.mark.parametrize("name,bpw", [
    ("int4_g128", 4 + 16 / 128), ("int4_g128_asym", 4 + 20 / 128), ("int3_g128", 3 + 16 / 128),
    ("nf4", 4.5), ("nf4_dq", 4 + 8 / 64 + 32 / (64 * 256)), ("mxfp4", 4.25), ("nvfp4", 4.5), ("fp6", 6.25),
    ("q8_0", 8.5), ("q6_k", 6.5625), ("bf16", 16.0), ("fp32", 32.0),
])
def test_bits_per_weight_include_scales_and_zeros(name: str, bpw: float) -> None:
    assert get_format(name).bpw == pytest.approx(bpw, abs=1e-12)


def test_nf4_double_quant_is_about_4_127_bits() -> None:
    assert round(get_format("nf4_dq").bpw, 3) == 4.127


def test_per_channel_scale_cost_depends_on_row_length() -> None:
    fp8 = get_format("fp8")
    assert fp8.bits_per_weight(4096) == pytest.approx(8 + 32 / 4096)
    assert fp8.bits_per_weight(256) == pytest.approx(8 + 32 / 256)


def test_gguf_block_sizes_match_the_gguf_package() -> None:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    for name, (block, nbytes) in GGUF_TYPES.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType[name]] == (block, nbytes)


def test_unknown_format_suggests_close_name() -> None:
    with pytest.raises(ValueError, match="int4_g128"):
        get_format("int4_g12")
    assert get_format("Q4_K_M").name == "q4_k_m"
    assert get_format("NF4+DQ").name == "nf4_dq"


def test_q4_k_m_mixture_bumps_attn_v_and_ffn_down_in_chosen_layers() -> None:
    f = get_format("q4_k_m")
    n = 32
    bumped = [i for i in range(n) if gguf_tensor_type(f, "ffn_down", i, n, 14336) == "Q6_K"]
    assert bumped[:4] == [0, 1, 2, 3] and bumped[-4:] == [28, 29, 30, 31] and 6 in bumped and 5 not in bumped
    assert gguf_tensor_type(f, "attn_q", 5, n, 4096) == "Q4_K"
    assert gguf_tensor_type(f, "output", -1, n, 4096) == "Q6_K"
    # Rows not divisible by 256 fall back as llama.cpp does (Q4_K -> Q5_0; output -> Q8_0).
    assert gguf_tensor_type(f, "attn_q", 5, n, 576) == "Q5_0"
    assert gguf_tensor_type(f, "output", -1, n, 576) == "Q8_0"


@pytest.mark.parametrize("fmt,gib", [("q8_0", 7.95), ("q6_k", 6.14), ("q5_k_m", 5.33), ("q4_k_m", 4.58),
                                     ("q3_k_m", 3.74)])
def test_gguf_sizes_for_llama_3_1_8b_match_published_files(fmt: str, gib: float) -> None:
    # Published Meta-Llama-3.1-8B-Instruct GGUF file sizes (llama.cpp quantizer), in GiB.
    row = plan("llama-3.1-8b", "rtx-4090", formats=[fmt], cpu_ram_gib=64).formats[0]
    assert row.weights_gib == pytest.approx(gib, rel=0.01)


def test_native_support_and_fallbacks_per_generation() -> None:
    def sup(fmt: str, gpu: str):
        g = catalog.get_gpu(gpu)
        return support(get_format(fmt), g.native_formats, g.compute_capability)

    assert sup("fp8", "rtx-4090").native and sup("fp8", "h100-sxm").native
    ampere = sup("fp8", "rtx-3090")
    assert not ampere.native and ampere.runs and "Marlin" in ampere.how and ampere.weight_bits is None
    turing = sup("fp8", "t4")  # vLLM's FP8 Marlin (W8A16) runs from sm75: weights stay 1 byte
    assert not turing.native and turing.runs and turing.weight_bits is None
    assert sup("fp8", "v100-32gb").weight_bits == 16
    assert not sup("bf16", "v100-32gb").native and "FP16" in sup("bf16", "t4").how
    assert sup("bf16", "a100-80gb").native
    assert sup("nvfp4", "b200").native and sup("mxfp4", "rtx-5090").native and not sup("nvfp4", "h100-sxm").native
    assert sup("int4_g128", "t4").native and not sup("int4_g128", "p40").native and sup("int4_g128", "p40").runs


def test_quantization_configs_map_to_registry_names() -> None:
    ct = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {"weights": {
        "num_bits": 4, "type": "int", "symmetric": True, "group_size": 128, "strategy": "group"}}}}
    assert format_from_quantization_config(ct) == "int4_g128"
    assert format_from_quantization_config({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": False}) \
        == "int4_g128_asym"
    assert format_from_quantization_config({"quant_method": "bitsandbytes", "load_in_4bit": True,
                                            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}) == "nf4_dq"
    assert format_from_quantization_config(None) is None
