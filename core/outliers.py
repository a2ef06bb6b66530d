"""Weight and activation outlier statistics per linear layer and channel, for `quantscope inspect`
and the GUI's Inspect tab.

Weights: per-output-channel and per-input-channel max|w|, Pearson kurtosis (3 for a Gaussian;
heavy tails push it up) and the fraction of weights beyond k·σ of the layer's mean. Activations
(with calibration text): per-input-channel max|x| over the calibration set, the channels at or
above the LLM.int8() threshold, and the SmoothQuant scales s_j = max|X_j|^α / max|W_j|^(1−α) those
statistics imply.

The model is loaded whole with `core.loader.load_model` (plain or Quantscope-quantized folder;
quantized weights are inspected dequantized), which suits models that fit in RAM; activation
statistics are reduced inside forward hooks, so only one batch of activations is alive at a time.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.config import CalibConfig
from core.events import CancelToken, Progress, Sink, StageStarted, check_cancel, null_sink
from core.methods.smoothquant import smoothing_scales

# Longest per-channel vector put in the JSON; longer ones (e.g. lm_head's vocabulary rows) are
# max-pooled so peaks stay visible in a plot.
MAX_VECTOR = 16384

SIGMAS = (3, 6)


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
    w64 = w.detach().to(torch.float64)
    mean = float(w64.mean())
    centred = w64 - mean
    var = float(centred.square().mean())
    std = math.sqrt(var)
    kurt = float(centred.pow(4).mean()) / (var * var) if var > 0 else 0.0
    out: dict[str, Any] = {
        "absmax": _compact(float(w64.abs().max())),
        "mean": _compact(mean),
        "std": _compact(std),
        "kurtosis": _compact(kurt),
    }
    for k in sigmas:
        out[f"frac_beyond_{k}sigma"] = _compact(float((centred.abs() > k * std).double().mean()) if std > 0 else 0.0)
    absw = w.detach().float().abs()
    out["out_channel_absmax"] = channel_vector(absw.amax(dim=1))
    out["in_channel_absmax"] = channel_vector(absw.amax(dim=0))
    return out


def activation_stats(act_absmax: torch.Tensor, w: torch.Tensor, threshold: float, alpha: float) -> dict[str, Any]:
    """Statistics of one linear's input channels given their max|x| [in] over the calibration set."""
    act = act_absmax.float()
    above = torch.nonzero(act >= threshold).flatten().tolist()
    scales = smoothing_scales(act, w.detach().float().abs().amax(dim=0), alpha)
    return {
        "absmax": _compact(float(act.max())),
        "channel_absmax": channel_vector(act),
        "outlier_channels": above,
        "n_outlier_channels": len(above),
        "smoothquant_scales": channel_vector(scales),
    }


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    """Linear layers, plain or `core.qlinear.QuantLinear` (whose `weight` is the dequantized one)."""
    from core.qlinear import QuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}


def activation_absmax(model: nn.Module, batches: torch.Tensor, *, sink: Sink = null_sink,
                      cancel: CancelToken | None = None) -> dict[str, torch.Tensor]:
    """Per-input-channel max|x| of every linear over the token batches [samples, seq_len], one
    sample per forward."""
    stats: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(name: str):
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            stats[name] = m if name not in stats else torch.maximum(stats[name], m)

        return hook

    try:
        for n, m in _linears(model).items():
            handles.append(m.register_forward_pre_hook(hook_for(n)))
        sink(StageStarted("activations", total=batches.shape[0]))
        with torch.no_grad():
            for i, row in enumerate(batches):
                check_cancel(cancel)
                model(input_ids=row[None])
                sink(Progress("activations", i + 1, batches.shape[0]))
    finally:
        for h in handles:
            h.remove()
    return stats


def inspect_model(
    path: str | os.PathLike,
    calib: CalibConfig | None = None,
    *,
    threshold: float = 6.0,
    alpha: float = 0.5,
    sink: Sink = null_sink,
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Outlier report for a model folder (JSON-ready dict). `calib` adds activation statistics."""
    from core.loader import load_model, quantized_layers

    if threshold <= 0:
        raise ValueError(f"threshold must be positive (6.0 is the LLM.int8 default), got {threshold}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    sink(StageStarted("load", message=str(path)))
    model, tokenizer = load_model(path, with_tokenizer=calib is not None)
    formats = quantized_layers(model)
    acts: dict[str, torch.Tensor] = {}
    if calib is not None:
        from core.calibration import calibration_batches

        acts = activation_absmax(model, calibration_batches(tokenizer, calib), sink=sink, cancel=cancel)
    linears = _linears(model)
    sink(StageStarted("weights", total=len(linears)))
    layers = []
    for i, (name, mod) in enumerate(linears.items()):
        check_cancel(cancel)
        w = mod.weight.detach()
        entry: dict[str, Any] = {"name": name, "shape": list(w.shape), "format": formats.get(name, "float"),
                                 "weight": weight_stats(w)}
        if name in acts:
            entry["activation"] = activation_stats(acts[name], w, threshold, alpha)
        layers.append(entry)
        sink(Progress("weights", i + 1, len(linears), name))
    report: dict[str, Any] = {
        "model": str(Path(path)),
        "quantized": bool(formats),
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
