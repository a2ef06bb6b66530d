from __future__ import annotations

import json

import pytest
import torch

from core.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_json_lists_formats_with_design_fields(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plan", "--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--context", "8192",
                       "--formats", "bf16,int4_g128,q4_k_m", "--cpu-ram", "64", "--json")
    assert code == 0
    doc = json.loads(out)
    assert [r["format"] for r in doc["formats"]] == ["bf16", "int4_g128", "q4_k_m"]
    bf16 = doc["formats"][0]
    assert bf16["kv_cache_gib"] == 1.0 and bf16["fits"] is True and bf16["gpu_layers"] == 32
    assert doc["model"]["total_params"] == 8_030_261_248


def test_plan_table_shows_formulas(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plan", "--model", "deepseek-r1", "--gpu", "h200", "--num-gpus", "8",
                       "--engine", "vllm", "--formats", "fp8", "--cpu-ram", "256")
    assert code == 0
    assert "37.55 B active" in out and "MLA latent" in out and "fp8" in out


def test_plan_custom_gpu_and_forced_split(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plan", "--model", "llama-3.1-8b", "--gpu", "custom", "--gpu-memory", "6",
                       "--gpu-bandwidth", "400", "--formats", "int4_g128", "--gpu-layers", "10", "--cpu-ram", "32",
                       "--json")
    assert code == 0
    row = json.loads(out)["formats"][0]
    assert row["gpu_layers"] == 10 and row["cpu_layers"] == 22


@pytest.mark.parametrize("argv,needle", [
    (["plan", "--model", "lama-3.1-8b", "--gpu", "rtx-4090"], "llama-3.1-8b"),
    (["plan", "--model", "llama-3.1-8b", "--gpu", "rtx-4900"], "rtx-4090"),
    (["plan", "--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--context", "0"], "--context"),
    (["plan", "--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--batch", "-2"], "--batch"),
    (["plan", "--model", "llama-3.1-8b", "--gpu", "rtx-4090", "--formats", "int5"], "unknown format"),
])
def test_plan_bad_input_exits_2_with_one_line(capsys: pytest.CaptureFixture[str], argv: list[str],
                                              needle: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert needle in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_plan_auto_gpu_without_gpu_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "plan", "--model", "llama-3.1-8b")
    assert code == 2 and "no GPU detected" in err


def test_config_missing_fields_are_named(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text('{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}')
    code, _, err = run(capsys, "plan", "--model", str(cfg), "--gpu", "t4")
    assert code == 2 and "vocab_size" in err and "intermediate_size" in err


def test_catalog_and_gpus_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "catalog", "models", "--json")
    ids = {m["id"]: m for m in json.loads(out)["models"]}
    assert code == 0 and ids["deepseek-r1"]["active_params"] < 38e9
    code, out, _ = run(capsys, "catalog", "gpus")
    assert code == 0 and "rtx-4090" in out and "1008" in out
    code, out, _ = run(capsys, "gpus", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["ram_total_gib"] > 0
    if not torch.cuda.is_available():
        assert doc["gpus"] == [] and doc["message"] == "no GPU detected"


def test_plan_json_with_tensor_and_pipeline_parallel(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plan", "--model", "llama-3.1-405b", "--gpu", "h100-sxm", "--engine", "vllm",
                       "--num-gpus", "8", "--nodes", "2", "--formats", "fp8", "--cpu-ram", "64", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["layout"]["tp"] == 8 and doc["layout"]["pp"] == 2 and doc["layout"]["num_cards"] == 16
    row = doc["formats"][0]
    assert len(row["cards"]) == 16 and row["fits"] and row["max_card_gib"] < 79.1 * 0.9


def test_plan_refuses_a_tp_size_that_does_not_divide_the_heads(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "plan", "--model", "llama-3.1-70b", "--gpu", "h100-sxm", "--engine", "vllm",
                       "--tp", "3", "--cpu-ram", "64")
    assert code == 2 and "64 attention heads" in err and len(err.strip().splitlines()) == 1


def test_plan_experts_on_cpu_and_unequal_cards(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plan", "--model", "qwen3-30b-a3b", "--gpu", "rtx-4090", "--engine", "llama.cpp",
                       "--formats", "q4_k_m", "--experts-on-cpu", "--cpu-ram", "64", "--json")
    row = json.loads(out)["formats"][0]
    assert code == 0 and row["expert_offload"] and row["experts_cpu_gib"] > 15 and row["gpu_used_gib"] < 3
    code, out, _ = run(capsys, "plan", "--model", "llama-3.1-70b", "--gpu", "rtx-4090,rtx-3090", "--engine",
                       "llama.cpp", "--formats", "q3_k_m", "--cpu-ram", "64")
    assert code == 0 and "card 1 rtx-3090 stage 1 layers 40-80" in out
