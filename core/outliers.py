"""Weight and activation outlier statistics per linear layer and channel, for `quantscope inspect`
and the GUI's Inspect tab.

Weights: per-output-channel and per-input-channel max|w|, Pearson kurtosis (3 for a Gaussian;
heavy tails push it up) and the fraction of weights beyond k·σ of the layer's mean. Activations
(with calibration text): per-input-channel max|x| over the calibration set, the channels at or
above the LLM.int8() threshold, and the SmoothQuant scales s_j = max|X_j|^α / max|W_j|^(1−α) those
statistics imply.

A plain (unquantized) model folder is streamed, so models larger than RAM can be inspected: the
weight statistics are computed one memory-mapped tensor at a time (`ModelSource.load_tensors`, in
float64 row chunks), and the activation statistics layer by layer as the engine's calibrated path
runs: the calibration tokens are embedded, then each decoder layer alone is materialised (float32)
on a meta-device model, every calibration batch goes through it with forward pre-hooks on its
linears, its outputs become the next layer's inputs and the layer is freed; last, the final norm
gives lm_head's inputs (the logits are never computed). Peak memory is about one decoder layer
plus the calibration hidden states (samples × seq_len × hidden × 4 B) and the float32 embedding
used to embed them, whatever the number of layers.

Quantscope-quantized folders (a fraction of the source's size; their weights are inspected
dequantized), GGUF files and architectures the engine does not stream are loaded whole with
`core.loader.load_model` and run full forwards with the same hooks, one sample at a time. Both
paths give the same report.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from core.config import CalibConfig
from core.events import CancelToken, Progress, Sink, StageStarted, check_cancel, null_sink
from core.methods.smoothquant import smoothing_scales
from core.model_io import ModelSource, open_model

# Longest per-channel vector put in the JSON; longer ones (e.g. lm_head's vocabulary rows) are
# max-pooled so peaks stay visible in a plot.
MAX_VECTOR = 16384

SIGMAS = (3, 6)

# Elements per float64 chunk (32 MB) in `weight_stats`: whole float64 copies of lm_head (centred,
# squared) would cost several times the largest decoder layer. Much smaller chunks are slow: each
# torch call costs a thread hand-off, expensive on a busy 2-core machine.
_STATS_CHUNK = 1 << 22

_EMBED = "model.embed_tokens.weight"


def _compact(x: float) -> float:
    return float(f"{x:.5g}") if math.isfinite(x) else x


def channel_vector(v: torch.Tensor, limit: int = MAX_VECTOR) -> dict[str, Any]:
    """A per-channel vector as JSON: values (max-pooled to at most `limit`) and the pooling stride."""
    v = v.detach().float().flatten()
    stride = max(1, math.ceil(v.numel() / limit))
    if stride > 1:
        pad = stride * math.ceil(v.numel() / stride) - v.numel()
        v = torch.cat([v, v.new_full((pad,), -math.inf)]).view(-1, stride).amax(dim=1)
    return {"values": _compact_all(v), "stride": stride}


def _compact_all(v: torch.Tensor) -> list[float]:
    """`_compact` for a whole vector at once. A per-element Python loop over every linear's
    channels held the GIL long enough to stall the GUI's event loop while a job ran."""
    a = v.double().numpy()
    finite = np.isfinite(a) & (a != 0)
    digits = np.zeros(a.shape, dtype=np.int64)
    digits[finite] = 4 - np.floor(np.log10(np.abs(a[finite]))).astype(np.int64)
    out = a.copy()
    for d in np.unique(digits[finite]):  # a handful of magnitudes, not one per element
        sel = finite & (digits == d)
        out[sel] = np.round(a[sel], int(d))
    return out.tolist()


def weight_stats(w: torch.Tensor, sigmas: tuple[int, ...] = SIGMAS) -> dict[str, Any]:
    """Statistics of one weight [out, in] (any float dtype; computed in float64)."""
    return _weight_stats(w, sigmas)[0]


def _weight_stats(w: torch.Tensor, sigmas: tuple[int, ...] = SIGMAS) -> tuple[dict[str, Any], torch.Tensor]:
    """(`weight_stats`, per-input-channel max|w| [in] in float32), in row chunks of about
    _STATS_CHUNK elements: a pass for the sum and the channel maxima, a float64 pass for the
    central moments, one for the counts beyond kσ."""
    w = w.detach()
    if w.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        w = w.float()  # e.g. FP8, which has no sum kernel
    n = w.numel()
    chunks = w.split(max(1, _STATS_CHUNK // max(1, w.shape[-1])))
    dev = w.device
    total = torch.zeros((), dtype=torch.float64, device=dev)
    absmax = torch.zeros((), dtype=torch.float64, device=dev)
    out_max: list[torch.Tensor] = []
    in_max = torch.zeros(w.shape[-1], device=dev)
    for c in chunks:
        total += c.sum(dtype=torch.float64)
        # float32 (or float64) |w|: exact, so its maxima are those of the float64 values.
        a = c.abs() if c.dtype in (torch.float32, torch.float64) else c.float().abs_()
        rows = a.amax(dim=1)
        absmax = torch.maximum(absmax, rows.max().double())
        out_max.append(rows.float())
        in_max = torch.maximum(in_max, a.amax(dim=0).float())
        del a
    mean = float(total) / n
    m2 = torch.zeros((), dtype=torch.float64, device=dev)
    m4 = torch.zeros((), dtype=torch.float64, device=dev)
    for c in chunks:
        d = c.to(torch.float64, copy=True).sub_(mean).square_()
        m2 += d.sum()
        m4 += d.square_().sum()
        del d
    var = float(m2) / n
    std = math.sqrt(var)
    kurt = float(m4) / n / (var * var) if var > 0 else 0.0
    out: dict[str, Any] = {
        "absmax": _compact(float(absmax)),
        "mean": _compact(mean),
        "std": _compact(std),
        "kurtosis": _compact(kurt),
    }
    beyond = {k: 0 for k in sigmas}
    if std > 0:
        for c in chunks:
            d = c.to(torch.float64, copy=True).sub_(mean).abs_()
            for k in sigmas:
                beyond[k] += int(torch.count_nonzero(d > k * std))
            del d
    for k in sigmas:
        out[f"frac_beyond_{k}sigma"] = _compact(beyond[k] / n)
    out["out_channel_absmax"] = channel_vector(torch.cat(out_max).cpu())
    in_max = in_max.cpu()
    out["in_channel_absmax"] = channel_vector(in_max)
    return out, in_max


def activation_stats(act_absmax: torch.Tensor, w: torch.Tensor, threshold: float, alpha: float) -> dict[str, Any]:
    """Statistics of one linear's input channels given their max|x| [in] over the calibration set."""
    return _activation_stats(act_absmax, w.detach().float().abs().amax(dim=0), threshold, alpha)


def _activation_stats(act_absmax: torch.Tensor, w_in_absmax: torch.Tensor, threshold: float,
                      alpha: float) -> dict[str, Any]:
    act = act_absmax.float()
    above = torch.nonzero(act >= threshold).flatten().tolist()
    scales = smoothing_scales(act, w_in_absmax, alpha)
    return {
        "absmax": _compact(float(act.max())),
        "channel_absmax": channel_vector(act),
        "outlier_channels": above,
        "n_outlier_channels": len(above),
        "smoothquant_scales": channel_vector(scales),
    }


def _linear_entry(name: str, w: torch.Tensor, act: torch.Tensor | None, fmt: str, threshold: float,
                  alpha: float) -> dict[str, Any]:
    """One linear's item of the report's `layers`."""
    stats, in_absmax = _weight_stats(w)
    entry: dict[str, Any] = {"name": name, "shape": list(w.shape), "format": fmt, "weight": stats}
    if act is not None:
        entry["activation"] = _activation_stats(act, in_absmax, threshold, alpha)
    return entry


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    """Linear layers, plain or `core.qlinear.QuantLinear` (whose `weight` is the dequantized one)."""
    from core.qlinear import QuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}


class _InputAbsmax:
    """Forward pre-hooks on linears ({name: module}) that keep each one's per-input-channel max|x|
    in `stats` while the context is open."""

    def __init__(self, linears: dict[str, nn.Module], stats: dict[str, torch.Tensor]) -> None:
        self._linears = linears
        self._stats = stats
        self._handles: list[Any] = []

    def __enter__(self) -> _InputAbsmax:
        for name, m in self._linears.items():
            self._handles.append(m.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Any:
        def hook(_m: nn.Module, args: tuple) -> None:
            _record_absmax(self._stats, name, args[0])

        return hook


def _record_absmax(stats: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> None:
    """stats[name] = max(stats[name], per-channel max|x| over all but the last dimension of x)."""
    x = x.detach()
    m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
    stats[name] = m if name not in stats else torch.maximum(stats[name], m)


def activation_absmax(model: nn.Module, batches: torch.Tensor, *, sink: Sink = null_sink,
                      cancel: CancelToken | None = None) -> dict[str, torch.Tensor]:
    """Per-input-channel max|x| (on the host) of every linear of a whole loaded model over the
    token batches [samples, seq_len], one sample per forward on the model's device."""
    stats: dict[str, torch.Tensor] = {}
    device = next(model.parameters()).device
    batches = batches.to(device)
    with _InputAbsmax(_linears(model), stats):
        sink(StageStarted("activations", total=batches.shape[0]))
        with torch.no_grad():
            for i, row in enumerate(batches):
                check_cancel(cancel)
                model(input_ids=row[None])
                sink(Progress("activations", i + 1, batches.shape[0]))
    return {k: v.cpu() for k, v in stats.items()}


def streamable_source(path: str | os.PathLike) -> ModelSource | None:
    """The opened folder when `path` is a plain (unquantized) model folder of an architecture the
    engine streams layer by layer; None for a Quantscope-quantized folder, a file (GGUF) or another
    architecture (those take the whole-model path). Raises ValueError for a folder without
    weights or with broken headers."""
    if not Path(path).expanduser().is_dir():
        return None
    src = open_model(path, check_architecture=False)
    src.require_weights()
    if src.quantization_config is not None or not src.supported or src.num_layers <= 0:
        return None
    return src


def stream_activation_absmax(src: ModelSource, batches: torch.Tensor, *, sink: Sink = null_sink,
                             cancel: CancelToken | None = None) -> dict[str, torch.Tensor]:
    """`activation_absmax` for a plain model folder (see `streamable_source`), one decoder layer
    resident at a time (see the module docstring). Same keys and values, to float tolerance."""
    from core.engine import meta_model

    model, hf_config = meta_model(src)
    return _stream_layers(src, model, hf_config, batches, sink=sink, cancel=cancel)


def _stream_layers(
    src: ModelSource, model: nn.Module, hf_config: Any, batches: torch.Tensor, *, sink: Sink,
    cancel: CancelToken | None,
    on_layer: Callable[[dict[str, nn.Module], dict[str, torch.Tensor]], None] | None = None,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Calibration batches through `model` (the meta model of `core.engine.meta_model(src)`) layer
    by layer; returns {linear: per-input-channel max|x|}. `on_layer({name: linear}, statistics so
    far)` runs while a decoder layer's float32 weights are resident, once its linears' statistics
    are complete. The layer is freed afterwards, also on cancellation or error. The layers run on
    `device` (default: the CPU) with the hidden states kept there; the statistics returned are on
    the host."""
    from core.engine import embed_calibration, materialise, release_freed_memory

    if batches.dim() != 2 or batches.numel() == 0:
        raise ValueError("calibration produced no tokens; use a longer text")
    calib = embed_calibration(src, batches, model, hf_config, device=device)
    layers = model.model.layers
    stats: dict[str, torch.Tensor] = {}
    total = len(layers) + 1
    sink(StageStarted("activations", total=total, message=f"{len(layers)} decoder layers, one at a time"))
    for i, layer in enumerate(layers):
        check_cancel(cancel)
        prefix = src.layer_prefix(i)
        try:
            materialise(layer, prefix, src.load_tensors(src.layer_tensor_names(i)), src, device=device)
            linears = {f"{prefix}{n}": m for n, m in _linears(layer).items()}
            forward = calib.forward_fn(layer)
            with _InputAbsmax(linears, stats):
                for j in range(len(calib.hidden)):
                    check_cancel(cancel)
                    calib.hidden[j] = forward(calib.hidden[j])  # each input batch is freed at once
            if on_layer is not None:
                on_layer(linears, stats)
        finally:
            layer.to("meta")
            release_freed_memory()
        sink(Progress("activations", i + 1, total, f"layer {i + 1}/{len(layers)}"))
    check_cancel(cancel)
    norm = model.model.norm
    materialise(norm, "model.norm.", src.load_tensors([n for n in src.non_layer_tensor_names()
                                                       if n.startswith("model.norm.")]), src, device=device)
    try:
        with torch.no_grad():
            for h in calib.hidden:
                check_cancel(cancel)
                _record_absmax(stats, "lm_head", norm(h))  # lm_head's input; no logits needed
    finally:
        norm.to("meta")
    sink(Progress("activations", total, total, "final norm → lm_head"))
    return {k: v.cpu() for k, v in stats.items()}


def model_activation_absmax(path: str | os.PathLike, calib: CalibConfig, *, sink: Sink = null_sink,
                            cancel: CancelToken | None = None) -> dict[str, torch.Tensor]:
    """{linear: per-input-channel max|x|} over `calib`'s batches for any model folder: streamed
    layer by layer for a plain folder, whole-model forwards otherwise (see the module docstring)."""
    from core.calibration import calibration_batches

    src = streamable_source(path)
    if src is not None:
        from core.loader import load_tokenizer

        batches = calibration_batches(load_tokenizer(src.path), calib)
        return stream_activation_absmax(src, batches, sink=sink, cancel=cancel)
    from core.loader import load_model

    model, tokenizer = load_model(path)
    return activation_absmax(model, calibration_batches(tokenizer, calib), sink=sink, cancel=cancel)


def _inspect_streamed(src: ModelSource, calib: CalibConfig | None, threshold: float, alpha: float,
                      sink: Sink, cancel: CancelToken | None,
                      device: torch.device | None = None) -> list[dict[str, Any]]:
    """The report's `layers` for a plain folder, streamed: a decoder layer's linears while the
    calibration pass holds the layer, the rest (all of them without calibration) one tensor at a
    time from the memory-mapped files."""
    from core.engine import meta_model

    model, hf_config = meta_model(src)
    names = list(_linears(model))
    entries: dict[str, dict[str, Any]] = {}
    acts: dict[str, torch.Tensor] = {}
    if calib is not None:
        from core.calibration import calibration_batches
        from core.loader import load_tokenizer

        def on_layer(linears: dict[str, nn.Module], stats: dict[str, torch.Tensor]) -> None:
            for name, m in linears.items():
                check_cancel(cancel)
                # Weight statistics on the host whatever the device: float64 sums in one order, so
                # the report does not depend on where the activations were collected.
                act = stats.get(name)
                entries[name] = _linear_entry(name, m.weight.detach().to("cpu"), None if act is None else act.cpu(),
                                              "float", threshold, alpha)

        batches = calibration_batches(load_tokenizer(src.path), calib)
        acts = _stream_layers(src, model, hf_config, batches, sink=sink, cancel=cancel, on_layer=on_layer,
                              device=device)
    rest = [n for n in names if n not in entries]
    sink(StageStarted("weights", total=len(rest)))
    for i, name in enumerate(rest):
        check_cancel(cancel)
        w = _stored_weight(src, model, name)
        entries[name] = _linear_entry(name, w, acts.get(name), "float", threshold, alpha)
        del w
        sink(Progress("weights", i + 1, len(rest), name))
    return [entries[n] for n in names]


def _stored_weight(src: ModelSource, model: nn.Module, name: str) -> torch.Tensor:
    """Linear `name`'s weight as stored (lm_head: the embedding when the two are tied)."""
    key = f"{name}.weight"
    if name == "lm_head" and model.lm_head.weight is model.model.embed_tokens.weight:
        key = _EMBED
    if key not in src.tensors:
        raise ValueError(f"tensor {key} is missing from {src.path}; the checkpoint is incomplete, "
                         "download all of its files")
    return src.load_tensors([key])[key]


def _inspect_loaded(path: str | os.PathLike, calib: CalibConfig | None, threshold: float, alpha: float,
                    sink: Sink, cancel: CancelToken | None,
                    device: torch.device | None = None) -> tuple[list[dict[str, Any]], bool]:
    """(the report's `layers`, whether the model is quantized) from the whole model loaded."""
    from core.loader import load_model, quantized_layers

    model, tokenizer = load_model(path, with_tokenizer=calib is not None)
    formats = quantized_layers(model)
    acts: dict[str, torch.Tensor] = {}
    if calib is not None:
        from core.calibration import calibration_batches

        if device is not None:
            model.to(device)
        acts = activation_absmax(model, calibration_batches(tokenizer, calib), sink=sink, cancel=cancel)
        model.to("cpu")  # the weight statistics below read the (dequantized) weights on the host
    linears = _linears(model)
    sink(StageStarted("weights", total=len(linears)))
    layers = []
    for i, (name, mod) in enumerate(linears.items()):
        check_cancel(cancel)
        layers.append(_linear_entry(name, mod.weight.detach(), acts.get(name), formats.get(name, "float"),
                                    threshold, alpha))
        sink(Progress("weights", i + 1, len(linears), name))
    return layers, bool(formats)


def inspect_model(
    path: str | os.PathLike,
    calib: CalibConfig | None = None,
    *,
    threshold: float = 6.0,
    alpha: float = 0.5,
    sink: Sink = null_sink,
    cancel: CancelToken | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Outlier report for a model folder (JSON-ready dict). `calib` adds activation statistics,
    computed on `device` ("cpu", "cuda", "cuda:N" or "auto", see core.devices.resolve_device).
    A plain folder is streamed one decoder layer / tensor at a time; a Quantscope-quantized folder
    (or a GGUF file) is loaded whole and inspected dequantized (module docstring)."""
    if threshold <= 0:
        raise ValueError(f"threshold must be positive (6.0 is the LLM.int8 default), got {threshold}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    src = streamable_source(path)  # headers only; opened first so a broken folder is its one error line
    from core.devices import resolve_device

    dev = resolve_device(device).device
    sink(StageStarted("load", message=str(path)))
    if src is not None:
        layers, quantized = _inspect_streamed(src, calib, threshold, alpha, sink, cancel, dev), False
    else:
        layers, quantized = _inspect_loaded(path, calib, threshold, alpha, sink, cancel, dev)
    report: dict[str, Any] = {
        "model": str(Path(path)),
        "quantized": quantized,
        "threshold": threshold,
        "alpha": alpha,
        "sigmas": list(SIGMAS),
        "calibration": None if calib is None else {"source": calib.source, "samples": calib.samples,
                                                    "seq_len": calib.seq_len},
        "layers": layers,
    }
    worst = max(layers, key=lambda e: e["weight"]["kurtosis"], default=None)
    report["summary"] = {
        "linears": len(layers),
        "max_weight_kurtosis": worst["weight"]["kurtosis"] if worst else None,
        "max_weight_kurtosis_layer": worst["name"] if worst else None,
        "outlier_channels_total": sum(e.get("activation", {}).get("n_outlier_channels", 0) for e in layers),
    }
    return report
