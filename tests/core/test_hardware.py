from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from core import hardware


def test_system_ram_is_reported() -> None:
    ram = hardware.system_memory()
    assert 0 < ram.available_bytes <= ram.total_bytes


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_no_gpu_is_reported_cleanly() -> None:
    hw = hardware.detect()
    assert hw.gpus == [] and "no GPU detected" in hw.summary()
    assert hw.to_json()["message"] == "no GPU detected"


def test_detected_gpu_is_matched_to_catalog(monkeypatch: pytest.MonkeyPatch) -> None:
    props = SimpleNamespace(name="NVIDIA GeForce RTX 4090", total_memory=25_393_692_672, major=8, minor=9)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (20 * 2**30, props.total_memory))
    monkeypatch.setattr(hardware, "_nvml_info", lambda: ({}, None))
    hw = hardware.detect()
    (g,) = hw.gpus
    assert g.catalog is not None and g.catalog.id == "rtx-4090"
    spec = g.spec()
    assert spec.bandwidth_gb_s == 1008 and "fp8" in spec.native_formats
    assert spec.memory_gib == pytest.approx(props.total_memory / 2**30, abs=1e-3)
    assert g.free_gib == 20


def test_unknown_gpu_gets_formats_from_compute_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    g = hardware.DetectedGPU(0, "Some Future GPU", 8 * 2**30, None, (9, 0), None)
    spec = g.spec()
    assert "fp8" in spec.native_formats and spec.bandwidth_gb_s == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_gpu_is_detected() -> None:
    hw = hardware.detect()
    assert hw.gpus and hw.gpus[0].total_bytes > 0
