from __future__ import annotations

import json

import pytest

from core import catalog
from core.resources import resource_path

REQUIRED_GPUS = ("p40", "p100-16gb", "v100-16gb", "v100-32gb", "t4", "rtx-2080-ti", "rtx-3090", "rtx-4090",
                 "rtx-5090", "a10", "a100-40gb", "a100-80gb", "l20", "l40", "l40s", "h20", "h100-pcie", "h100-sxm",
                 "h200", "b200", "custom")


def test_resources_are_found_next_to_core() -> None:
    path = resource_path("gpus.json")
    assert path.parent.name == "resources"
    assert json.loads(path.read_text())["gpus"]


def test_gpu_catalog_covers_the_required_cards_with_specs() -> None:
    by_id = {g.id: g for g in catalog.gpus()}
    assert set(REQUIRED_GPUS) <= set(by_id)
    assert by_id["rtx-4090"].memory_gib == 24 and by_id["rtx-4090"].bandwidth_gb_s == 1008
    assert by_id["h100-sxm"].bandwidth_gb_s == 3350 and by_id["h200"].memory_gib == 141
    for g in by_id.values():
        if g.id != "custom":
            assert g.memory_gib > 0 and g.bandwidth_gb_s > 0 and "fp32" in g.native_formats


@pytest.mark.parametrize("device_name,expected", [
    ("NVIDIA GeForce RTX 4090", "rtx-4090"), ("NVIDIA L40S", "l40s"), ("NVIDIA L40", "l40"),
    ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb"), ("Tesla V100-SXM2-32GB", "v100-32gb"), ("Tesla T4", "t4"),
    ("NVIDIA H200", "h200"), ("NVIDIA A10", "a10"),
])
def test_detected_device_names_match_catalog_entries(device_name: str, expected: str) -> None:
    g = catalog.find_gpu(device_name)
    assert g is not None and g.id == expected


def test_unknown_gpu_suggests_close_ids() -> None:
    with pytest.raises(ValueError, match="rtx-4090"):
        catalog.get_gpu("rtx-4900")


def test_custom_gpu_takes_typed_memory_and_bandwidth() -> None:
    g = catalog.custom_gpu(20, 500)
    assert g.memory_gib == 20 and g.bandwidth_gb_s == 500 and g.memory_bytes == 20 * 2**30
    with pytest.raises(ValueError, match="memory"):
        catalog.custom_gpu(0, 500)


def test_model_catalog_lookup_and_suggestions() -> None:
    assert catalog.get_model("Llama-3.1-8B").id == "llama-3.1-8b"
    assert catalog.get_model("deepseek-ai/DeepSeek-R1").id == "deepseek-r1"
    with pytest.raises(ValueError, match="llama-3.1-8b"):
        catalog.get_model("lama-3.1-8b")
    assert {m.id for m in catalog.search_models("qwen3")} >= {"qwen3-0.6b", "qwen3-8b", "qwen3-235b-a22b"}
