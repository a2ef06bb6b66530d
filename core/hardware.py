"""Detect the NVIDIA GPUs and system RAM of this machine and match GPUs to the catalog.

torch.cuda gives names, total memory and compute capability; NVML (nvidia-ml-py, optional) adds
free memory as the driver sees it (other processes included). Without a GPU, `detect()` returns
no GPUs and `summary()` says so.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import psutil

from core.catalog import GPUSpec, find_gpu

log = logging.getLogger(__name__)

GIB = 2**30


@dataclass(frozen=True)
class DetectedGPU:
    index: int
    name: str
    total_bytes: int
    free_bytes: int | None
    compute_capability: tuple[int, int]
    catalog: GPUSpec | None  # matching catalog entry (bandwidth, native formats), if any

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    @property
    def free_gib(self) -> float | None:
        return None if self.free_bytes is None else self.free_bytes / GIB

    def spec(self) -> GPUSpec:
        """A GPUSpec for planning: the catalog entry with this card's real memory, or, for an
        unknown card, its memory and compute capability with bandwidth 0 (unknown)."""
        cc = self.compute_capability[0] + self.compute_capability[1] / 10
        if self.catalog is not None:
            c = self.catalog
            return GPUSpec(c.id, self.name, round(self.total_gib, 3), c.bandwidth_gb_s, c.generation,
                           c.compute_capability, c.native_formats, c.match, c.note,
                           usable_gib=round(self.total_gib, 3), nvlink=c.nvlink, engines=c.engines,
                           unified_memory=c.unified_memory)
        natives = ["fp32"]
        if cc >= 6.0:
            natives += ["fp16"]
        if cc >= 6.1:
            natives += ["int8"]
        if cc >= 8.0:
            natives += ["bf16"]
        if cc >= 8.9:
            natives += ["fp8"]
        if cc >= 10.0:
            natives += ["fp6", "fp4"]
        return GPUSpec("detected", self.name, round(self.total_gib, 3), 0.0, "unknown", cc, tuple(natives),
                       note="not in the catalog: bandwidth unknown, tokens/s not estimated")

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index, "name": self.name, "total_gib": round(self.total_gib, 3),
            "free_gib": None if self.free_gib is None else round(self.free_gib, 3),
            "compute_capability": f"{self.compute_capability[0]}.{self.compute_capability[1]}",
            "catalog_id": self.catalog.id if self.catalog else None,
            "bandwidth_gb_s": self.catalog.bandwidth_gb_s if self.catalog else None,
            "native_formats": list(self.spec().native_formats),
        }


@dataclass(frozen=True)
class SystemMemory:
    total_bytes: int
    available_bytes: int

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    @property
    def available_gib(self) -> float:
        return self.available_bytes / GIB


@dataclass(frozen=True)
class Hardware:
    gpus: list[DetectedGPU] = field(default_factory=list)
    ram: SystemMemory | None = None
    cuda_available: bool = False
    nvml: bool = False
    driver: str | None = None

    def summary(self) -> str:
        lines = []
        if not self.gpus:
            lines.append("no GPU detected" + ("" if self.cuda_available else " (CUDA is not available to PyTorch)"))
        for g in self.gpus:
            free = f", {g.free_gib:.1f} GiB free" if g.free_gib is not None else ""
            cat = f" [catalog: {g.catalog.id}, {g.catalog.bandwidth_gb_s:g} GB/s]" if g.catalog else " [not in catalog]"
            cc = f"{g.compute_capability[0]}.{g.compute_capability[1]}"
            lines.append(f"GPU {g.index}: {g.name}, {g.total_gib:.1f} GiB{free}, compute {cc}{cat}")
        if self.ram:
            lines.append(f"RAM: {self.ram.total_gib:.1f} GiB total, {self.ram.available_gib:.1f} GiB available")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "gpus": [g.to_json() for g in self.gpus],
            "cuda_available": self.cuda_available,
            "nvml": self.nvml,
            "driver": self.driver,
            "ram_total_gib": round(self.ram.total_gib, 3) if self.ram else None,
            "ram_available_gib": round(self.ram.available_gib, 3) if self.ram else None,
            "message": "no GPU detected" if not self.gpus else f"{len(self.gpus)} GPU(s) detected",
        }


def system_memory() -> SystemMemory:
    vm = psutil.virtual_memory()
    return SystemMemory(int(vm.total), int(vm.available))


def _nvml_info() -> tuple[dict[int, tuple[int, int]], str | None]:
    """{index: (total, free)} and the driver version from NVML, or ({}, None) without it."""
    try:
        import pynvml  # provided by nvidia-ml-py
    except ImportError:
        return {}, None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVML raises its own error classes; no driver is not an error here
        log.debug("NVML unavailable: %s", exc)
        return {}, None
    try:
        out = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            mem = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i))
            out[i] = (int(mem.total), int(mem.free))
        driver = pynvml.nvmlSystemGetDriverVersion()
        return out, driver.decode() if isinstance(driver, bytes) else str(driver)
    finally:
        pynvml.nvmlShutdown()


def detect() -> Hardware:
    """GPUs via torch.cuda (plus NVML free memory when installed) and system RAM via psutil."""
    import torch

    ram = system_memory()
    if not torch.cuda.is_available():
        return Hardware([], ram, cuda_available=False)
    nvml, driver = _nvml_info()
    found = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free: int | None
        if i in nvml:
            total, free = nvml[i]
        else:
            total = int(props.total_memory)
            try:
                free, _ = torch.cuda.mem_get_info(i)
            except RuntimeError:
                free = None
        found.append(DetectedGPU(i, props.name, int(total), free, (props.major, props.minor), find_gpu(props.name)))
    return Hardware(found, ram, cuda_available=True, nvml=bool(nvml), driver=driver)
