"""AWQ: activation-aware weight quantization (Lin et al., 2023).

Channels that see large activations matter more, so before rounding each input channel j of a
group of linears is multiplied by s_j = mean|x_j|^α (normalised by sqrt(max·min)) and the inverse
is folded into whatever produced the input — the preceding norm (q/k/v, gate/up) or the preceding
linear (v → o, up → down) — which leaves the float function unchanged. α is picked from a grid by
the output error of the block the linears belong to. Then each weight group's clipping range is
searched against the output error of that group, and the result is rounded on the
`core.primitives` grid.

Blocks used for the α search:
  q/k/v    the q/k/v outputs (attention itself needs rotary/mask state only the engine has);
  o        o_proj's output; its scale lives on v_proj's output channels. With GQA, v_proj has
           kv_heads·head_dim outputs and o_proj reads num_heads·head_dim: one scale per v channel,
           repeated for every query head of its kv group (as AWQ does);
  gate/up  the whole MLP output (non-linear, so evaluated on a token subsample);
  down     down_proj's output, scale folded into up_proj's rows.
Linear blocks are scored exactly on all calibration tokens through the Gram matrix XᵀX:
‖X(W − Ŵ)ᵀ‖² = tr((W − Ŵ) XᵀX (W − Ŵ)ᵀ).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from core.config import AWQConfig, Granularity
from core.events import Log, check_cancel
from core.methods.base import LayerContext, register
from core.methods.capture import InputGroup, TokenSample, forward_with_hooks, layer_groups
from core.methods.folding import Producer, fold, producer_of
from core.methods.rtn import source_dtype
from core.primitives import CLIP_RATIOS, choose_qparams, dequantize_affine, quantize_affine, resolve_group_size
from core.qtensors import IntWeight

log = logging.getLogger(__name__)

# Tokens kept per layer for scoring the MLP block; enough for a stable ranking of 20 ratios while
# keeping 20 MLP evaluations cheap on a CPU.
SEARCH_TOKENS = 2048

# Clipping the q/k projections barely changes their outputs but distorts attention scores;
# AWQ leaves them unclipped.
_NO_CLIP = ("q_proj", "k_proj")


@dataclass
class _Stats:
    """Input statistics of one group over the calibration set (post-fold values after `scale`)."""

    abs_sum: torch.Tensor
    gram: torch.Tensor
    count: int = 0
    sample: list[torch.Tensor] = field(default_factory=list)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    def divide(self, s: torch.Tensor) -> None:
        """The producer was divided by s: every input channel j becomes x_j / s_j."""
        self.abs_sum = self.abs_sum / s
        self.gram = self.gram / s[:, None] / s[None, :]
        self.sample = [x / s for x in self.sample]


def _collect(ctx: LayerContext, groups: list[InputGroup]) -> dict[int, _Stats]:
    """One pass of the float layer over all calibration batches: per group mean|x|, XᵀX and a
    token subsample (the same random positions for every group)."""
    stats: dict[int, _Stats] = {}
    targets: dict[nn.Module, int] = {}
    for gi, g in enumerate(groups):
        lin = ctx.module.get_submodule(g.readers[0])
        n_in = lin.in_features
        dev = lin.weight.device
        stats[gi] = _Stats(torch.zeros(n_in, dtype=torch.float64, device=dev),
                           torch.zeros(n_in, n_in, dtype=torch.float32, device=dev))
        targets[lin] = gi
    sampler = TokenSample(ctx, SEARCH_TOKENS)

    def hook(module: nn.Module, args: tuple) -> None:
        st = stats[targets[module]]
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        st.abs_sum += x.abs().sum(dim=0, dtype=torch.float64)
        st.count += x.shape[0]
        st.gram.addmm_(x.t(), x)
        st.sample.append(sampler.take(x))

    forward_with_hooks(ctx, [(m, hook) for m in targets], before_batch=sampler.before_batch)
    for st in stats.values():
        st.sample = [torch.cat(st.sample)] if st.sample else []
    return stats


def _fake_quant(w: torch.Tensor, cfg: AWQConfig, gs: int) -> torch.Tensor:
    scale, zero = choose_qparams(w, cfg.bits, cfg.sym, cfg.granularity, gs)
    return dequantize_affine(quantize_affine(w, scale, zero, cfg.bits, gs), scale, zero, gs)


def _gram_error(d: torch.Tensor, gram: torch.Tensor) -> float:
    """tr(D G Dᵀ) for D [out, in]: the summed squared output error on the calibration tokens."""
    return float((d @ gram * d).sum())


class _Layer:
    """The decoder layer being quantized and the bits of structure AWQ needs from it."""

    def __init__(self, ctx: LayerContext, cfg: AWQConfig) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.module = ctx.module

    def linear(self, rel: str) -> nn.Linear:
        return self.module.get_submodule(rel)

    def group_size(self, rel: str) -> int:
        return resolve_group_size(self.linear(rel).in_features, self.cfg.granularity, self.cfg.group_size,
                                  _qualified(self.ctx, rel))

    def quantized_readers(self, g: InputGroup) -> list[str]:
        return [n for n in g.readers if n in self.ctx.linears]

    def mlp_block(self, g: InputGroup) -> nn.Module | None:
        """The parent module when it is an MLP and the group reads the MLP's own input (gate/up,
        not down)."""
        parent = g.readers[0].rpartition(".")[0]
        if not parent or g.norm is None:
            return None
        module = self.module.get_submodule(parent)
        if "mlp" not in type(module).__name__.lower() or not all(r.startswith(parent + ".") for r in g.readers):
            return None
        return module


def _qualified(ctx: LayerContext, rel: str) -> str:
    return f"{ctx.prefix}.{rel}" if ctx.prefix else rel


def _candidates(mean_abs: torch.Tensor, grid: int) -> list[tuple[float, torch.Tensor]]:
    x = mean_abs.float().clamp(min=1e-8)
    out = []
    for i in range(grid):
        ratio = i / grid
        s = x.pow(ratio).clamp(min=1e-4)
        s = s / torch.sqrt(s.max() * s.min())
        out.append((ratio, s))
    return out


def _search_scale(layer: _Layer, g: InputGroup, st: _Stats, producer: Producer) -> tuple[float, torch.Tensor]:
    """Best (ratio, s) for group g; s lives on the producer's channels (v's for GQA)."""
    cfg = layer.cfg
    readers = layer.quantized_readers(g)
    mean_abs = producer.to_producer(st.mean_abs.float(), "mean")
    block = layer.mlp_block(g)
    weights = {n: layer.linear(n).weight.detach().float() for n in readers}
    ref = None
    sample = st.sample[0] if st.sample else None
    if block is not None and sample is not None:
        with torch.no_grad():
            ref = block(sample[None])
    best: tuple[float, float, torch.Tensor] = (0.0, math.inf, torch.ones_like(mean_abs))
    for ratio, s_v in _candidates(mean_abs, cfg.grid):
        check_cancel(layer.ctx.cancel)
        s = producer.to_reader(s_v)
        approx = {n: _fake_quant(w * s, cfg, layer.group_size(n)) / s for n, w in weights.items()}
        if ref is not None:
            err = _block_error(block, approx, layer, sample, ref, g.readers[0].rpartition(".")[0])
        else:
            err = sum(_gram_error(weights[n] - approx[n], st.gram) for n in readers)
        if err < best[1]:
            best = (ratio, err, s_v)
    return best[0], best[2]


def _block_error(block: nn.Module, approx: dict[str, torch.Tensor], layer: _Layer, sample: torch.Tensor,
                 ref: torch.Tensor, parent: str) -> float:
    saved = {}
    try:
        for n, w in approx.items():
            lin = layer.linear(n)
            saved[n] = lin.weight.data
            lin.weight.data = w
        with torch.no_grad():
            out = block(sample[None])
    finally:
        for n, w in saved.items():
            layer.linear(n).weight.data = w
    return float((out - ref).square().sum())


def _clip_and_quantize(w: torch.Tensor, gram: torch.Tensor, cfg: AWQConfig, gs: int, clip: bool,
                       dtype: torch.dtype) -> IntWeight:
    """Per group, the clip ratio of CLIP_RATIOS whose rounding error has the smallest output
    error on the calibration inputs ((w − ŵ)ᵀ X_gᵀX_g (w − ŵ) per row and group). A ragged last
    group (gs not dividing in_features) is searched the same way over its own columns."""
    out_f, n_in = w.shape
    scale, zero = choose_qparams(w, cfg.bits, cfg.sym, cfg.granularity, gs)
    if clip and cfg.granularity is not Granularity.TENSOR:
        full, tail = n_in // gs, n_in % gs
        main = full * gs
        blocks = torch.stack([gram[g * gs:(g + 1) * gs, g * gs:(g + 1) * gs] for g in range(full)])
        wg = w[:, :main].view(out_f, full, gs) if tail else w.view(out_f, full, gs)
        lo = wg.amin(dim=-1).clamp(max=0)
        hi = wg.amax(dim=-1).clamp(min=0)
        if tail:
            wt, gram_t = w[:, main:], gram[main:, main:]
            lo = torch.cat([lo, wt.amin(dim=-1, keepdim=True).clamp(max=0)], dim=1)
            hi = torch.cat([hi, wt.amax(dim=-1, keepdim=True).clamp(min=0)], dim=1)
        best = torch.full((out_f, full + (1 if tail else 0)), math.inf, device=w.device)
        for ratio in CLIP_RATIOS:
            lo_r, hi_r = lo * ratio, hi * ratio
            clipped = torch.maximum(torch.minimum(wg, hi_r[:, :full, None]), lo_r[:, :full, None]).reshape(out_f, main)
            if tail:
                clipped = torch.cat([clipped, torch.maximum(torch.minimum(wt, hi_r[:, full:]), lo_r[:, full:])], dim=1)
            s, z = choose_qparams(clipped, cfg.bits, cfg.sym, cfg.granularity, gs)
            d = w - dequantize_affine(quantize_affine(w, s, z, cfg.bits, gs), s, z, gs)
            err = (torch.einsum("ogi,gij->ogj", d[:, :main].view(out_f, full, gs), blocks)
                   * d[:, :main].view(out_f, full, gs)).sum(dim=-1)
            if tail:
                dt = d[:, main:]
                err = torch.cat([err, ((dt @ gram_t) * dt).sum(dim=-1, keepdim=True)], dim=1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    codes = quantize_affine(w, scale, zero, cfg.bits, gs)
    return IntWeight(codes=codes, scale=scale.float(), zero=zero.to(torch.int32), bits=cfg.bits,
                     group_size=gs, sym=cfg.sym, dtype=dtype)


@register(AWQConfig)
class AWQQuantizer:
    needs_calibration = True

    def __init__(self, config: AWQConfig) -> None:
        self.config = config

    def quantize_layer(self, ctx: LayerContext) -> dict[str, IntWeight]:
        cfg = self.config
        groups, stats = search_and_fold(ctx, cfg)
        layer = _Layer(ctx, cfg)
        result: dict[str, IntWeight] = {}
        for gi, g in enumerate(groups):
            for n in g.names:
                check_cancel(ctx.cancel)
                lin = layer.linear(n)
                clip = cfg.clip and not any(n.endswith(p) for p in _NO_CLIP)
                result[n] = _clip_and_quantize(lin.weight.detach().float(), stats[gi].gram, cfg,
                                               layer.group_size(n), clip, source_dtype(ctx, lin.weight))
        return result


def search_and_fold(ctx: LayerContext, cfg: AWQConfig) -> tuple[list[InputGroup], dict[int, _Stats]]:
    """Search every group's scales and fold them into the layer in place (the float function is
    unchanged). Returns the groups and their input statistics, already divided by the scales."""
    if not ctx.inputs or ctx.forward is None:
        raise ValueError("AWQ needs calibration inputs; pass --calib builtin or a text file")
    layer = _Layer(ctx, cfg)
    groups = layer_groups(ctx)
    stats = _collect(ctx, groups)
    metrics = ctx.extra.setdefault("metrics", {})
    for gi, g in enumerate(groups):
        check_cancel(ctx.cancel)
        if not layer.quantized_readers(g):
            continue
        producer = producer_of(ctx.module, g, float(ctx.extra.get("norm_offset", 0.0)))
        if producer is None:
            msg = (f"AWQ {_qualified(ctx, '+'.join(g.readers))}: no norm or linear with matching shape "
                   "feeds this input; quantized without scaling")
            log.info(msg)
            ctx.sink(Log("info", msg))
            continue
        ratio, s_v = _search_scale(layer, g, stats[gi], producer)
        s = fold(ctx.module, g, producer, s_v)
        stats[gi].divide(s)
        for n in layer.quantized_readers(g):
            metrics.setdefault(n, {})["awq_ratio"] = ratio
    return groups, stats
