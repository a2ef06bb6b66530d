"""SmoothQuant W8A8 (Xiao et al., 2022): migrate activation outliers into the weights with
s_j = max|X_j|^α / max|W_j|^(1−α), folded into the tensor's producer, then int8 per-channel
symmetric weights and int8 activations.

Smoothed inputs: q/k/v (scale folded into input_layernorm), gate/up (post_attention_layernorm),
down_proj (folded into up_proj's rows — act(gate)·up is linear in up) and o_proj (folded into
v_proj's rows; with GQA one scale per v channel, taken from the max over the query heads that read
it). Linears whose producer cannot absorb a scale stay unsmoothed and are still W8A8.

Activations: "dynamic" quantizes each token with its own absmax scale at inference; "static" uses
one per-tensor scale per linear, max|x| of the smoothed input over the calibration set / 127.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from core.config import Granularity, SmoothQuantConfig
from core.events import Log, check_cancel
from core.methods.base import LayerContext, register
from core.methods.capture import InputGroup, forward_with_hooks, layer_groups
from core.methods.folding import fold, producer_of
from core.methods.rtn import source_dtype
from core.primitives import quantize_to_intweight
from core.qtensors import ActQuant, IntWeight

log = logging.getLogger(__name__)

# Keeps s finite for channels that never fire or weight columns that are all zero.
_EPS = 1e-5


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^α / max|W_j|^(1−α) for input channel j ([in] each, float32)."""
    a = act_absmax.float().clamp(min=_EPS)
    w = weight_absmax.float().clamp(min=_EPS)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=_EPS)


def group_absmax(ctx: LayerContext, groups: list[InputGroup]) -> list[torch.Tensor]:
    """Per-input-channel max|x| [in] of each group over all calibration batches (one pass)."""
    stats: list[torch.Tensor | None] = [None] * len(groups)
    targets = {ctx.module.get_submodule(g.readers[0]): i for i, g in enumerate(groups)}

    def hook(module: nn.Module, args: tuple) -> None:
        i = targets[module]
        x = args[0].detach()
        m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        stats[i] = m if stats[i] is None else torch.maximum(stats[i], m)

    forward_with_hooks(ctx, [(m, hook) for m in targets])
    out = []
    for g, st in zip(groups, stats):
        if st is None:
            raise ValueError(f"layer {ctx.prefix}: the forward never reached {g.readers[0]}")
        out.append(st)
    return out


def smooth_layer(ctx: LayerContext, alpha: float) -> tuple[list[InputGroup], list[torch.Tensor]]:
    """Fold smoothing scales into the layer in place (float function unchanged). Returns the
    groups and each group's input absmax after smoothing."""
    if not ctx.inputs or ctx.forward is None:
        raise ValueError("SmoothQuant needs calibration inputs; pass --calib builtin or a text file")
    groups = layer_groups(ctx)
    absmax = group_absmax(ctx, groups)
    metrics = ctx.extra.setdefault("metrics", {})
    for i, g in enumerate(groups):
        if not any(n in ctx.linears for n in g.readers):
            continue
        producer = producer_of(ctx.module, g)
        if producer is None:
            msg = f"SmoothQuant {ctx.prefix}.{'+'.join(g.readers)}: no norm or linear can absorb a scale; left unsmoothed"
            log.info(msg)
            ctx.sink(Log("info", msg))
            continue
        w_absmax = torch.stack([ctx.module.get_submodule(n).weight.detach().abs().amax(dim=0).float()
                                for n in g.readers]).amax(dim=0)
        s = smoothing_scales(producer.to_producer(absmax[i], "max"), producer.to_producer(w_absmax, "max"), alpha)
        s_in = fold(ctx.module, g, producer, s)
        before = float(absmax[i].max())
        absmax[i] = absmax[i] / s_in
        for n in g.names:
            metrics.setdefault(n, {}).update({"act_absmax_before": before, "act_absmax_after": float(absmax[i].max())})
    return groups, absmax


@register(SmoothQuantConfig)
class SmoothQuantQuantizer:
    needs_calibration = True

    def __init__(self, config: SmoothQuantConfig) -> None:
        self.config = config

    def quantize_layer(self, ctx: LayerContext) -> dict[str, IntWeight]:
        groups, absmax = smooth_layer(ctx, self.config.alpha)
        out: dict[str, IntWeight] = {}
        for g, amax in zip(groups, absmax):
            for n in g.names:
                check_cancel(ctx.cancel)
                lin = ctx.linears[n]
                q = quantize_to_intweight(lin.weight.detach().float(), 8, True, Granularity.CHANNEL, -1,
                                          dtype=source_dtype(ctx, lin.weight), name=f"{ctx.prefix}.{n}")
                if self.config.act_scheme == "static":
                    scale = torch.tensor(max(float(amax.max()), _EPS) / 127.0, dtype=torch.float32)
                    q.act = ActQuant(bits=8, scheme="static", scale=scale)
                else:
                    q.act = ActQuant(bits=8, scheme="dynamic")
                out[n] = q
        return out
