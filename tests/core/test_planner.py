from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from core import catalog, planner
from core.model_io import open_model

GIB = 2**30


def test_kv_cache_by_hand_for_gqa() -> None:
    # Llama-3.1-8B: 32 layers, 8 KV heads (not 32 attention heads) × 128 head_dim.
    p = planner.plan("llama-3.1-8b", "h100-sxm", formats=["bf16"], context=8192, batch=2, cpu_ram_gib=64)
    assert p.formats[0].kv_cache_gib == 2 * 32 * 8 * 128 * 8192 * 2 * 2 / GIB == 2.0
    fp8 = planner.plan("llama-3.1-8b", "h100-sxm", formats=["bf16"], context=8192, batch=2, kv_dtype="fp8",
                       cpu_ram_gib=64)
    assert fp8.formats[0].kv_cache_gib == 1.0
    q8 = planner.plan("llama-3.1-8b", "h100-sxm", formats=["q4_k_m"], context=8192, batch=2, kv_dtype="int8",
                      engine="llama.cpp", cpu_ram_gib=64)
    assert q8.formats[0].kv_cache_gib == pytest.approx(34 / 32, abs=1e-3)


def test_sliding_window_layers_cap_the_kv_cache() -> None:
    mistral = planner.plan("mistral-7b-v0.1", "a100-80gb", formats=["bf16"], context=16384, cpu_ram_gib=64)
    assert mistral.formats[0].kv_cache_gib == 2 * 32 * 8 * 128 * 4096 * 2 / GIB
    gemma = planner.plan("gemma-3-27b", "a100-80gb", formats=["bf16"], context=32768, cpu_ram_gib=64)
    full, sliding = 62 // 6, 62 - 62 // 6
    expected = 2 * 16 * 128 * (full * 32768 + sliding * 1024) * 2
    assert gemma.formats[0].kv_cache_gib == pytest.approx(expected / GIB, abs=1e-3)


def test_mla_caches_the_compressed_latent_replicated_on_every_vllm_rank() -> None:
    p = planner.plan("deepseek-r1", "h200", formats=["fp8"], context=4096, num_gpus=8, engine="vllm", cpu_ram_gib=64)
    latent = 61 * (512 + 64) * 4096 * 2 / GIB
    row = p.formats[0]
    assert [c["kv_cache_gib"] for c in row.cards] == [pytest.approx(latent, abs=1e-3)] * 8
    assert row.kv_cache_gib == pytest.approx(8 * latent, abs=1e-3)
    assert "MLA" in row.formulas["kv_cache"] and any("replicated" in n for n in row.notes)


def test_weights_use_format_bits_for_linears_and_16_bit_elsewhere() -> None:
    spec = planner.load_model("llama-2-7b")
    linear = sum(t.numel for t in spec.tensors if t.role == "linear")
    rest = spec.total_params - linear
    row = planner.plan(spec, "rtx-4090", formats=["int4_g128"], cpu_ram_gib=64).formats[0]
    assert row.weights_bytes == round(linear * 4.125 / 8 + rest * 2)
    assert row.bits_per_weight == 4.125


def test_offload_split_and_decode_speed_by_hand() -> None:
    H, I, kv, V, L = 4096, 14336, 1024, 128256, 32
    layer_w = 2 * (2 * H * H + 2 * H * kv + 3 * H * I) + 2 * 2 * H
    kv_layer = 2 * 8 * 128 * 1024 * 2
    head = V * H * 2 + H * 2  # lm_head + final norm; llama.cpp keeps token_embd in CPU RAM
    act = 512 * (2 * H + 3 * I) * 2 + V * 4
    fixed = 0.3 * GIB + act + head
    n = math.floor((8 * GIB - fixed) / (layer_w + kv_layer))
    gpu = catalog.custom_gpu(8, 1000)
    row = planner.plan("llama-3.1-8b", gpu, formats=["bf16"], context=1024, engine="llama.cpp", cpu_ram_gib=64,
                       cpu_bandwidth_gb_s=50).formats[0]
    assert (row.gpu_layers, row.cpu_layers) == (n, L - n) and 0 < n < L
    assert not row.fits and row.fits_with_offload and row.missing_gib == 0
    from core.planner_decode import GPU_BW_EFFICIENCY, KERNEL_OVERHEAD_S_PER_LAYER, STEP_OVERHEAD_S

    expected_tps = 1 / ((head + n * (layer_w + kv_layer)) / (1000e9 * GPU_BW_EFFICIENCY)
                        + (L - n) * (layer_w + kv_layer) / 50e9
                        + L * KERNEL_OVERHEAD_S_PER_LAYER["llama.cpp"] + STEP_OVERHEAD_S["llama.cpp"])
    assert row.decode_tokens_per_s == pytest.approx(expected_tps, abs=0.01)
    assert row.cpu_ram_needed_gib == pytest.approx(((L - n) * (layer_w + kv_layer) + V * H * 2) / GIB, abs=1e-3)


def test_offload_reports_missing_ram() -> None:
    row = planner.plan("llama-3.1-70b", "rtx-4090", formats=["bf16"], cpu_ram_gib=32).formats[0]
    assert not row.fits and not row.fits_with_offload and row.missing_gib > 50


def test_user_chosen_split_changes_gpu_and_cpu_memory() -> None:
    kw: dict[str, Any] = dict(format="int4_g128", context=4096, cpu_ram_gib=64)
    all_gpu = planner.plan_offload("llama-3.1-8b", "rtx-4090", gpu_layers=32, **kw)
    half = planner.plan_offload("llama-3.1-8b", "rtx-4090", gpu_layers=16, **kw)
    assert all_gpu.fits and all_gpu.cpu_ram_needed_gib == 0
    assert half.gpu_layers == 16 and half.cpu_ram_needed_gib > 1.0 and half.gpu_used_gib < all_gpu.gpu_used_gib
    assert half.decode_tokens_per_s < all_gpu.decode_tokens_per_s
    with pytest.raises(ValueError, match="gpu_layers"):
        planner.plan_offload("llama-3.1-8b", "rtx-4090", gpu_layers=33, **kw)


def test_fits_flips_with_context() -> None:
    short = planner.plan("llama-3.1-8b", "rtx-3090", formats=["int4_g128"], context=4096, cpu_ram_gib=64)
    long = planner.plan("llama-3.1-8b", "rtx-3090", formats=["int4_g128"], context=131072, cpu_ram_gib=64)
    assert short.formats[0].fits and not long.formats[0].fits
    assert long.formats[0].kv_cache_gib == 16.0


def test_vllm_uses_its_memory_share_and_tensor_parallel_bandwidth() -> None:
    one = planner.plan("llama-3.1-70b", "h100-sxm", formats=["fp8"], engine="vllm", cpu_ram_gib=64)
    two = planner.plan("llama-3.1-70b", "h100-sxm", formats=["fp8"], engine="vllm", num_gpus=2, cpu_ram_gib=64)
    # planned with what CUDA reports on an H100 80GB (79.1 GiB), not the marketing 80
    assert one.formats[0].capacity_gib == pytest.approx(79.1 * 0.9)
    assert two.formats[0].capacity_gib == pytest.approx(2 * 79.1 * 0.9) and two.formats[0].fits
    assert two.formats[0].tp == 2 and len(two.formats[0].cards) == 2
    assert any("KV blocks" in n for n in two.formats[0].notes)


def test_non_native_formats_are_flagged_with_what_happens() -> None:
    row = planner.plan("llama-3.1-8b", "rtx-3090", formats=["fp8"], cpu_ram_gib=64).formats[0]
    assert not row.native and row.runs and "Marlin" in row.support_note
    # Turing: vLLM runs FP8 checkpoints as weight-only W8A16 (Marlin), the weights stay 1 byte
    t4 = planner.plan("llama-3.1-8b", "t4", formats=["fp8", "bf16"], cpu_ram_gib=64)
    assert "Marlin" in t4.formats[0].support_note and t4.formats[0].weights_gib < 0.6 * t4.formats[1].weights_gib
    v100 = planner.plan("llama-3.1-8b", "v100-32gb", formats=["fp8", "bf16", "int8"], cpu_ram_gib=64)
    assert v100.formats[0].weights_gib == pytest.approx(v100.formats[1].weights_gib)  # FP8 upcast on Volta
    assert not v100.formats[2].native and "INT8" in v100.formats[2].support_note  # no INT8 tensor cores


def test_exact_bytes_of_a_tiny_folder(tiny_llama_dir: Path) -> None:
    spec = planner.load_model(tiny_llama_dir)
    src = open_model(tiny_llama_dir)
    assert spec.exact and spec.exact_bytes == sum(t.nbytes for t in src.tensors.values())
    assert spec.total_params == sum(t.numel for t in src.tensors.values())
    # The folder is float32, so the FP32 row equals its stored bytes exactly.
    row = planner.plan(tiny_llama_dir, "rtx-4090", formats=["fp32"], cpu_ram_gib=8).formats[0]
    assert row.weights_bytes == spec.exact_bytes


@pytest.mark.realmodel
def test_exact_bytes_of_real_smollm2(smollm2_dir: Path) -> None:
    spec = planner.load_model(smollm2_dir)
    src = open_model(smollm2_dir)
    assert spec.exact_bytes == sum(t.nbytes for t in src.tensors.values())
    # The headers and the catalog's config agree on every parameter.
    assert spec.total_params == planner.load_model("smollm2-135m").total_params == 134_515_008


def test_quantized_folder_estimate_within_one_percent(tiny_model_factory: Callable[..., Path],
                                                      tmp_path: Path) -> None:
    from core.config import QuantJob, RTNConfig
    from core.engine import run_quantization

    src = tiny_model_factory(dtype=torch.bfloat16, hidden_size=256, intermediate_size=512)
    out = tmp_path / "int4"
    run_quantization(QuantJob(model=src, out=out, method=RTNConfig(bits=4, group_size=128, sym=True)))
    actual = open_model(out, check_architecture=False).total_bytes
    estimate = planner.plan(src, "rtx-4090", formats=["int4_g128"], cpu_ram_gib=8).formats[0].weights_bytes
    assert abs(estimate - actual) / actual < 0.01
    stored = planner.plan(out, "rtx-4090", cpu_ram_gib=8).formats[0]
    assert stored.format == "int4_g128" and stored.weights_bytes == actual


def test_quantize_memory_counts_hessians_and_calibration() -> None:
    from core.config import CalibConfig

    calib = CalibConfig(samples=64, seq_len=256)
    gptq = planner.quantize_memory("llama-2-7b", "gptq", calib)
    rtn = planner.quantize_memory("llama-2-7b", "rtn", calib)
    # one linear group's Hessian at a time, with its working copy and inverse factor (3×)
    assert gptq["parts_gib"]["hessians"] == pytest.approx(3 * 11008**2 * 4 / GIB, abs=1e-4)
    # the staged layer keeps o_proj's and down_proj's inputs (64 × 256 tokens)
    assert gptq["parts_gib"]["gptq_kept_activations"] == pytest.approx(64 * 256 * (4096 + 11008) * 4 / GIB, abs=1e-4)
    assert gptq["parts_gib"]["calibration_activations"] == pytest.approx(2 * 64 * 256 * 4096 * 4 / GIB, abs=1e-4)
    assert rtn["peak_cpu_gib"] < gptq["peak_cpu_gib"] and rtn["peak_gpu_gib"] == 0
    on_gpu = planner.quantize_memory("llama-2-7b", "gptq", calib, device="cuda")
    assert on_gpu["peak_gpu_gib"] > 1 and on_gpu["peak_cpu_gib"] < gptq["peak_cpu_gib"]
    assert set(planner.quantize_memory_all("smollm2-135m")) == set(planner.QUANT_METHODS)
    with pytest.raises(ValueError, match="unknown method"):
        planner.quantize_memory("llama-2-7b", "magic")


@pytest.mark.parametrize("kwargs,match", [
    ({"context": 0}, "context"), ({"batch": -1}, "batch"), ({"num_gpus": 9}, "num_gpus"),
    ({"engine": "tgi"}, "engine"), ({"kv_dtype": "int4"}, "kv_dtype"),
])
def test_bad_plan_input_is_rejected(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        planner.plan("llama-3.1-8b", "rtx-4090", cpu_ram_gib=8, **kwargs)


def test_unknown_model_and_gpu_suggest_close_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="qwen3-8b"):
        planner.plan("qwen3-8", "rtx-4090", cpu_ram_gib=8)
    with pytest.raises(ValueError, match="h100"):
        planner.plan("qwen3-8b", "h1000", cpu_ram_gib=8)
    cfg = tmp_path / "config.json"
    cfg.write_text('{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2}')
    with pytest.raises(ValueError, match="num_attention_heads, vocab_size"):
        planner.plan(cfg, "rtx-4090", cpu_ram_gib=8)


def test_bare_config_json_plans_like_the_catalog(tmp_path: Path) -> None:
    import json

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(catalog.get_model("qwen3-8b").config))
    a = planner.plan(cfg, "rtx-4090", formats=["q4_k_m"], cpu_ram_gib=8).formats[0]
    b = planner.plan("qwen3-8b", "rtx-4090", formats=["q4_k_m"], cpu_ram_gib=8).formats[0]
    assert a.weights_bytes == b.weights_bytes and a.total_gib == b.total_gib


def test_plan_json_has_the_design_fields() -> None:
    doc = planner.plan("phi-4", "l40s", cpu_ram_gib=64).to_json()
    for row in doc["formats"]:
        for key in ("format", "bits_per_weight", "weights_gib", "kv_cache_gib", "activations_gib", "overhead_gib",
                    "total_gib", "fits", "gpu_layers", "cpu_layers", "decode_tokens_per_s", "formulas", "notes"):
            assert key in row
        assert row["total_gib"] == pytest.approx(row["weights_gib"] + row["kv_cache_gib"] + row["activations_gib"]
                                                 + row["overhead_gib"], abs=0.005)
