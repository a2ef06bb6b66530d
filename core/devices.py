"""Where a job runs and on how many threads: the one place that decides both.

Device: `--device auto|cpu|cuda|cuda:N`. "auto" takes the GPU when one is present and the
planner's memory-to-quantize estimate fits its free memory, else the CPU, and says why.

Threads: a job runs on `threads` CPU threads, by default the cores this process may run on
(`os.sched_getaffinity`, which honours taskset/cgroups; `os.cpu_count()` counts the machine's).
`thread_scope` sets torch's intra-op threads for the calibrated methods and the row-worker count
of the streaming RTN kernels (`core.primitives`) for the duration of a job, and restores them.
"""
from __future__ import annotations

import dataclasses
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

GIB = 2**30

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

# Share of a GPU's free memory a job may plan to use: the CUDA context, the caching allocator's
# fragmentation and cuBLAS/cuSOLVER workspaces take the rest.
_FREE_SHARE = 0.9


def available_threads() -> int:
    """CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def check_device_spec(spec: str) -> str:
    """The spec normalised ("CUDA" → "cuda"); ValueError that says what to write otherwise."""
    s = str(spec).strip().lower()
    if not _DEVICE_RE.match(s):
        raise ValueError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N (e.g. cuda:0)")
    return s


def check_threads(threads: int | None) -> int | None:
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive whole number (this process may use "
                         f"{available_threads()} cores), got {threads!r}")
    return threads


@dataclass(frozen=True)
class DeviceChoice:
    device: torch.device
    reason: str


def cuda_free_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device as the driver reports it (other processes' use counted)."""
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def _explicit_cuda(spec: str) -> torch.device:
    if not torch.cuda.is_available():
        raise ValueError(f"device {spec}: no CUDA GPU is available here (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda or 'none'}); use --device cpu or auto")
    dev = torch.device(spec)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    count = torch.cuda.device_count()
    if dev.index >= count:
        raise ValueError(f"device {spec}: only {count} CUDA device(s) here (cuda:0 … cuda:{count - 1})")
    return dev


def resolve_device(spec: str, need_bytes: float | None = None) -> DeviceChoice:
    """The torch device for `spec` and why. "auto" picks the CUDA device with the most free memory
    when `need_bytes` (the planner's GPU-memory estimate; None = unknown) fits `_FREE_SHARE` of it."""
    s = check_device_spec(spec)
    if s == "cpu":
        return DeviceChoice(torch.device("cpu"), "--device cpu")
    if s != "auto":
        dev = _explicit_cuda(s)
        return DeviceChoice(dev, f"--device {s}: {torch.cuda.get_device_name(dev)}")
    if not torch.cuda.is_available():
        return DeviceChoice(torch.device("cpu"), "auto: no CUDA GPU available, running on the CPU")
    free = {i: cuda_free_bytes(torch.device("cuda", i)) for i in range(torch.cuda.device_count())}
    best = max(free, key=lambda i: free[i])
    dev = torch.device("cuda", best)
    name = torch.cuda.get_device_name(dev)
    if need_bytes is None:
        return DeviceChoice(dev, f"auto: {name} (cuda:{best}, {free[best] / GIB:.1f} GiB free)")
    if need_bytes <= _FREE_SHARE * free[best]:
        return DeviceChoice(dev, f"auto: {name} (cuda:{best}) has {free[best] / GIB:.1f} GiB free, the job needs "
                                 f"about {need_bytes / GIB:.1f} GiB")
    return DeviceChoice(torch.device("cpu"),
                        f"auto: the job needs about {need_bytes / GIB:.1f} GiB of GPU memory, {name} (cuda:{best}) "
                        f"has {free[best] / GIB:.1f} GiB free; running on the CPU (fewer --samples or a shorter "
                        "--seq-len lower the need)")


# -- threads --------------------------------------------------------------------------------

_threads_lock = threading.Lock()
_row_workers: int | None = None  # set by thread_scope for the duration of a job


def row_workers() -> int:
    """Python workers the streaming row loops split a weight between (each runs single-threaded
    torch or a native kernel that releases the GIL): the job's thread count inside a
    `thread_scope`, else torch's thread count as it was before any single-threaded section."""
    if _row_workers is not None:
        return _row_workers
    from core.primitives import torch_threads_outside

    return max(1, torch_threads_outside())


@contextmanager
def thread_scope(threads: int | None) -> Iterator[int]:
    """Run the enclosed job on `threads` CPU threads (None = `available_threads()`): torch's
    intra-op threads and the streaming kernels' row workers. Restored afterwards."""
    global _row_workers
    n = check_threads(threads) or available_threads()
    with _threads_lock:
        before_torch, before_rows = torch.get_num_threads(), _row_workers
        torch.set_num_threads(n)
        _row_workers = n
    try:
        yield n
    finally:
        with _threads_lock:
            torch.set_num_threads(before_torch)
            _row_workers = before_rows


# -- device helpers used by the engine --------------------------------------------------------

def is_out_of_memory(exc: BaseException) -> bool:
    """A device allocation failure (torch.OutOfMemoryError, also raised as a RuntimeError text by
    some kernels, e.g. cuSOLVER workspaces)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower() and "cuda" in str(exc).lower()


def requested_bytes(exc: BaseException) -> int | None:
    """Bytes the failed allocation asked for, read from torch's message ("Tried to allocate 2.00 GiB")."""
    m = re.search(r"Tried to allocate ([\d.]+) (B|KiB|MiB|GiB|TiB)", str(exc))
    if not m:
        return None
    unit = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}[m.group(2)]
    return int(float(m.group(1)) * unit)


def to_device(obj: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """A quantized weight (any of core.qtensors' dataclasses, nested ActQuant included), tensor,
    list or dict with every tensor moved to `device`; other values unchanged. Tensors already
    there are not copied."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: to_device(getattr(obj, f.name), device, non_blocking)
                   for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, list):
        return [to_device(v, device, non_blocking) for v in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    return obj


def device_memory_stats(device: torch.device) -> dict[str, float]:
    """Peak allocated / reserved GiB on a CUDA device since the last reset (empty on CPU)."""
    if device.type != "cuda":
        return {}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_breakdown() -> dict[str, int]:
    """This process's resident memory split as the kernel counts it (Linux /proc/self/status):
    RssAnon (heap, tensors: what can run a machine out of RAM), RssFile (mapped files, e.g.
    memory-mapped weights: reclaimable page cache) and RssShmem, in bytes; {} elsewhere."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith((b"RssAnon:", b"RssFile:", b"RssShmem:")):
                    key, value = line.split(b":", 1)
                    out[key.decode()] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out
