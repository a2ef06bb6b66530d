"""SmoothQuant W8A8 (Xiao et al., 2022): migrate activation outliers into the weights with
s_j = max|X_j|^α / max|W_j|^(1−α), folded into the tensor's producer, then int8 per-channel
symmetric weights and int8 activations.

Smoothed inputs: q/k/v (scale folded into input_layernorm), gate/up (post_attention_layernorm),
down_proj (folded into up_proj's rows — act(gate)·up is linear in up) and o_proj (folded into
v_proj's rows; with GQA one scale per v channel, taken from the max over the query heads that read
it). Linears whose producer cannot absorb a scale stay unsmoothed and are still W8A8.

Activations: "dynamic" quantizes each token with its own absmax scale at inference; "static" uses
one per-tensor scale per linear, max|x| of the smoothed input over the calibration set / 127.

α: a fixed number for every layer, or "auto": for each smoothing group on its own, the α of
ALPHA_GRID minimising the W8A8 output error of the group's quantized readers,
Σ_readers ‖X Wᵀ − Q_a(X/s) Q_w(W·s)ᵀ‖², with the job's activation scheme (the static scale from
the whole calibration set's absmax, as the quantizer sets it) on SEARCH_TOKENS calibration tokens
sampled in the same pass that collects the absmax.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from core.config import Granularity, SmoothQuantConfig
from core.events import CancelToken, Log, check_cancel
from core.methods.base import LayerContext, register
from core.methods.capture import InputGroup, TokenSample, forward_with_hooks, layer_groups
from core.methods.folding import Producer, fold, producer_of
from core.methods.rtn import source_dtype
from core.primitives import quantize_to_intweight
from core.qtensors import ActQuant, IntWeight

log = logging.getLogger(__name__)

# Keeps s finite for channels that never fire or weight columns that are all zero.
_EPS = 1e-5

# α candidates of the "auto" search, and the calibration tokens per layer it scores them on (as
# AWQ's search: enough for a stable ranking, cheap enough for 21 W8A8 evaluations of every linear).
ALPHA_GRID = tuple(i / 20 for i in range(21))
SEARCH_TOKENS = 2048


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^α / max|W_j|^(1−α) for input channel j ([in] each, float32)."""
    a = act_absmax.float().clamp(min=_EPS)
    w = weight_absmax.float().clamp(min=_EPS)
    return (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=_EPS)


def group_absmax(ctx: LayerContext, groups: list[InputGroup],
                 sample_tokens: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Per-input-channel max|x| [in] of each group over all calibration batches and, with
    `sample_tokens`, each group's inputs [≈sample_tokens, in] (float32) at the same random token
    positions (else None), in one pass."""
    stats: list[torch.Tensor | None] = [None] * len(groups)
    rows: list[list[torch.Tensor]] = [[] for _ in groups]
    targets = {ctx.module.get_submodule(g.readers[0]): i for i, g in enumerate(groups)}
    sampler = TokenSample(ctx, sample_tokens) if sample_tokens > 0 else None

    def hook(module: nn.Module, args: tuple) -> None:
        i = targets[module]
        x = args[0].detach()
        x = x.reshape(-1, x.shape[-1])
        m = x.abs().amax(dim=0).float()
        stats[i] = m if stats[i] is None else torch.maximum(stats[i], m)
        if sampler is not None:
            rows[i].append(sampler.take(x).float())

    forward_with_hooks(ctx, [(m, hook) for m in targets], before_batch=sampler.before_batch if sampler else None)
    out = []
    for g, st in zip(groups, stats):
        if st is None:
            raise ValueError(f"layer {ctx.prefix}: the forward never reached {g.readers[0]}")
        out.append(st)
    return out, [torch.cat(r) if r else None for r in rows]


def act_quant(scheme: str, absmax: torch.Tensor) -> ActQuant:
    """The int8 activation quantizer of a linear whose (smoothed) input has per-channel max|x|
    `absmax` over the calibration set: per-token for "dynamic", max|x| / 127 for "static"."""
    if scheme == "static":
        return ActQuant(bits=8, scheme="static", scale=torch.tensor(max(float(absmax.max()), _EPS) / 127.0,
                                                                     dtype=torch.float32, device=absmax.device))
    return ActQuant(bits=8, scheme="dynamic")


def int8_weight(w: torch.Tensor, **kw) -> IntWeight:
    """Symmetric int8, one scale per output channel (row), of w float [out, in]."""
    return quantize_to_intweight(w, 8, True, Granularity.CHANNEL, -1, **kw)


def alpha_errors(x: torch.Tensor, weight: torch.Tensor, act_absmax: torch.Tensor, weight_absmax: torch.Tensor,
                 producer: Producer, act_scheme: str, grid: tuple[float, ...] = ALPHA_GRID,
                 cancel: CancelToken | None = None) -> list[float]:
    """Σ‖X Wᵀ − Q_a(X/s) Q_w(W·s)ᵀ‖² for each α of `grid`, s = smoothing_scales(α) on the producer's
    channels mapped to the readers' inputs.

    x: [tokens, in] float32 inputs of the group before smoothing (a sample).
    weight: [Σout, in] float32, the group's quantized readers stacked by rows (the int8 grid is per
        row, so quantizing the stack is quantizing each reader).
    act_absmax: [in] max|x| over the whole calibration set (the static scale comes from it).
    weight_absmax: [in] max|W| over every reader of the group (what the fold uses).
    """
    ref = x @ weight.t()
    a_p, w_p = producer.to_producer(act_absmax, "max"), producer.to_producer(weight_absmax, "max")
    errors = []
    for alpha in grid:
        check_cancel(cancel)
        s_in = producer.to_reader(smoothing_scales(a_p, w_p, alpha))
        xq = act_quant(act_scheme, act_absmax / s_in).fake_quant(x / s_in)
        w_hat = int8_weight(weight * s_in).dequantize()
        errors.append(float((ref - xq @ w_hat.t()).square().sum()))
    return errors


def best_alpha(errors: list[float], grid: tuple[float, ...] = ALPHA_GRID) -> float:
    """The α with the smallest error; ties go to the one nearest 0.5 (the paper's default)."""
    return grid[min(range(len(grid)), key=lambda k: (errors[k], abs(grid[k] - 0.5)))]


def smooth_layer(ctx: LayerContext, alpha: float | str,
                 act_scheme: str = "dynamic") -> tuple[list[InputGroup], list[torch.Tensor]]:
    """Fold smoothing scales into the layer in place (float function unchanged), with a fixed α or,
    for "auto", each group's searched α (scored with `act_scheme`). Returns the groups and each
    group's input absmax after smoothing."""
    if not ctx.inputs or ctx.forward is None:
        raise ValueError("SmoothQuant needs calibration inputs; pass --calib builtin or a text file")
    search = alpha == "auto"
    groups = layer_groups(ctx)
    absmax, samples = group_absmax(ctx, groups, SEARCH_TOKENS if search else 0)
    metrics = ctx.extra.setdefault("metrics", {})
    chosen: list[str] = []
    for i, g in enumerate(groups):
        quantized = [n for n in g.readers if n in ctx.linears]
        if not quantized:
            continue
        producer = producer_of(ctx.module, g, float(ctx.extra.get("norm_offset", 0.0)))
        if producer is None:
            msg = f"SmoothQuant {ctx.prefix}.{'+'.join(g.readers)}: no norm or linear can absorb a scale; left unsmoothed"
            log.info(msg)
            ctx.sink(Log("info", msg))
            continue
        w_absmax = torch.stack([ctx.module.get_submodule(n).weight.detach().abs().amax(dim=0).float()
                                for n in g.readers]).amax(dim=0)
        if search:
            weight = torch.cat([ctx.module.get_submodule(n).weight.detach().float() for n in quantized])
            a = best_alpha(alpha_errors(samples[i], weight, absmax[i], w_absmax, producer, act_scheme,
                                        cancel=ctx.cancel))
            chosen.append(f"{'/'.join(n.rpartition('.')[2].removesuffix('_proj') for n in quantized)} {a:.2f}")
        else:
            a = float(alpha)
        s = smoothing_scales(producer.to_producer(absmax[i], "max"), producer.to_producer(w_absmax, "max"), a)
        s_in = fold(ctx.module, g, producer, s)
        before = float(absmax[i].max())
        absmax[i] = absmax[i] / s_in
        for n in g.names:
            metrics.setdefault(n, {}).update({"act_absmax_before": before, "act_absmax_after": float(absmax[i].max()),
                                              "sq_alpha": a})
    if chosen:
        msg = f"SmoothQuant {ctx.prefix}: α " + ", ".join(chosen)
        log.info(msg)
        ctx.sink(Log("info", msg))
    return groups, absmax


@register(SmoothQuantConfig)
class SmoothQuantQuantizer:
    needs_calibration = True

    def __init__(self, config: SmoothQuantConfig) -> None:
        self.config = config

    def quantize_layer(self, ctx: LayerContext) -> dict[str, IntWeight]:
        groups, absmax = smooth_layer(ctx, self.config.alpha, self.config.act_scheme)
        out: dict[str, IntWeight] = {}
        for g, amax in zip(groups, absmax):
            for n in g.names:
                check_cancel(ctx.cancel)
                lin = ctx.linears[n]
                q = int8_weight(lin.weight.detach().float(), dtype=source_dtype(ctx, lin.weight),
                                name=f"{ctx.prefix}.{n}")
                q.act = act_quant(self.config.act_scheme, amax)
                out[n] = q
        return out
