"""The one place where the app calls into `core`. Views import this module, not core's
modules directly, so the app's view of the engine, planner and catalogs is written down once.

Everything here is plain Python (no Qt) and runs either on the UI thread (fast calls such as
reading headers or planning) or inside a `TaskRunner` (anything that touches weights). The jobs
that load models with transformers or run for minutes (quantize, evaluate, verify) go one step
further: their worker function starts a child process (app.jobproc) and relays its events, so
that the job's GIL is never the UI thread's.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.events import CancelToken, Sink, StageStarted, null_sink

log = logging.getLogger(__name__)


def _optional(module: str) -> Any | None:
    """Import a core module that a build may not have (e.g. no planner); None when absent."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return None
        raise


# ---------------------------------------------------------------- models

def supported_architectures() -> tuple[str, ...]:
    """Architectures the engine quantizes (Plan and Inspect read any)."""
    from core.model_io import SUPPORTED_ARCHITECTURES

    return tuple(SUPPORTED_ARCHITECTURES)


def open_model(path: str | Path) -> Any:
    """Headers only. Unsupported architectures open too: planning and inspection work for them,
    quantizing checks support itself."""
    from core.model_io import open_model as _open

    return _open(path, check_architecture=False)


def catalog_model_ids() -> list[str]:
    from core import catalog

    return [m.id for m in catalog.models()]


def catalog_model(model_id: str) -> Any:
    """A catalog entry (config facts only); ValueError with close names when unknown."""
    from core import catalog

    return catalog.get_model(model_id)


def fallback_catalog_id() -> str | None:
    """What the app shows when the demo model cannot be prepared: SmolLM2-135M's catalog entry if
    the catalog has one, else its first model."""
    from core import catalog

    entries = catalog.models()
    for m in entries:
        if "smollm2" in m.id.lower() and "135" in m.id:
            return m.id
    return entries[0].id if entries else None


def demo_model_ready() -> Path | None:
    demo = _optional("core.demo")
    if demo is None:
        return None
    return demo.demo_model_dir() if demo.is_prepared() else None


def prepare_demo(*, sink: Sink = null_sink, cancel: CancelToken | None = None) -> Path:
    """Worker function: the real SmolLM2-135M demo model, converted into the cache on first use.
    The conversion is atomic and takes seconds, so it is not interruptible midway; `cancel` is
    honoured before it starts."""
    from core.demo import prepare_smollm2

    if cancel is not None:
        cancel.check()
    return prepare_smollm2(sink=sink)


# ---------------------------------------------------------------- hardware

def gpu_memory() -> list[tuple[float, float]]:
    """(used GiB, total GiB) per visible CUDA device, for the status bar. Reads the CUDA runtime
    only when torch already initialised it or a GPU exists, so CPU machines pay nothing."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        out.append(((total - free) / 2**30, total / 2**30))
    return out


@dataclass(frozen=True)
class GpuOption:
    """One entry of the GPU picker. `spec` is the core object the planner takes."""

    key: str
    label: str
    memory_gib: float
    bandwidth_gbs: float | None
    spec: Any
    free_gib: float | None = None
    detected: bool = False
    detail: str = ""
    index: int | None = None  # CUDA device index of a detected GPU (what `cuda:N` names)


def system_ram_gib() -> tuple[float, float]:
    """(total, available) GiB."""
    import psutil

    vm = psutil.virtual_memory()
    return vm.total / 2**30, vm.available / 2**30


DEFAULT_GPU = "rtx-4090"


def _gpu_option(spec: Any, *, free_gib: float | None = None, detected: bool = False,
                label: str | None = None, index: int | None = None) -> GpuOption:
    detail = f"{spec.generation}, compute {spec.compute_capability:g}"
    if spec.native_formats:
        detail += f"; native: {', '.join(spec.native_formats)}"
    mem = f"{spec.memory_gib:.0f} GiB"
    # A detected GPU's key carries its index: two identical cards are two entries, not one.
    prefix = f"detected:{index}:" if detected and index is not None else "detected:" if detected else ""
    return GpuOption(
        key=prefix + spec.id,
        label=label or f"{spec.name} — {mem}",
        memory_gib=float(spec.memory_gib),
        bandwidth_gbs=float(spec.bandwidth_gb_s) or None,
        spec=spec,
        free_gib=free_gib,
        detected=detected,
        detail=detail,
        index=index,
    )


def catalog_gpus() -> list[GpuOption]:
    from core import catalog

    return [_gpu_option(g) for g in catalog.gpus() if g.id != "custom"]


def detected_gpus() -> list[GpuOption]:
    """GPUs on this machine (free memory now), matched to catalog entries for bandwidth."""
    from core.hardware import detect

    out = []
    for dev in detect().gpus:
        free = dev.free_gib
        label = f"GPU {dev.index}: {dev.name}" + (f" — {free:.1f} GiB free" if free is not None else "")
        out.append(_gpu_option(dev.spec(), free_gib=free, detected=True, label=label, index=dev.index))
    return out


@dataclass(frozen=True)
class DeviceOption:
    """One entry of a device picker: the `device` string a job takes ("auto", "cpu", "cuda:N")."""

    device: str
    label: str
    tooltip: str = ""


def compute_devices() -> list[DeviceOption]:
    """Where a job can run here: Auto, the CPU, then each detected CUDA GPU by index."""
    out = [DeviceOption("auto", "Auto", "The GPU when the job fits in its free memory, else the CPU"),
           DeviceOption("cpu", "CPU", "The CPU, on all the cores this process may use")]
    for opt in detected_gpus():
        if opt.index is None:
            continue
        # The detected label without its free memory, which changes while the app runs.
        head = opt.label.split(" — ")[0]
        out.append(DeviceOption(f"cuda:{opt.index}", f"{head} (cuda:{opt.index})", opt.label))
    return out


def custom_gpu(memory_gib: float, bandwidth_gbs: float) -> GpuOption:
    from core import catalog

    spec = catalog.custom_gpu(memory_gib, bandwidth_gbs)
    return _gpu_option(spec, label=f"Custom GPU — {memory_gib:.0f} GiB, {bandwidth_gbs:.0f} GB/s")


# ---------------------------------------------------------------- quantization

def run_quantization(*, job: Any, sink: Sink = null_sink, cancel: CancelToken | None = None) -> Any:
    """Worker function: the engine's layer-by-layer loop (see core.engine), in a child process
    (app.jobproc) so that the job's GIL never stalls the UI thread. Returns the QuantResult."""
    from app.jobproc import run_in_child

    return run_in_child(quantize_here, {"job": job}, sink=sink, cancel=cancel,
                        on_kill=lambda: _remove_partial(job.out))


def quantize_here(*, job: Any, sink: Sink = null_sink, cancel: CancelToken | None = None) -> Any:
    """The engine's loop in this process (what the job's child process runs)."""
    from core.engine import run_quantization as _run

    return _run(job, sink=sink, cancel=cancel)


def _remove_partial(out: str | Path) -> None:
    """The job's temporary output folder, which a killed job process could not remove itself
    (under the output's lock: left alone if another run already writes there)."""
    from core.output import remove_partial

    remove_partial(out)


def find_interrupted(out: str | Path) -> Any | None:
    """The interrupted run that left a partial folder for `out` (InterruptedJob with
    `describe()`, `layers_done`, `total_layers`), or None. Reads one small journal: UI thread."""
    from core.engine import find_interrupted as _find

    return _find(Path(out))


def verify_export(*, path: str | Path, source: str | Path | None = None, sink: Sink = null_sink,
                  cancel: CancelToken | None = None) -> Any:
    """Worker function: load the written export with its real consumer and compare its logits
    and perplexity with Quantscope's model (core.export.verify), in a child process as the
    quantization runs (app.jobproc). `source` is the model folder the export was made from: a
    GGUF's own tokenization is checked against its tokenizer (without it that check is skipped).
    Returns the VerifyReport; raises VerifyError (a ValueError) when they differ beyond the
    tolerance."""
    from app.jobproc import run_in_child

    return run_in_child(verify_export_here, {"path": path, "source": source}, sink=sink, cancel=cancel)


def verify_export_here(*, path: str | Path, source: str | Path | None = None, sink: Sink = null_sink,
                       cancel: CancelToken | None = None) -> Any:
    """`verify_export` in this process (what its child process runs)."""
    from core.export.verify import verify_export as _verify

    return _verify(Path(path), source=Path(source) if source is not None else None, sink=sink, cancel=cancel)


def recorded_source(output: str | Path) -> Path | None:
    """The model folder a Quantscope output folder was made from, as its quantscope_report.json
    records it (`model` from a quantization, `source` from a re-layout); None when the folder has
    no report or the recorded folder is gone. Reads one small file: UI thread."""
    import json

    from core.output import REPORT_FILE

    report = Path(output).expanduser() / REPORT_FILE
    try:
        doc = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key in ("model", "source"):
        value = doc.get(key) if isinstance(doc, dict) else None
        if isinstance(value, str) and value and Path(value).is_dir():
            return Path(value)
    return None


def is_verify_mismatch(exc: object) -> bool:
    """True when `exc` is verify_export's VerifyError (the export computes a different function),
    as opposed to a failure to load or read it."""
    from core.export.verify import VerifyError

    return isinstance(exc, VerifyError)


def exports_for(method_config: Any, source: Any = None) -> list[str]:
    """Export formats that can represent this method's output (others are not offered). With the
    model `source`, layouts that cannot store the ragged last groups its widths give are left out."""
    from core.export import default_export, exporters_accepting, ragged_linears, ragged_refusal

    widths = linear_in_features(source) if source is not None else {}
    names = list(exporters_accepting(method_config))
    ragged = ragged_linears(method_config, widths)
    if ragged:
        module, width = next(iter(ragged.items()))
        names = [n for n in names if ragged_refusal(n, module, width, int(method_config.group_size)) is None]
    default = default_export(method_config, widths)
    if default not in names:
        # The default layout is the engine's own; it is always writable even when the exporter
        # module for another layout is absent.
        names.insert(0, default)
    return names


def default_export_for(method_config: Any, source: Any = None) -> str:
    """The layout the engine writes when none is chosen (it sees the model's widths when given)."""
    from core.export import default_export

    return default_export(method_config, linear_in_features(source) if source is not None else None)


def linear_in_features(source: Any) -> dict[str, int]:
    """{decoder linear: in_features} from the source's tensor headers ({} without weights)."""
    tensors = getattr(source, "tensors", {}) or {}
    # A quantized folder's linears are packed (no plain `.weight`): nothing to say about them.
    return {n[: -len(".weight")]: int(tensors[n].shape[1]) for n in linear_weight_names(source) if n in tensors}


def ragged_group_note(source: Any, method_config: Any) -> str:
    """One line for the Quantize view when the group size leaves a ragged last group in some
    linear (and which layout that means), else ""."""
    from core.export import default_export, ragged_linears, ragged_refusal
    from core.primitives import common_divisor_hint

    widths = linear_in_features(source) if source is not None else {}
    ragged = ragged_linears(method_config, widths)
    if not ragged:
        return ""
    gs = int(method_config.group_size)
    module, width = next(iter(ragged.items()))
    tails = ", ".join(f"{w} % {gs} = {w % gs}" for w in sorted(set(ragged.values())))
    note = f"Last group ragged in {len(ragged)} linears ({tails} columns): "
    default = default_export(method_config, widths)
    if ragged_refusal(default, module, width, gs) is None:
        return note + f"exported as {default} (compressed-tensors and awq need whole groups)"
    hint = common_divisor_hint(set(widths.values()), gs, sep=", ")
    return note + f"no layout for these settings stores that; use group size {hint or -1}"


def quantize_memory(source: Any, method_config: Any, calib: Any) -> dict[str, Any]:
    """The planner's estimate of the peak memory this job needs (CPU engine)."""
    from core import planner

    return planner.quantize_memory(model_spec(source), method_config, calib)


def quantize_memory_text(source: Any, method_config: Any, calib: Any) -> tuple[str, str]:
    """(one line for the Quantize tab, tooltip with each part and its formula)."""
    try:
        est = quantize_memory(source, method_config, calib)
    except ValueError as exc:
        return f"Memory estimate unavailable: {exc}", ""
    peak = float(est["peak_cpu_gib"])
    available = system_ram_gib()[1]
    verdict = "fits in the free RAM" if peak <= available else "MORE than the free RAM"
    line = f"This job needs about {peak:.2f} GiB of RAM at its peak ({verdict}: {available:.1f} GiB free)."
    formulas = est.get("formulas", {})
    tip = "\n".join(f"{k.replace('_', ' ')}: {v:.3f} GiB — {formulas.get(k, '')}".rstrip(" —")
                    for k, v in est.get("parts_gib", {}).items())
    return line, tip


def valid_group_sizes(source: Any, candidates: tuple[int, ...] = (32, 64, 96, 128, 192, 256)) -> list[int]:
    """Group sizes to offer for this model: every candidate narrower than its widest decoder
    linear (a larger one is per-channel everywhere). One that does not divide a linear's width
    leaves a ragged last group there (see `ragged_group_note`)."""
    widths = set(linear_in_features(source).values())
    return [g for g in candidates if not widths or g < max(widths)]


# ---------------------------------------------------------------- evaluation

COMPARE_STAGE = "before-after"  # one StageStarted per model evaluated (2 in all)


def evaluate_before_after(
    *, original: Path, quantized: Path, text: str = "builtin", seq_len: int = 256, windows: int = 8,
    device: str = "auto", sink: Sink = null_sink, cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Worker function: perplexity of the original and of the quantized model on the same
    windows, and the KL divergence of the quantized model's next-token distributions from the
    original's. Loads both models with transformers, so it runs in a child process as the
    quantization does (app.jobproc)."""
    from app.jobproc import run_in_child

    kwargs = {"original": original, "quantized": quantized, "text": text, "seq_len": seq_len, "windows": windows,
              "device": device}
    return run_in_child(evaluate_before_after_here, kwargs, sink=sink, cancel=cancel)


def evaluate_before_after_here(
    *, original: Path, quantized: Path, text: str = "builtin", seq_len: int = 256, windows: int = 8,
    device: str = "auto", sink: Sink = null_sink, cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """`evaluate_before_after` in this process (what its child process runs)."""
    from core.evaluate import evaluate

    # Its own stage name: core.evaluate's windows are stage "evaluate", and the view tells the two
    # passes from the windows inside each by this.
    sink(StageStarted(COMPARE_STAGE, total=2, message=f"original {Path(original).name}"))
    before = evaluate(original, text=text, seq_len=seq_len, windows=windows, device=device, sink=sink, cancel=cancel)
    sink(StageStarted(COMPARE_STAGE, total=2, message=f"quantized {Path(quantized).name}"))
    after = evaluate(quantized, text=text, seq_len=seq_len, windows=windows, reference=original, device=device,
                     sink=sink, cancel=cancel)
    ppl0, ppl1 = float(before["perplexity"]), float(after["perplexity"])
    return {
        "text": text, "seq_len": seq_len, "windows": windows, "tokens": after.get("tokens"),
        "perplexity_before": ppl0, "perplexity_after": ppl1,
        "perplexity_change_pct": (ppl1 / ppl0 - 1.0) * 100.0 if ppl0 else None,
        "kl_divergence": after.get("kl_divergence"),
        "seconds": float(before.get("seconds", 0.0)) + float(after.get("seconds", 0.0)),
        "device": after.get("device", device),
    }


# ---------------------------------------------------------------- inspection

# How exporters store a quantized linear's weight: the tensor name's last part after the
# linear's own name (GPTQ/AWQ `qweight`, compressed-tensors `weight_packed`, int8/fp8 `weight`).
_QUANTIZED_WEIGHT_SUFFIXES = (".qweight", ".weight_packed", ".weight")


def linear_weight_names(source: Any) -> list[str]:
    """`<linear>.weight` of every linear inside the decoder layers, in layer order (the linears a
    method touches). In a quantized folder the stored tensors are packed (`qweight`,
    `weight_packed`); the names are still the logical `.weight` ones, read by `load_linear_weight`."""
    tensors = getattr(source, "tensors", {})
    if not getattr(source, "quantization_config", None):
        names = [n for n, t in tensors.items()
                 if n.endswith(".weight") and ".layers." in f".{n}" and len(t.shape) == 2]
        return sorted(names, key=_layer_sort_key)
    found: set[str] = set()
    for n, t in tensors.items():
        if ".layers." not in f".{n}" or len(t.shape) != 2:
            continue
        for suffix in _QUANTIZED_WEIGHT_SUFFIXES:
            if n.endswith(suffix):
                found.add(n[: -len(suffix)] + ".weight")
                break
    return sorted(found, key=_layer_sort_key)


def load_linear_weight(source: Any, weight_name: str) -> Any:
    """The float weight [out, in] of one linear: as stored in a plain folder, dequantized by the
    folder's own exporter in a quantized one (one linear in memory, no model loaded)."""
    if getattr(source, "quantization_config", None):
        from core.loader import read_quantized_weights

        linear = weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name
        q = read_quantized_weights(source, [linear]).get(linear)
        if q is not None:
            return q.dequantize().reshape(q.shape).float()
    return source.load_tensors([weight_name])[weight_name].float()


_MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _layer_sort_key(name: str) -> tuple[int, int, str]:
    """Decoder layer, then the engine's true-sequential order (q/k/v → o → gate/up → down)."""
    import re

    m = re.search(r"layers\.(\d+)\.", name)
    module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else name
    order = _MODULE_ORDER.index(module) if module in _MODULE_ORDER else len(_MODULE_ORDER)
    return (int(m.group(1)) if m else -1, order, name)


def _weight_summary(w: Any) -> dict[str, float]:
    """Scalar weight statistics from core.outliers (kurtosis, absmax, σ, fraction beyond kσ)."""
    from core.outliers import weight_stats

    stats = weight_stats(w)
    out = {k: float(v) for k, v in stats.items() if isinstance(v, (int, float))}
    out["absmax_over_std"] = out["absmax"] / out["std"] if out.get("std") else 0.0
    return out


def weight_overview(*, source: Any, sink: Sink = null_sink, cancel: CancelToken | None = None) -> list[dict]:
    """Worker function: kurtosis and absmax/σ of every decoder linear, one tensor in memory at
    a time, for the layers × module-types heatmap."""
    from core.events import Progress

    names = linear_weight_names(source)
    out = []
    sink(StageStarted("overview", total=len(names), message="weight statistics"))
    for i, name in enumerate(names):
        if cancel is not None:
            cancel.check()
        w = load_linear_weight(source, name)
        out.append({"name": name[: -len(".weight")], **_weight_summary(w)})
        sink(Progress("overview", i + 1, len(names), name))
    return out


def linear_detail(
    *, source: Any, name: str, calibrate: bool = False, threshold: float = 6.0, alpha: float = 0.5,
    samples: int = 8, seq_len: int = 128, bins: int = 121,
    sink: Sink = null_sink, cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Worker function: everything the inspector draws for one linear — weight histogram,
    per-input-channel and per-output-channel absmax, summary statistics, and with calibration
    the activation per-channel absmax, the channels beyond the LLM.int8 threshold and the
    SmoothQuant scales s_j = max|X_j|^α / max|W_j|^(1−α)."""
    import numpy as np

    weight_name = name if name.endswith(".weight") else f"{name}.weight"
    w = load_linear_weight(source, weight_name)
    if cancel is not None:
        cancel.check()
    lim = float(w.abs().max()) or 1.0
    counts, edges = np.histogram(w.numpy().ravel(), bins=bins, range=(-lim, lim))
    detail: dict[str, Any] = {
        "name": weight_name[: -len(".weight")],
        "shape": list(w.shape),
        "hist_counts": counts,
        "hist_edges": edges,
        "w_in_absmax": w.abs().amax(dim=0).numpy(),
        "w_out_absmax": w.abs().amax(dim=1).numpy(),
        "threshold": threshold,
        "alpha": alpha,
        **_weight_summary(w),
    }
    if calibrate:
        detail.update(activation_detail(source=source, name=detail["name"], w_in_absmax=detail["w_in_absmax"],
                                        threshold=threshold, alpha=alpha, samples=samples, seq_len=seq_len,
                                        sink=sink, cancel=cancel))
    return detail


# Activation absmax per linear for (model folder, samples, seq_len): one calibration pass over
# the whole model serves every linear the user clicks afterwards.
_ACTIVATIONS: dict[tuple[str, int, int], dict[str, Any]] = {}


def activation_absmax(*, path: Path, samples: int, seq_len: int, sink: Sink = null_sink,
                      cancel: CancelToken | None = None) -> dict[str, Any]:
    """Per-input-channel activation max|x| of every linear (streamed layer by layer for a plain
    folder, see core.outliers), cached for the last model. The calibration pass imports
    transformers and runs forwards, so it runs in a job process as a quantization does
    (app.jobproc): in a thread of the GUI process it held the GIL for long stretches."""
    key = (str(path), samples, seq_len)
    if key not in _ACTIVATIONS:
        import torch

        from app.jobproc import run_in_child

        sink(StageStarted("calibrate", message=f"{samples} × {seq_len} tokens through {Path(path).name}"))
        arrays = run_in_child(activation_absmax_here, {"path": Path(path), "samples": samples, "seq_len": seq_len},
                              sink=sink, cancel=cancel)
        _ACTIVATIONS.clear()  # keep one model's statistics, not all of them
        _ACTIVATIONS[key] = {name: torch.from_numpy(a) for name, a in arrays.items()}
    return _ACTIVATIONS[key]


def activation_absmax_here(*, path: Path, samples: int, seq_len: int, sink: Sink = null_sink,
                           cancel: CancelToken | None = None) -> dict[str, Any]:
    """The calibration pass of `activation_absmax` in this process (what its job process runs):
    {linear: float32 numpy array}. Arrays, not tensors, cross the pipe: torch's pickling of a
    tensor between processes goes through shared memory that dies with the sender."""
    from core import outliers
    from core.config import CalibConfig

    stats = outliers.model_activation_absmax(path, CalibConfig(samples=samples, seq_len=seq_len),
                                             sink=sink, cancel=cancel)
    return {name: t.detach().float().numpy() for name, t in stats.items()}


def activation_detail(
    *, source: Any, name: str, w_in_absmax: Any, threshold: float, alpha: float, samples: int, seq_len: int,
    sink: Sink = null_sink, cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Per-input-channel activation absmax of one linear over calibration text, the channels at
    or above the LLM.int8 threshold, and SmoothQuant's per-channel scales."""
    import numpy as np
    import torch

    from core.methods.smoothquant import smoothing_scales

    acts = activation_absmax(path=source.path, samples=samples, seq_len=seq_len, sink=sink, cancel=cancel)
    if name not in acts:
        raise ValueError(f"no activation statistics for {name} (it was not reached by the calibration forward)")
    x = acts[name].float()
    scales = smoothing_scales(x, torch.as_tensor(np.asarray(w_in_absmax), dtype=torch.float32), alpha).numpy()
    order = np.argsort(-scales)
    return {
        "a_absmax": x.numpy(),
        "outlier_channels": [int(i) for i in torch.nonzero(x >= threshold).flatten().tolist()],
        "smooth_scales": scales,
        "smooth_top": [(int(i), float(scales[i])) for i in order[:10]],
    }


# ---------------------------------------------------------------- planning

def _kv_dtypes() -> tuple[str, ...]:
    from core import planner

    return tuple(planner.KV_DTYPES)


KV_DTYPES = _kv_dtypes()
_ENGINE_LABELS = {"transformers": "transformers", "vllm": "vLLM", "llama.cpp": "llama.cpp"}


def engine_profiles() -> list[tuple[str, str]]:
    from core import planner

    return [(name, _ENGINE_LABELS.get(name, name)) for name in planner.ENGINES]


# The planner's ModelSpec for each opened source, so dragging a slider does not re-classify
# every tensor. Keyed by id(); the source is kept alive alongside, so ids are not reused.
_SPECS: dict[int, tuple[Any, Any]] = {}


def model_spec(source: Any) -> Any:
    from core import planner

    hit = _SPECS.get(id(source))
    if hit is not None and hit[0] is source:
        return hit[1]
    target = source.id if hasattr(source, "hf_repo") else source  # catalog entries plan by id
    spec = planner.load_model(target)
    if len(_SPECS) > 16:
        _SPECS.clear()
    _SPECS[id(source)] = (source, spec)
    return spec


def plan_rows(source: Any, gpu: GpuOption, *, num_gpus: int, context: int, batch: int, kv_dtype: str,
              engine: str) -> list[dict[str, Any]]:
    """One dict per format with the keys of `quantscope plan --json` (DESIGN §3), formulas included."""
    from core import planner

    plan = planner.plan(model_spec(source), gpu.spec, context=context, batch=batch, kv_dtype=kv_dtype,
                        engine=engine, num_gpus=num_gpus)
    rows = [row.to_json() for row in plan.formats]
    logical = logical_params(source)
    if logical:
        for row in rows:
            _per_logical_weight(row, logical)
    return rows


def logical_params(source: Any) -> int | None:
    """Parameters of the model a quantized folder was made from, counted from its config (the
    stored tensors are packed: 8 4-bit values per int32, so counting them says 3× too few);
    None for a plain folder or a catalog entry, whose stored count is already right."""
    if not getattr(source, "quantization_config", None):
        return None
    from core.param_count import from_config

    config = {k: v for k, v in dict(getattr(source, "config", {}) or {}).items() if k != "quantization_config"}
    try:
        return int(from_config(config).total_params) or None
    except (ValueError, KeyError, TypeError):
        return None


def _per_logical_weight(row: dict[str, Any], params: int) -> None:
    """Bits per weight of a quantized folder over its real parameter count."""
    stored = row.get("weights_bytes")
    if not stored:
        return
    bpw = 8.0 * float(stored) / params
    row["bits_per_weight"] = bpw
    row["effective_bits_per_weight"] = bpw
    formulas = dict(row.get("formulas") or {})
    formulas["bits_per_weight"] = (f"{int(stored):,} stored bytes × 8 / {params:,} parameters (from config.json) "
                                   f"= {bpw:.3f} bits per weight, scales, zeros and 16-bit parts included")
    row["formulas"] = formulas


def offload_split(source: Any, gpu: GpuOption, fmt: str, gpu_layers: int, *, num_gpus: int, context: int,
                  batch: int, kv_dtype: str, engine: str) -> dict[str, Any]:
    """The same row with a chosen number of decoder layers on the GPU (the offload slider)."""
    from core import planner

    row = planner.plan_offload(model_spec(source), gpu.spec, format=fmt, gpu_layers=gpu_layers, context=context,
                               batch=batch, kv_dtype=kv_dtype, engine=engine, num_gpus=num_gpus)
    return row.to_json()


# ---------------------------------------------------------------- plan → quantize

def plan_format_settings(fmt_name: str) -> dict[str, Any] | None:
    """Quantize-tab settings that produce a Plan row's format, or None when the tab cannot write
    it (16/32-bit rows, GGUF files, microscaling FP4/FP6). Weight-only integer rows use GPTQ, the
    calibrated method that measures best at the same size; W8A8 int8 uses SmoothQuant."""
    from core.formats import Kind, get_format

    try:
        fmt = get_format(fmt_name)
    except (KeyError, ValueError):
        return None
    if fmt.kind is Kind.INT and fmt.weight_only:
        return {"method": "gptq", "bits": int(fmt.bits), "group_size": fmt.group_size,
                "sym": fmt.zero_bits == 0, "label": fmt.label}
    if fmt.kind is Kind.INT:
        return {"method": "smoothquant", "bits": int(fmt.bits), "label": fmt.label}
    if fmt.kind is Kind.FP8:
        return {"method": "fp8", "label": fmt.label}
    if fmt.kind is Kind.NF:
        return {"method": "nf4", "double_quant": fmt.name.endswith("_dq"), "blocksize": fmt.group_size,
                "label": fmt.label}
    return None
