"""The layer-by-layer quantization loop.

The architecture is instantiated on the meta device (no memory), then each decoder layer in turn
is materialised on CPU in float32 with its real weights, handed to the method, measured, written
through the exporter as its own shard and freed, so that only one layer is resident. Calibrated
methods get the hidden states entering the layer and a `forward` closure; the layer's output
computed with the *quantized* weights becomes the next layer's input.

Calibration-free methods stream instead: the linears are built from the safetensors headers, the
weights stay memory-mapped in their stored dtype, the next layer is paged in on a reader thread
(`_LayerReader`) and finished shards go to a writer thread (`OutputWriter.submit`) while torch
runs single-threaded beside the primitives' two row workers.
"""
from __future__ import annotations

import ctypes
import fnmatch
import hashlib
import json
import logging
import math
import os
import sys
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import psutil
import torch
import torch.nn.functional as F
from torch import nn

from core import buffers, devices, native
from core.arch import ArchAdapter, adapter_for
from core.arch.base import FULL_ATTENTION
from core.arch.llama import ADAPTER as LLAMA
from core.config import Granularity, QuantJob
from core.events import (
    CancelToken,
    Finished,
    LayerDone,
    Log,
    MemorySample,
    Progress,
    Sink,
    StageStarted,
    ThrottledSink,
    check_cancel,
    null_sink,
)
from core.export import default_export, exporters_accepting, get_exporter
from core.export.convert import write_extra_files
from core.methods.base import LayerContext, get_quantizer
from core.metrics import weight_error
from core.model_io import ModelSource, open_model
from core.output import InterruptedJob as InterruptedJob  # re-exported: the GUI's resume prompt
from core.output import OutputWriter, file_sha256, json_safe, output_config, package_versions
from core.output import find_interrupted as find_interrupted  # re-exported: the GUI's resume prompt
from core.primitives import single_threaded_torch
from core.qtensors import IntWeight, QuantizedWeight

log = logging.getLogger(__name__)

GIB = 2**30

# True-sequential order inside a Llama-like decoder layer: attention inputs, attention output, MLP
# inputs, MLP output. Each family's adapter (core.arch) gives its own; linears with other names
# follow in module order.
_SEQUENTIAL = LLAMA.sequential

# Weight-error measurement: exact float64 up to this many elements, float32 row chunks above.
_METRIC_EXACT_NUMEL = 1 << 22
_METRIC_ROWS = 1024

# Calibration tokens per forward batch.
_CALIB_TOKENS_PER_BATCH = 4096

# Calibration tokens on which the propagation pass measures each linear's output error.
_PROBE_TOKENS = 16384

# Seconds to wait after journaling each layer: only the crash/resume fault tests set it, so that
# a tiny model's run lasts long enough to be killed between two layers.
_TEST_DELAY_ENV = "QUANTSCOPE_TEST_LAYER_DELAY"


@dataclass
class QuantResult:
    output: Path
    method: str
    export: str
    layers: list[dict[str, Any]]
    seconds: float
    peak_rss_gib: float
    settings: dict[str, Any] = field(default_factory=dict)
    model: Path | None = None
    source_gib: float = 0.0
    output_gib: float = 0.0
    device: str = "cpu"
    threads: int = 1
    peak_device_gib: float | None = None  # peak allocated on a CUDA device; None on the CPU
    # Sampled peaks of anonymous and file-backed resident memory (None where /proc is missing).
    peak_rss_anon_gib: float | None = None
    peak_rss_file_gib: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The `quantize --json` document (DESIGN §3); non-finite numbers become null."""
        return json_safe({
            "output": str(self.output),
            "model": str(self.model) if self.model else None,
            "method": self.method,
            "export": self.export,
            "settings": self.settings,
            "layers": self.layers,
            "seconds": self.seconds,
            "peak_rss_gib": self.peak_rss_gib,
            "source_gib": self.source_gib,
            "output_gib": self.output_gib,
            "device": self.device,
            "threads": self.threads,
            "peak_device_gib": self.peak_device_gib,
            "peak_rss_anon_gib": self.peak_rss_anon_gib,
            "peak_rss_file_gib": self.peak_rss_file_gib,
        })


class _RssMonitor:
    """Peak resident memory of this process during a job. On Linux the kernel's own high-water
    mark (VmHWM) is reset at the start (/proc/self/clear_refs) and read at the end: exact and
    free. Elsewhere a background thread samples the RSS (the peak is inside the quantizer, which
    per-layer samples alone would miss); sampling costs a few percent of a streaming run.

    The kernel keeps no high-water mark per kind, so the split into anonymous memory (RssAnon:
    heap and tensors, what can run a machine out of RAM) and file-backed pages (RssFile: the
    memory-mapped weights, page cache the kernel can reclaim) is sampled from /proc/self/status
    every `split_interval` seconds (a 1 KB read; peaks shorter than that can be missed)."""

    def __init__(self, interval: float = 0.02, split_interval: float = 0.05) -> None:
        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = self.rss()
        self.peak_anon = self.peak_file = 0
        self._kernel_peak = _reset_kernel_peak()
        self._split = bool(devices.rss_breakdown())
        if not self._kernel_peak:
            self._thread: threading.Thread | None = threading.Thread(target=self._run, name="quantscope-rss",
                                                                     daemon=True)
        elif self._split:
            self._interval = split_interval
            self._thread = threading.Thread(target=self._run, name="quantscope-rss", daemon=True)
        else:
            self._thread = None

    def rss(self) -> int:
        return self._proc.memory_info().rss

    def sample(self) -> int:
        value = self.rss()
        self.peak = max(self.peak, value, _kernel_peak() if self._kernel_peak else 0)
        self._sample_split()
        return value

    def _sample_split(self) -> None:
        if self._split:
            r = devices.rss_breakdown()
            self.peak_anon = max(self.peak_anon, r.get("RssAnon", 0))
            self.peak_file = max(self.peak_file, r.get("RssFile", 0))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            if self._kernel_peak:
                self._sample_split()  # the total comes from VmHWM
            else:
                self.sample()

    def __enter__(self) -> _RssMonitor:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


def _kernel_peak() -> int:
    """VmHWM of this process in bytes (0 when unavailable)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _reset_kernel_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _kernel_peak() > 0


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps freed tensor buffers below its (growing)
    mmap threshold in the heap, so without this the RSS creeps up layer after layer."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


def settings_dict(method_config: Any) -> dict[str, Any]:
    d = asdict(method_config) if is_dataclass(method_config) else dict(vars(method_config))
    return {k: (v.value if isinstance(v, Granularity) else v) for k, v in d.items()}


def is_skipped(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """A module is skipped when a pattern is a substring of its full name, or matches it as a
    glob (`*.down_proj`)."""
    return any(p in name or fnmatch.fnmatchcase(name, p) for p in patterns if p)


def _load_quantizer(method_config: Any) -> Any:
    try:
        return get_quantizer(method_config)
    except ModuleNotFoundError as exc:
        raise ValueError(
            f"method {method_config.method!r} is not available in this build (module {exc.name} is missing); "
            "choose another --method"
        ) from None


def _load_exporter(name: str, method_config: Any) -> Any:
    try:
        exporter = get_exporter(name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"export format {name!r} is not available in this build (module {exc.name} is missing); "
                         "choose another --export") from None
    reason = exporter.accepts(method_config)
    if reason:
        others = [n for n in exporters_accepting(method_config) if n != name]
        raise ValueError(
            f"export format {name!r} cannot store method {method_config.method!r}: {reason}; "
            f"use --export {' or '.join(others)}" if others else
            f"export format {name!r} cannot store method {method_config.method!r}: {reason}; "
            "no format in this build can, choose other settings"
        )
    return exporter


def _ordered_linears(layer: nn.Module, sequential: tuple[str, ...] = _SEQUENTIAL) -> list[tuple[str, nn.Linear]]:
    """The layer's linears in execution order (`sequential`: leaf names, from the family's adapter)."""
    found = [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    rank = {s: i for i, s in enumerate(sequential)}
    return sorted(found, key=lambda nm: rank.get(nm[0].rsplit(".", 1)[-1], len(rank)))


def layer_weight_error(w: torch.Tensor, w_hat: torch.Tensor | QuantizedWeight) -> dict[str, float]:
    """`core.metrics.weight_error` (mse, rel_error, sqnr_db, same definitions) of w against w_hat,
    a dequantized tensor or the quantized weight itself. A plain grouped / per-channel / per-tensor
    IntWeight is measured in one fused pass over row chunks (dequantize, difference, float64
    accumulation) that never materialises ŵ; anything else is dequantized first. Large tensors are
    measured in float32 row chunks with float64 accumulation instead of whole float64 copies,
    which would cost several hundred MB and most of the time on a 58M-element linear."""
    if isinstance(w_hat, IntWeight) and w_hat.error_sums is not None:
        return _error_from_sums(*w_hat.error_sums, w.numel())
    if isinstance(w_hat, IntWeight) and w_hat.g_idx is None and w.dim() == 2:
        from core.primitives import affine_error_sums

        sums = affine_error_sums(w.detach(), w_hat.codes, w_hat.scale, w_hat.zero, w_hat.group_size)
        if sums is not None:
            return _error_from_sums(*sums, w.numel())
    if not isinstance(w_hat, torch.Tensor):
        w_hat = dequantize_weight(w_hat).reshape(w.shape)
    if w.numel() <= _METRIC_EXACT_NUMEL:
        return weight_error(w, w_hat)
    noise = signal = 0.0
    for r in range(0, w.shape[0], _METRIC_ROWS):
        a = w[r:r + _METRIC_ROWS].float()
        noise += float(torch.linalg.vector_norm(a - w_hat[r:r + _METRIC_ROWS].float(), dtype=torch.float32)) ** 2
        signal += float(torch.linalg.vector_norm(a, dtype=torch.float32)) ** 2
    return _error_from_sums(noise, signal, w.numel())


def _error_from_sums(noise: float, signal: float, numel: int) -> dict[str, float]:
    mse = noise / max(numel, 1)
    rel = math.sqrt(noise / signal) if signal > 0 else (0.0 if noise == 0 else math.inf)
    sqnr = math.inf if noise == 0 else (10.0 * math.log10(signal / noise) if signal > 0 else -math.inf)
    return {"mse": mse, "rel_error": rel, "sqnr_db": sqnr}


def dequantize_weight(q: QuantizedWeight) -> torch.Tensor:
    """q.dequantize(), with a reshape instead of a per-column gather for plain grouped integer
    weights (the common case, and the slow one on big layers)."""
    if isinstance(q, IntWeight) and q.g_idx is None and q.scale.dim() == 2 and q.scale.shape[1] > 1:
        out, n_in = q.codes.shape
        groups = q.scale.shape[1]
        if groups * q.group_size == n_in and q.scale.shape[0] == out:
            codes = q.codes.view(out, groups, q.group_size).float()
            zero = q.zero.to(torch.float32).unsqueeze(-1)
            return ((codes - zero) * q.scale.float().unsqueeze(-1)).view(out, n_in)
    return q.dequantize()


def _check_finite(name: str, t: torch.Tensor, src: ModelSource) -> None:
    if not t.is_floating_point():
        return
    n_bad = native.count_non_finite(t)  # from the bit patterns, one native pass
    if n_bad is None:
        n_bad = _count_non_finite_torch(t)
    if n_bad:
        raise ValueError(
            f"tensor {name} in {src.tensors[name].file} contains {n_bad} NaN/Inf value(s); "
            "the checkpoint is damaged, re-download or repair it before quantizing"
        )


def _count_non_finite_torch(t: torch.Tensor) -> int:
    # A cheap sum per chunk first (chunked so a 1 GB embedding never gets a float32 copy); the
    # exact elementwise test only when a sum is not finite. The sum stays in the tensor's dtype:
    # torch accumulates bf16/fp16 in float32 internally, and asking for dtype=float32 instead
    # converts element by element, 17× slower (0.22 s vs 0.013 s per 64M bf16 values). An fp16
    # sum that overflows only costs the exact test. FP8 has no native sum kernel.
    flat = t.reshape(-1)
    step = 1 << 24
    acc = torch.float32 if t.element_size() == 1 else None
    if all(bool(torch.isfinite(flat[i:i + step].sum(dtype=acc))) for i in range(0, flat.numel(), step)):
        return 0
    return int((~torch.isfinite(t.float() if acc is not None else t)).sum())


def _linear_widths(src: ModelSource, skip: tuple[str, ...]) -> dict[str, int]:
    """{decoder linear to quantize: in_features}, from the safetensors headers."""
    widths: dict[str, int] = {}
    for name, info in src.tensors.items():
        if not (name.startswith("model.layers.") and name.endswith("_proj.weight") and len(info.shape) == 2):
            continue
        module = name[: -len(".weight")]
        if not is_skipped(module, skip):
            widths[module] = int(info.shape[1])
    return widths


def _validate_groups(src: ModelSource, job: QuantJob, export_name: str, emit: Sink) -> None:
    """Before any work: a group size that does not divide some linear's in_features leaves a
    ragged last group (stored as ceil(in/group_size) groups). Refuse it when the chosen layout
    cannot store that (compressed-tensors, AWQ); say so when the default layout moved to GPTQ."""
    from core.export import ragged_linears, ragged_refusal

    widths = _linear_widths(src, job.skip)
    ragged = ragged_linears(job.method, widths)
    if not ragged:
        return
    module, width = next(iter(ragged.items()))
    group_size = int(job.method.group_size)
    if get_exporter(export_name).accepts(job.method) is not None:
        return  # _load_exporter has refused already
    gptq_ok = get_exporter("gptq").accepts(job.method) is None
    msg = ragged_refusal(export_name, module, width, group_size, set(widths.values()), gptq_ok=gptq_ok)
    if msg is not None:
        raise ValueError(msg)
    if job.export is None and export_name != default_export(job.method):
        emit(Log("info", f"group size {group_size} does not divide in_features of {len(ragged)} linears "
                         f"({width} % {group_size} = {width % group_size} in {module}): their last group is ragged; "
                         f"{default_export(job.method)} cannot store that, so the export is {export_name}"))


class DeviceOutOfMemory(ValueError):
    """The device ran out of memory in a layer. Reported like bad settings (one line, non-zero
    exit): the fix is a setting (fewer samples, shorter sequences, another device), and the
    finished layers are kept for `--resume`."""


class _StreamedBatches(Sequence):
    """Calibration batches kept in pinned host memory, each copied to the device when a method
    reads it (the whole set did not fit beside the layer). `streamed` tells methods that keep
    per-batch intermediates (GPTQ's staged layer) to stream instead."""

    streamed = True

    def __init__(self, host: list[torch.Tensor], device: torch.device) -> None:
        self.host = host
        self.device = device

    def __len__(self) -> int:
        return len(self.host)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [t.to(self.device, non_blocking=True) for t in self.host[i]]
        return self.host[i].to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for t in self.host:
            yield t.to(self.device, non_blocking=True)


class Calibration:
    """Hidden states entering the current layer, plus what a layer forward needs.

    The states live on `device` when `resident`, else in host memory (pinned for CUDA) and reach
    the device one batch at a time; `hidden` hands methods a sequence of device tensors either way.

    Each attention type of the family (`arch.layer_types(hf_config)`: global, sliding-window) gets
    its own rotary table (from the model's rotary module, per type where the family has one per
    type) and its own mask, and each layer is called with those of its type, as the full model
    does. Without `hf_config` every layer is a global-attention layer."""

    def __init__(self, hidden: list[torch.Tensor], rotary: nn.Module, seq_len: int,
                 device: torch.device | None = None, resident: bool = True, *,
                 arch: ArchAdapter = LLAMA, hf_config: Any = None) -> None:
        self.device = device if device is not None else hidden[0].device
        self.resident = resident
        self._hidden: list[torch.Tensor] = []
        self.hidden = hidden
        self.layer_types = arch.layer_types(hf_config) if hf_config is not None else []
        # Positions, rotary tables and masks are built on the CPU (the same numbers on every
        # device) and moved once.
        positions = torch.arange(seq_len, device="cpu")[None]
        self.position_ids = positions.to(self.device)
        # Additive causal mask: explicit, so no attention backend's default matters.
        causal = torch.full((seq_len, seq_len), torch.finfo(torch.float32).min, device="cpu").triu(1)
        self._per_type: dict[str, tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
        for layer_type in sorted(set(self.layer_types)) or [FULL_ATTENTION]:
            with torch.no_grad():
                cos, sin = arch.position_embeddings(rotary, hidden[0][:1].to("cpu"), positions, layer_type)
            window = arch.window(hf_config, layer_type) if hf_config is not None else None
            mask = causal if window is None or window >= seq_len else _sliding_window_mask(seq_len, window)
            self._per_type[layer_type] = ((cos.float().to(self.device), sin.float().to(self.device)),
                                          mask[None, None].to(self.device))
        first = self.layer_types[0] if self.layer_types else FULL_ATTENTION
        self.position_embeddings, self.mask = self._per_type[first]

    @property
    def hidden(self) -> Sequence[torch.Tensor]:
        return self._hidden if self.resident else _StreamedBatches(self._hidden, self.device)

    @hidden.setter
    def hidden(self, batches: Sequence[torch.Tensor]) -> None:
        self._hidden = [self.keep(h) for h in batches]

    def keep(self, h: torch.Tensor) -> torch.Tensor:
        """h as this calibration stores it: on the device, or in pinned host memory."""
        if self.resident:
            return h.to(self.device)
        if self.device.type != "cuda":  # a CPU job (streamed only in tests) has nothing to pin for
            return h.to("cpu")
        if h.device.type == "cpu" and h.is_pinned():
            return h
        # Pinned pages let the per-batch copies to the GPU run asynchronously; one copy into them.
        pinned = torch.empty(h.shape, dtype=h.dtype, device="cpu", pin_memory=True)
        pinned.copy_(h)
        return pinned

    def host_copies(self) -> list[torch.Tensor]:
        """The states in host memory (for the resume journal); no copy when already there."""
        return [h if h.device.type == "cpu" else h.to("cpu") for h in self._hidden]

    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self._hidden)

    def forward_fn(self, layer: nn.Module, index: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """Layer `index` (default: the index transformers gave its attention) run on one batch."""
        if index is None:
            index = int(getattr(getattr(layer, "self_attn", None), "layer_idx", 0) or 0)
        layer_type = self.layer_types[index] if index < len(self.layer_types) else FULL_ATTENTION
        (cos, sin), mask = self._per_type.get(layer_type, (self.position_embeddings, self.mask))

        def forward(hidden: torch.Tensor) -> torch.Tensor:
            s = hidden.shape[1]
            with torch.no_grad():
                out = layer(
                    hidden.to(self.device, non_blocking=True),
                    attention_mask=mask[:, :, :s, :s],
                    position_ids=self.position_ids[:, :s],
                    position_embeddings=(cos[:, :s], sin[:, :s]),
                )
            return out[0] if isinstance(out, tuple) else out

        return forward


def _sliding_window_mask(seq_len: int, window: int) -> torch.Tensor:
    """Additive [seq, seq] mask of a sliding-window causal layer, from transformers' own mask
    function (a query sees the `window` positions ending at itself)."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    q = torch.arange(seq_len)[:, None]
    kv = torch.arange(seq_len)[None, :]
    allowed = sliding_window_causal_mask_function(window)(0, 0, q, kv)
    return torch.zeros(seq_len, seq_len).masked_fill(~allowed, torch.finfo(torch.float32).min)


def _build_calibration(job: QuantJob, src: ModelSource, model: nn.Module, hf_config: Any,
                       sink: Sink, device: torch.device | None = None,
                       device_budget: int | None = None) -> Calibration:
    from transformers import AutoTokenizer

    from core.calibration import calibration_batches

    sink(StageStarted("calibrate", message=f"calibration text: {job.calib.source}"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.path), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"no usable tokenizer in {src.path} ({exc}); calibrated methods need the model's "
                         "tokenizer files beside config.json") from None
    ids = calibration_batches(tokenizer, job.calib)
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"calibration produced no tokens from {job.calib.source}; use a longer text")
    calib = embed_calibration(src, ids, model, hf_config, device=device, device_budget=device_budget)
    where = ""
    if not calib.resident:
        pinned = "pinned host memory" if calib.device.type == "cuda" else "host memory"
        where = f", in {pinned}, streamed to {calib.device} per batch (they do not fit beside the layer)"
    elif calib.device.type != "cpu":
        where = f", kept on {calib.device}"
    sink(Log("info", f"calibration: {ids.shape[0]} samples x {ids.shape[1]} tokens "
                     f"({calib.nbytes() / GIB:.2f} GiB of hidden states{where})"))
    return calib


def embed_calibration(src: ModelSource, ids: torch.Tensor, model: nn.Module, hf_config: Any,
                      device: torch.device | None = None, device_budget: int | None = None) -> Calibration:
    """Calibration token ids [samples, seq_len] embedded in float32 (batches of about
    _CALIB_TOKENS_PER_BATCH tokens) as the hidden states entering decoder layer 0; `model` is the
    meta model of `meta_model(src)`, whose rotary embedding class is used. The embedding runs on
    the CPU (a lookup); the states then live on `device` (default: the CPU) when twice their size
    (a layer's inputs and outputs) fits `device_budget` bytes (None: no limit), else in pinned
    host memory."""
    arch = adapter_for(src.architecture)
    embed_name = arch.embed_name
    emb = src.load_tensors([embed_name])[embed_name]
    _check_finite(embed_name, emb, src)
    emb = emb.float()
    scale = arch.embed_scale(hf_config)  # Gemma: sqrt(hidden), in float32 as transformers has it
    per_batch = max(1, _CALIB_TOKENS_PER_BATCH // ids.shape[1])
    with torch.no_grad():
        hidden = [F.embedding(chunk, emb) for chunk in ids.split(per_batch)]
        if scale is not None:
            hidden = [h * scale for h in hidden]
    del emb
    with torch.device("cpu"):  # the rotary tables are computed on the CPU (see Calibration)
        rotary = type(model.model.rotary_emb)(config=hf_config)
    device = device if device is not None else torch.device("cpu")
    nbytes = sum(h.numel() * h.element_size() for h in hidden)
    resident = device_budget is None or 2 * nbytes <= device_budget
    return Calibration(hidden, rotary.eval(), ids.shape[1], device=device, resident=resident,
                       arch=arch, hf_config=hf_config)


def meta_model(src: ModelSource) -> tuple[nn.Module, Any]:
    """(the architecture on the meta device in float32 — no memory, no weights —, its HF config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from core.arch import SUPPORTED_ARCHITECTURES

    hf_config = AutoConfig.from_pretrained(str(src.path), trust_remote_code=False)
    # The family's attention kernel (Gemma 2's softcapping is eager-only); sdpa for the rest.
    attn = adapter_for(src.architecture).attn_implementation if src.architecture in SUPPORTED_ARCHITECTURES \
        else "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, attn_implementation=attn,
                                                 trust_remote_code=False)
    return model, hf_config



def materialise(layer: nn.Module, prefix: str, tensors: dict[str, torch.Tensor], src: ModelSource,
                as_float: bool = True, device: torch.device | None = None) -> None:
    """Give a meta decoder layer its real weights on `device` (default: the CPU): float32, one
    tensor moved and converted at a time (on the device, so only the stored bytes cross the bus),
    or (as_float=False, for methods that read bf16/fp16 themselves) as stored."""
    expected = set(layer.state_dict().keys())
    state: dict[str, torch.Tensor] = {}
    for name in list(tensors):
        rel = name[len(prefix):]
        if rel in expected:
            t = tensors.pop(name)
            if device is not None and device.type != "cpu":
                t = t.to(device)
            state[rel] = t.float() if as_float else t
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(f"tensor {prefix}{missing[0]} is missing from {src.path}; the checkpoint is incomplete, "
                         "download all of its files")
    layer.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in list(layer.named_parameters()) + list(layer.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"tensor {prefix}{left[0]} has no data in {src.path}")


class _OutputErrorProbe:
    """While propagating calibration batches through a layer whose linears now hold dequantized
    weights, accumulate ‖X·Wᵀ − f(X)·Ŵᵀ‖² and ‖X·Wᵀ‖² per linear (f = activation fake-quant)."""

    def __init__(self, linears: dict[str, nn.Linear], quantized: dict[str, QuantizedWeight]) -> None:
        self.noise = {n: 0.0 for n in quantized}
        self.signal = {n: 0.0 for n in quantized}
        self.active = True  # measure the error of this batch (else only compute the output)
        self._saved: list[tuple[nn.Linear, torch.Tensor]] = []
        for name, q in quantized.items():
            lin = linears[name]
            w_float = lin.weight.data
            self._saved.append((lin, w_float))
            w_hat = dequantize_weight(q).to(torch.float32).reshape(w_float.shape)
            lin.weight.data = w_hat
            lin.forward = self._make_forward(name, lin, w_float, w_hat, getattr(q, "act", None))

    def _make_forward(self, name: str, lin: nn.Linear, w: torch.Tensor, w_hat: torch.Tensor,
                      act: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            xq = act.fake_quant(x) if act is not None else x
            out = F.linear(xq, w_hat, lin.bias)
            if self.active:
                ref = F.linear(x, w, lin.bias)
                self.noise[name] += float(torch.linalg.vector_norm(ref - out)) ** 2
                self.signal[name] += float(torch.linalg.vector_norm(ref)) ** 2
            return out

        return forward

    def restore(self) -> None:
        """Put the float weights back and remove the wrappers."""
        for lin, w_float in self._saved:
            lin.weight.data = w_float
            lin.__dict__.pop("forward", None)

    def rel_errors(self) -> dict[str, float]:
        return {n: (math.sqrt(self.noise[n] / self.signal[n]) if self.signal[n] > 0 else 0.0) for n in self.noise}


def run_quantization(job: QuantJob, *, sink: Sink = null_sink, cancel: CancelToken | None = None) -> QuantResult:
    """Quantize `job.model` into `job.out` layer by layer (see module docstring). Emits events to
    `sink` on this thread; `cancel` is checked between linears and layers. On cancellation or
    any error the partial output is removed and the exception propagates."""
    try:
        return _run_quantization(job, sink, cancel)
    finally:
        buffers.pool.clear()  # the layers' reusable buffers are not needed after the job


def _run_quantization(job: QuantJob, sink: Sink, cancel: CancelToken | None) -> QuantResult:
    t_start = time.perf_counter()
    emit = ThrottledSink(sink)
    src = open_model(job.model)
    src.require_weights()
    quantizer = _load_quantizer(job.method)
    export_name = job.export or default_export(job.method, _linear_widths(src, job.skip))
    exporter = _load_exporter(export_name, job.method)
    _validate_groups(src, job, export_name, emit)
    if src.num_layers <= 0 or not src.layer_tensor_names(0):
        raise ValueError(f"{src.path}: no decoder layer tensors (model.layers.N.*) found; is this a causal LM folder?")
    arch = adapter_for(src.architecture)
    # Tensors written after the decoder layers (the rest of the non-layer tensors go first).
    head = [n for n in src.non_layer_tensor_names() if n.startswith(arch.head_prefixes)]
    stem = [n for n in src.non_layer_tensor_names() if n not in head]
    groups = ([stem] if stem else []) + [[]] * src.num_layers + ([head] if head else [])
    first_layer_shard = 1 if stem else 0
    writer = OutputWriter(job.out, num_shards=len(groups), overwrite=job.overwrite, resume=job.resume,
                          source=src.path, fingerprint=job_fingerprint(job, src, export_name))
    writer.check_target()

    calibrated = bool(getattr(quantizer, "needs_calibration", False))
    # Calibrated methods run the real decoder layer; the others only need its linears, which the
    # headers describe, so they never import transformers' modeling code (seconds per run).
    if calibrated:
        model, hf_config = meta_model(src)
        layers: Any = model.model.layers
    else:
        model = hf_config = None
        layers = [_layer_from_headers(src, i) for i in range(src.num_layers)]
    n_linears = sum(
        1 for i in range(src.num_layers) for rel, _ in _ordered_linears(layers[i], arch.sequential)
        if not is_skipped(f"{src.layer_prefix(i)}{rel}", job.skip)
    )
    records: list[dict[str, Any]] = []
    quantized_names: list[str] = []
    ignored_names: list[str] = ["lm_head"]
    # The layout's config classes (compressed-tensors imports transformers: ~2 s) load in the
    # background while layers stream. Only when nothing else imports transformers meanwhile: its
    # lazy module is not safe to import from two threads at once.
    warm = None if calibrated else _warm_up(exporter, job.method, src.source_dtype)
    done = 0
    settings = settings_dict(job.method)

    choice, calib_budget = _choose_device(job, src, calibrated)
    device = choice.device
    # Calibration-free methods on the CPU run their own row workers (one per thread); torch's
    # OpenMP threads would only spin beside them (primitives.single_threaded_torch).
    threads = nullcontext() if calibrated or device.type != "cpu" else single_threaded_torch()
    devices.reset_peak(device)
    with devices.thread_scope(job.threads) as n_threads, _RssMonitor() as rss, writer, threads, \
            _fp32_matmul(device):
        if writer.fresh_reason:
            emit(Log("warning", f"not resuming, starting fresh: {writer.fresh_reason}"))
        elif writer.replaced_partial is not None:
            job_left = writer.replaced_partial
            emit(Log("warning", f"{job_left.describe()}; it was replaced by this new run (pass --resume to "
                                f"continue from layer {job_left.layers_done + 1}/{job_left.total_layers} instead)"))
        emit(Log("info", f"{src.architecture}, {src.num_layers} layers, {src.total_bytes / GIB:.2f} GiB "
                         f"{src.source_dtype}; method {job.method.method}, export {export_name}"))
        emit(Log("info", f"device {device} ({choice.reason}); {n_threads} CPU thread(s)"))
        writer.set_journal_info(model=str(src.path), method=job.method.method, settings=settings, export=export_name,
                                num_layers=src.num_layers)
        if stem:
            writer.submit(_copy_tensors, writer, 0, stem, src, bounded=False)
        if head:
            _prefetch(src, head)
        calib = (_build_calibration(job, src, model, hf_config, emit, device=device, device_budget=calib_budget)
                 if calibrated else None)
        finished = _resumable_layers(writer, calib, src.num_layers, emit) if job.resume else {}
        if finished:
            emit(Log("info", f"resuming: {len(finished)}/{src.num_layers} layers reused from the interrupted run"))

        reader = _LayerReader(src)
        native_said = False
        emit(StageStarted("quantize", total=n_linears, message=f"{src.num_layers} decoder layers"))
        emit(Progress("quantize", 0, n_linears))
        for i in range(src.num_layers):
            check_cancel(cancel)
            prefix = src.layer_prefix(i)
            if i in finished:
                ignored_names.extend(f"{prefix}{rel}" for rel, _ in _ordered_linears(layers[i], arch.sequential)
                                     if is_skipped(f"{prefix}{rel}", job.skip))
                for rec in finished[i]["metrics"]:
                    done += 1
                    records.append(rec)
                    quantized_names.append(rec["name"])
                    emit(LayerDone(rec["name"], done - 1, n_linears, _event_metrics(rec), rec["seconds"]))
                    emit(Progress("quantize", done, n_linears, rec["name"]))
                emit(Log("info", f"layer {i + 1}/{src.num_layers}: reused from the interrupted run"))
                continue
            tensors = reader.take(i, next_layer=next((j for j in range(i + 1, src.num_layers) if j not in finished),
                                                     None))
            try:
                layer_records, shard = _quantize_layer(
                    i, prefix, src, layers[i], quantizer, exporter, job, calib, emit, cancel, done, n_linears,
                    ignored_names, tensors, device=device, arch=arch,
                )
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is translated, the rest re-raised
                if not devices.is_out_of_memory(exc):
                    raise
                del tensors
                layers[i].to("meta")
                raise _out_of_memory(exc, job, src, i, device, calibrated, writer) from None
            del tensors
            done += len(layer_records)
            records.extend(layer_records)
            quantized_names.extend(r["name"] for r in layer_records)
            writer.submit(_store_layer, writer, i, first_layer_shard + i, shard, layer_records,
                          {f"hidden.{j}": h for j, h in enumerate(calib.host_copies())} if calib else None)
            del shard
            layers[i].to("meta")  # free this layer's weights
            if os.environ.get(_TEST_DELAY_ENV):
                time.sleep(float(os.environ[_TEST_DELAY_ENV]))
            release_freed_memory()
            emit(MemorySample(rss.sample() / GIB))
            emit(Log("info", f"layer {i + 1}/{src.num_layers} done"))
            if not calibrated and not native_said:  # after the first layer: the kernels are loaded by now
                emit(Log(*native.status()))
                native_said = True
        check_cancel(cancel)
        if head:
            emit(StageStarted("write", message="final norm and lm_head"))
            writer.submit(_copy_tensors, writer, len(groups) - 1, head, src, bounded=False)
        writer.flush()
        if warm is not None:
            warm.join()
        qconfig = exporter.quantization_config(job.method, quantized_names, ignored_names)
        config = output_config(src.config, qconfig, src.source_dtype)
        write_extra_files(writer, exporter, qconfig)
        seconds = time.perf_counter() - t_start
        report = {
            "quantscope_version": package_versions().get("quantscope"),
            "model": str(src.path),
            "architecture": src.architecture,
            "method": job.method.method,
            "settings": settings,
            "export": export_name,
            "skip": list(job.skip),
            "calibration": asdict(job.calib) if (calibrated and job.calib) else None,
            "layers": records,
            "seconds": seconds,
            "peak_rss_gib": rss.peak / GIB,
            "peak_rss_anon_gib": rss.peak_anon / GIB if rss.peak_anon else None,
            "peak_rss_file_gib": rss.peak_file / GIB if rss.peak_anon else None,
            "device": str(device),
            "threads": n_threads,
            **devices.device_memory_stats(device),
            "source_gib": src.total_bytes / GIB,
            "packages": package_versions(),
        }
        check_cancel(cancel)
        out = writer.finish(config=config, report=report, source=src.path)
    output_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    result = QuantResult(
        output=out, method=job.method.method, export=export_name, layers=records, seconds=time.perf_counter() - t_start,
        peak_rss_gib=rss.peak / GIB, settings=settings, model=src.path, source_gib=src.total_bytes / GIB,
        output_gib=output_bytes / GIB, device=str(device), threads=n_threads,
        peak_device_gib=devices.device_memory_stats(device).get("peak_allocated_gib"),
        peak_rss_anon_gib=rss.peak_anon / GIB if rss.peak_anon else None,
        peak_rss_file_gib=rss.peak_file / GIB if rss.peak_anon else None,
    )
    emit(Finished(result))
    return result


def _event_metrics(rec: dict[str, Any]) -> dict[str, float]:
    """The metrics of a journaled record (everything but its bookkeeping fields)."""
    return {k: v for k, v in rec.items() if k not in ("name", "layer", "index", "shape", "seconds")}


@dataclass
class _LayerShard:
    """A finished layer's output: its quantized linears already in the exporter's layout and the
    layer's other tensors as they will be stored."""

    packed: dict[str, torch.Tensor] = field(default_factory=dict)
    rest: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = dict(self.packed)
        for name, t in self.rest.items():
            out.setdefault(name, t)  # a layout may have written it already (e.g. a linear's bias)
        return out


def _store_layer(writer: OutputWriter, i: int, index: int, shard: _LayerShard,
                 records: list[dict[str, Any]], calib: dict[str, torch.Tensor] | None) -> None:
    """Write and journal a finished layer's shard (on the writer's background thread)."""
    writer.record_layer(i, records, writer.write_shard(index, shard.tensors()), calib=calib)


def _warm_up(exporter: Any, method_config: Any, dtype: torch.dtype) -> threading.Thread:
    """Load the native kernels for `dtype` weights and the layout's config classes on a thread of
    their own while the first layer is read."""
    def build() -> None:
        for step in (lambda: native.warm_up(dtype), lambda: exporter.quantization_config(method_config, [], [])):
            try:
                step()
            except Exception:  # noqa: BLE001 - only a warm-up; the real call reports any problem
                pass

    thread = threading.Thread(target=build, name="quantscope-warm-up", daemon=True)
    thread.start()
    return thread


# Tensors from this size are paged in by the layer reader.
_TOUCH_MIN_BYTES = 1 << 20


class _LayerReader:
    """Opens the next decoder layer's tensors (memory-mapped, nothing copied) on a background
    thread while the current one is quantized, and maps their pages (`_page_in`) so that the disk
    reads wait there. (Reading the bytes into memory of their own there instead was slower: the
    copy competes with the quantizer for the two cores.)"""

    def __init__(self, src: ModelSource) -> None:
        self._src = src
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: tuple[int, Future] | None = None

    def take(self, i: int, next_layer: int | None) -> dict[str, torch.Tensor]:
        ahead, self._ahead = self._ahead, None
        tensors = ahead[1].result() if ahead is not None and ahead[0] == i else self._load(i)
        if next_layer is not None:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantscope-reader")
                weakref.finalize(self, self._pool.shutdown, wait=False)
            self._ahead = (next_layer, self._pool.submit(self._load, next_layer))
        return tensors

    def _load(self, i: int) -> dict[str, torch.Tensor]:
        # The disk reads happen on this thread, overlapped with the quantizer, instead of as page
        # faults inside it (8B: 41 s instead of 48-51 s).
        return _load_paged(self._src, self._src.layer_tensor_names(i))


def _load_paged(src: ModelSource, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors, memory-mapped, with their reads queued at once (`_will_need`) and the
    pages of the large ones mapped (`_page_in`) before they are returned."""
    _will_need(src, names)
    tensors = src.load_tensors(names)
    for t in tensors.values():
        if t.numel() * t.element_size() >= _TOUCH_MIN_BYTES:
            _page_in(t)
    return tensors


_MADV_POPULATE_READ = 22  # Linux ≥ 5.14
_madvise: Any = None


def _page_in(t: torch.Tensor) -> None:
    """Map every page of a memory-mapped tensor, reading it from disk where needed. One
    madvise(MADV_POPULATE_READ) call where the kernel has it (8B: the reader's CPU 6.4 → 1.7 s,
    the job 1.5-2 s faster than faulting page by page); else one byte per page is touched."""
    global _madvise
    if _madvise is None:
        fn: Any = False
        if sys.platform.startswith("linux"):  # the advice number is Linux's
            try:
                fn = ctypes.CDLL(None, use_errno=True).madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            except (OSError, AttributeError, TypeError):
                fn = False
        _madvise = fn  # set whole: the reader and the writer may get here at the same time
    if _madvise:
        start = t.data_ptr() & ~4095
        length = (t.data_ptr() + t.numel() * t.element_size() - start + 4095) & ~4095
        if _madvise(start, length, _MADV_POPULATE_READ) == 0:
            return
    t.reshape(-1).view(torch.uint8)[::4096].max()


def _will_need(src: ModelSource, names: list[str]) -> None:
    """posix_fadvise(WILLNEED) over the byte ranges of the named tensors (merged per file): the
    kernel queues all their reads at once instead of one read-around per page fault. Only a hint:
    errors and platforms without it are ignored."""
    if not hasattr(os, "POSIX_FADV_WILLNEED"):
        return
    spans: dict[Path, list[int]] = {}
    for n in names:
        info = src.tensors[n]
        lo, hi = spans.setdefault(info.file, [info.data_start, info.data_start + info.nbytes])
        spans[info.file] = [min(lo, info.data_start), max(hi, info.data_start + info.nbytes)]
    for file, (lo, hi) in spans.items():
        try:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except OSError:
            pass


def _prefetch(src: ModelSource, names: list[str]) -> None:
    """Ask the kernel to read the named tensors into the page cache, asynchronously. Used for the
    head (lm_head, final norm), which is copied after the last layer: read cold there it was a
    serial tail of ~2 s on an 8B model; read ahead, its disk reads fill the moments the layer
    reader is idle."""
    threading.Thread(target=_will_need, args=(src, names), name="quantscope-prefetch", daemon=True).start()


def _layer_from_headers(src: ModelSource, i: int) -> nn.Module:
    """Decoder layer i as bare meta modules built from the checkpoint's tensor names and shapes:
    an nn.Linear for every 2-D `.weight` (with its `.bias`), plain parameters for the rest (norms).
    For the supported architectures every 2-D tensor of a decoder layer is a linear weight."""
    prefix = src.layer_prefix(i)
    names = [n[len(prefix):] for n in src.layer_tensor_names(i)]
    root = nn.Module()

    def holder(path: str) -> nn.Module:
        module = root
        for part in path.split(".") if path else []:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        return module

    linear_paths = set()
    for rel in names:
        path, _, leaf = rel.rpartition(".")
        shape = src.tensors[prefix + rel].shape
        if leaf == "weight" and len(shape) == 2 and path:
            parent, _, child = path.rpartition(".")
            with torch.device("meta"):
                lin = nn.Linear(shape[1], shape[0], bias=f"{path}.bias" in names)
            holder(parent).add_module(child, lin)
            linear_paths.add(path)
    for rel in names:
        path, _, leaf = rel.rpartition(".")
        if path in linear_paths and leaf in ("weight", "bias"):
            continue
        info = src.tensors[prefix + rel]
        holder(path).register_parameter(
            leaf, nn.Parameter(torch.empty(info.shape, dtype=info.torch_dtype, device="meta"), requires_grad=False))
    return root


def _copy_tensors(writer: OutputWriter, shard: int, names: list[str], src: ModelSource) -> None:
    """Unquantized tensors outside the decoder layers, written in their source dtype."""
    tensors = _load_paged(src, names)
    for n, t in tensors.items():
        _check_finite(n, t, src)
    writer.write_shard(shard, tensors)


def _quantize_layer(
    i: int, prefix: str, src: ModelSource, layer: nn.Module, quantizer: Any, exporter: Any, job: QuantJob,
    calib: Calibration | None, emit: Sink, cancel: CancelToken | None, done: int, total: int,
    ignored: list[str], tensors: dict[str, torch.Tensor], device: torch.device | None = None,
    arch: ArchAdapter = LLAMA,
) -> tuple[list[dict[str, Any]], _LayerShard]:
    """Quantize decoder layer i from its tensors as stored; returns its records and what its
    output shard will hold."""
    names = src.layer_tensor_names(i)
    # Methods that find NaN/Inf themselves while rounding (from each group's range) spare the
    # streaming run a separate pass over every weight; the engine then names the file (below).
    self_checked = {f"{prefix}{rel}.weight" for rel, _ in _ordered_linears(layer, arch.sequential)
                    if getattr(quantizer, "checks_finite", False) and not is_skipped(f"{prefix}{rel}", job.skip)}
    for n, t in tensors.items():
        if n not in self_checked:
            _check_finite(n, t, src)
    stored_dtype = {n[len(prefix):]: src.tensors[n].torch_dtype for n in names}
    materialise(layer, prefix, tensors, src, as_float=not getattr(quantizer, "reads_source_dtype", False),
                device=device)
    del tensors

    all_linears = _ordered_linears(layer, arch.sequential)
    linears = {rel: m for rel, m in all_linears if not is_skipped(f"{prefix}{rel}", job.skip)}
    ignored.extend(f"{prefix}{rel}" for rel, _ in all_linears if rel not in linears)
    ctx_prefix = prefix.rstrip(".")
    weight_dtype = stored_dtype.get(f"{next(iter(linears))}.weight", src.source_dtype) if linears else src.source_dtype

    # Methods may report extra per-linear figures (GPTQ loss, AWQ ratio, LLM.int8 outlier columns)
    # in extra["metrics"][relative name]; one dict shared by every context of this layer.
    method_metrics: dict[str, dict[str, float]] = {}
    # A calibrated method may also leave the layer's quantized output in extra["propagated"] (with
    # each linear's output error in extra["output_rel_error"]) when it computed them on the way.
    # norm_offset: the family's RMSNorm scales by (offset + weight), which folding must respect.
    extra: dict[str, Any] = {"source_dtype": weight_dtype, "metrics": method_metrics, "norm_offset": arch.norm_offset}

    def context(subset: dict[str, nn.Linear]) -> LayerContext:
        return LayerContext(
            index=i, num_layers=src.num_layers, prefix=ctx_prefix, module=layer, linears=subset,
            inputs=calib.hidden if calib else None, forward=calib.forward_fn(layer, i) if calib else None,
            cancel=cancel, sink=emit, extra=extra,
        )

    quantized: dict[str, QuantizedWeight] = {}
    seconds: dict[str, float] = {}
    if calib is None:
        # One call per linear: exact per-linear timing and a cancellation point between them.
        for rel, lin in linears.items():
            check_cancel(cancel)
            t0 = time.perf_counter()
            try:
                quantized[rel] = _expect(quantizer.quantize_layer(context({rel: lin})), rel, prefix)
            except ValueError:
                if f"{prefix}{rel}.weight" in self_checked:
                    _check_finite(f"{prefix}{rel}.weight", lin.weight.detach(), src)  # the message with the file
                raise
            seconds[rel] = time.perf_counter() - t0
    else:
        # Calibrated methods see the whole layer at once (true-sequential inside the method);
        # the time is shared among linears by size.
        t0 = time.perf_counter()
        result = quantizer.quantize_layer(context(dict(linears)))
        elapsed = time.perf_counter() - t0
        quantized = {rel: _expect(result, rel, prefix) for rel in linears}
        numel = sum(lin.weight.numel() for lin in linears.values()) or 1
        seconds = {rel: elapsed * lin.weight.numel() / numel for rel, lin in linears.items()}

    out_errors: dict[str, float] = {}
    if calib is not None and isinstance(extra.get("propagated"), list):
        check_cancel(cancel)
        calib.hidden = extra.pop("propagated")
        out_errors = dict(extra.pop("output_rel_error", {}))
    elif calib is not None:
        # Propagate with the quantized weights; measure each linear's output error on the first
        # batches on the way (a statistic: more tokens would double the cost of every linear).
        check_cancel(cancel)
        forward = calib.forward_fn(layer, i)
        probe = _OutputErrorProbe(linears, quantized)
        hidden: list[torch.Tensor] = []
        measured = 0
        try:
            for h in calib.hidden:
                check_cancel(cancel)
                probe.active = measured < _PROBE_TOKENS
                measured += h.shape[0] * h.shape[1]
                hidden.append(calib.keep(forward(h)))
        finally:
            probe.restore()
        calib.hidden = hidden
        out_errors = probe.rel_errors()

    records: list[dict[str, Any]] = []
    shard = _LayerShard()
    for rel, lin in linears.items():
        check_cancel(cancel)
        full = f"{prefix}{rel}"
        q = quantized[rel]
        metrics = layer_weight_error(lin.weight.detach(), q)
        if rel in out_errors:
            metrics["output_rel_error"] = out_errors[rel]
        metrics.update({k: float(v) for k, v in method_metrics.get(rel, {}).items()
                        if isinstance(v, (int, float)) and k not in metrics})
        for k, v in metrics.items():
            if isinstance(v, float) and math.isnan(v):
                raise ValueError(f"quantizing {full} produced NaN error metrics; the weight may be degenerate")
        rec = {"name": full, "layer": i, "index": done + len(records), "shape": list(lin.weight.shape),
               **metrics, "seconds": seconds[rel]}
        records.append(rec)
        emit(LayerDone(full, done + len(records) - 1, total, dict(metrics), seconds[rel]))
        emit(Progress("quantize", done + len(records), total, full))
        # Packed here rather than on the writer thread: a third busy thread on two cores slows the
        # quantizer's workers more than the packing costs. Packing as we go frees each linear's codes.
        # The layouts are written from host memory: a result computed on a GPU comes back first.
        shard.packed.update(exporter.tensors(full, devices.to_device(q, "cpu")))
        quantized[rel] = None  # type: ignore[assignment]

    # Everything else in the layer (norms, biases, skipped linears) in its stored dtype, taken from
    # the module so that scales folded in place by a method are kept.
    quantized_weights = {f"{rel}.weight" for rel in linears}
    for rel, t in layer.state_dict().items():
        if rel not in quantized_weights:
            shard.rest[f"{prefix}{rel}"] = t.to("cpu", stored_dtype.get(rel, src.source_dtype))
    return records, shard


def job_fingerprint(job: QuantJob, src: ModelSource, export_name: str) -> str:
    """sha256 of everything that decides a layer's output: the model (config.json bytes, every
    tensor's name/shape/dtype/offsets, each weight file's size and mtime), the method settings,
    export format, skip list, calibration (with the calibration file's content hash) and the
    Quantscope version. A resume whose fingerprint differs starts fresh."""
    from core import __version__

    config_file = src.path / "config.json" if src.path.is_dir() else src.path
    files = []
    for f in src.files:
        st = f.stat()
        files.append([f.name, st.st_size, st.st_mtime_ns])
    calib = None
    if job.calib is not None and job.method.method in _calibrated_methods():
        calib = {"source": job.calib.source, "samples": job.calib.samples, "seq_len": job.calib.seq_len,
                 "seed": job.calib.seed}
        if job.calib.source != "builtin":
            calib["source"] = str(Path(job.calib.source).resolve())
            calib["sha256"] = file_sha256(Path(job.calib.source))
    doc = {
        "config": hashlib.sha256(config_file.read_bytes()).hexdigest() if config_file.is_file() else None,
        "tensors": sorted([n, list(t.shape), t.dtype, t.file.name, list(t.data_offsets)]
                          for n, t in src.tensors.items()),
        "files": sorted(files),
        "method": job.method.method,
        "settings": settings_dict(job.method),
        "export": export_name,
        "skip": list(job.skip),
        "calibration": calib,
        "version": __version__,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _calibrated_methods() -> tuple[str, ...]:
    from core.config import CALIBRATED_METHODS

    return tuple(CALIBRATED_METHODS)


def _resumable_layers(writer: OutputWriter, calib: Calibration | None, num_layers: int,
                      emit: Sink) -> dict[int, dict[str, Any]]:
    """Finished layers a resume may reuse. Calibrated methods continue only after the longest run
    of finished layers from layer 0 whose propagated hidden states were saved, and take those
    states over, so that the remaining layers see exactly the inputs of an uninterrupted run."""
    finished = writer.finished_layers()
    if calib is None or not finished:
        return finished
    saved = writer.saved_calibration()
    k = 0
    while k in finished:
        k += 1
    if saved is None or saved[0] != k - 1:
        emit(Log("warning", "the interrupted run saved no calibration state for its last layer; "
                            "calibrated layers are quantized again from layer 1"))
        return {}
    hidden = saved[1]
    calib.hidden = [hidden[f"hidden.{j}"] for j in range(len(hidden))]
    return {i: finished[i] for i in range(k)}


def _expect(result: dict[str, QuantizedWeight], rel: str, prefix: str) -> QuantizedWeight:
    q = result.get(rel) if isinstance(result, dict) else None
    if q is None:
        raise RuntimeError(f"the quantizer returned no weight for {prefix}{rel}")
    return q


def _choose_device(job: QuantJob, src: ModelSource, calibrated: bool) -> tuple[devices.DeviceChoice, int | None]:
    """(where the job runs and why, the device bytes the calibration states may take or None).

    The planner's memory-to-quantize estimate is the GPU need: "auto" takes the GPU only when it
    fits. On a GPU the calibration states stay on the device when the estimate without them plus
    twice their size fits the free memory (see embed_calibration); else they stream from host."""
    need: float | None = None
    other: float | None = None
    if job.device != "cpu":
        try:
            from core.planner import quantize_memory

            est = quantize_memory(src.path, job.method, job.calib, device="cuda")
            need = est["peak_gpu_gib"] * GIB
            other = need - est["parts_gib"].get("calibration_activations", 0.0) * GIB
        except (ValueError, KeyError, OSError) as exc:  # an unusual config: decide without the estimate
            log.info("no memory estimate for %s: %s", src.path, exc)
    choice = devices.resolve_device(job.device, need)
    if choice.device.type != "cuda" or not calibrated:
        return choice, None
    free = devices.cuda_free_bytes(choice.device)
    return choice, max(0, int(0.9 * free - (other or 0.0)))


def _out_of_memory(exc: BaseException, job: QuantJob, src: ModelSource, i: int, device: torch.device,
                   calibrated: bool, writer: OutputWriter) -> DeviceOutOfMemory:
    """The error for an out-of-memory in layer i: which layer, what it asked for, what to change;
    the finished layers are journaled and the partial output kept so that --resume continues."""
    asked = devices.requested_bytes(exc)
    detail = f"it asked for {asked / GIB:.2f} GiB more" if asked is not None else "an allocation failed"
    if device.type == "cuda":
        try:
            free, total = torch.cuda.mem_get_info(device)
            detail += (f" with {torch.cuda.memory_allocated(device) / GIB:.2f} GiB in use by this job "
                       f"and {free / GIB:.2f} of {total / GIB:.2f} GiB free")
        except RuntimeError:
            pass
        torch.cuda.empty_cache()
    fixes = []
    if calibrated and job.calib is not None:
        fixes += [f"fewer --samples (now {job.calib.samples})", f"a shorter --seq-len (now {job.calib.seq_len})"]
    if device.type != "cpu":
        fixes.append("--device cpu")
    advice = (" and " + (", ".join(fixes[:-1]) + " or " + fixes[-1] if len(fixes) > 1 else fixes[0])) if fixes \
        else " once more memory is free"
    kept = "no layer was finished; rerun"
    try:
        writer.flush()  # the layers before this one are written and journaled
        writer.keep_partial = True
        if i:
            kept = ("layer 1 is kept" if i == 1 else f"layers 1-{i} are kept") + "; rerun with --resume"
    except Exception:  # noqa: BLE001 - the OOM is the error to report; the partial output goes
        pass
    what = f"CUDA memory on {device}" if device.type == "cuda" else f"memory on {device}"
    msg = (f"out of {what} in layer {i + 1}/{src.num_layers} ({src.layer_prefix(i).rstrip('.')}): {detail}; "
           f"{kept}{advice}")
    return DeviceOutOfMemory(msg)


@contextmanager
def _fp32_matmul(device: torch.device) -> Iterator[None]:
    """Full float32 matmuls for the job (Hessians, statistics and the layer forward): a user's
    TF32 setting would change GPTQ's Hessians in the 3rd digit on a GPU."""
    if device.type == "cpu":  # the CPU has no TF32: nothing to change
        yield
        return
    try:
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
    except RuntimeError:  # the user configured precision through torch's newer per-backend API
        yield
        return
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
