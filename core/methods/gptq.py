"""GPTQ: quantize a linear column by column and push each column's rounding error onto the columns
not yet quantized, weighted by the inverse Hessian of the layer's inputs (Frantar et al., 2022).

Structure follows IST-DASLab's gptq.py: `add_batch` accumulates H = 2/n Σ x xᵀ, `quantize` runs
the blocked Cholesky update, `free` drops the Hessian. The grid (scale, zero) comes from
`core.primitives.choose_qparams`; this module only decides *which* values are rounded and how the
error is propagated.

Within a decoder layer the linears are quantized true-sequentially: the linears that read the same
tensor (q/k/v, gate/up) share one Hessian and are quantized together as one stacked matrix (GPTQ
rows are independent given H, so stacking is exact and saves the per-column Python overhead), and
the next group's Hessian is collected by re-running the layer with the earlier groups already
quantized.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch

from core.config import GPTQ_KEEP_MAX_BYTES, GPTQConfig, Granularity
from core.events import CancelToken, Log, Progress, Sink, check_cancel, null_sink
from core.methods.base import LayerContext, register
from core.methods.capture import StagedLayer, capture_group_inputs, input_groups
from core.methods.rtn import source_dtype
from core.primitives import choose_qparams, num_groups, resolve_group_size
from core.qtensors import IntWeight

log = logging.getLogger(__name__)

# Largest Hessian (in_features) inverted single-threaded (see gptq_quantize).
_SERIAL_INVERSE_MAX = 4096

# Each failed Cholesky multiplies the dampening by 10; after this many tries the inputs are
# hopeless (NaN/Inf activations) and we stop instead of quantizing against garbage.
MAX_DAMP_RETRIES = 6


@dataclass
class GPTQResult:
    weight: IntWeight
    row_losses: torch.Tensor  # float32 [out]: GPTQ's proxy error Σ_i (w − q)² / Hinv[i,i]² / 2 per row
    damp: float  # the relative dampening that finally made H positive definite

    @property
    def loss(self) -> float:
        return float(self.row_losses.sum())


class GPTQ:
    """Hessian accumulator and solver for one weight matrix [out, in] (or several stacked ones
    that read the same input)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.columns = in_features
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """x: [..., in] inputs of the linear; every leading position counts as one sample."""
        x = x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        n = x.shape[0]
        if n == 0:
            return
        total = self.nsamples + n
        # Running mean keeps H on the scale of one sample, whatever the calibration size.
        self.H.mul_(self.nsamples / total)
        self.H.addmm_(x.t(), x, alpha=2.0 / total)
        self.nsamples = total

    def quantize(
        self,
        weight: torch.Tensor,
        config: GPTQConfig,
        *,
        name: str = "weight",
        cancel: CancelToken | None = None,
        sink: Sink = null_sink,
        dtype: torch.dtype = torch.float16,
    ) -> GPTQResult:
        if self.nsamples == 0:
            raise ValueError(f"GPTQ for {name} saw no calibration inputs; give at least one calibration sample")
        return gptq_quantize(weight, self.H, config, name=name, cancel=cancel, sink=sink, dtype=dtype)

    def free(self) -> None:
        self.H = torch.empty(0, device=self.H.device)
        self.nsamples = 0


def _params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for each row of `w` [out, k] over all its columns: float [out], float [out]."""
    scale, zero = choose_qparams(w, bits, sym, Granularity.CHANNEL, w.shape[1])
    return scale[:, 0].float(), zero[:, 0].float()


def _inverse_hessian_cholesky(
    H: torch.Tensor, damp: float, name: str, sink: Sink
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp · mean(diag H); on failure the
    dampening grows ×10 (rank-deficient or ill-conditioned inputs)."""
    mean_diag = float(torch.mean(torch.diag(H)))
    if not math.isfinite(mean_diag):
        raise ValueError(f"the calibration inputs of {name} contain NaN or Inf; check the model weights and calibration text")
    # At most two in² matrices besides H at any time (the Hessian of a 14336-wide down_proj is
    # 0.8 GB): the dampened copy is dropped once factored, the factor once inverted.
    for attempt in range(MAX_DAMP_RETRIES):
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U, damp
        new = damp * 10.0
        msg = f"GPTQ {name}: Hessian not positive definite with damp={damp:g}; retrying with damp={new:g}"
        log.info(msg)
        sink(Log("warning", msg))
        damp = new
    raise ValueError(
        f"GPTQ {name}: Hessian stays singular even with damp={damp / 10:g}; "
        "use more or longer calibration samples (--samples/--seq-len)"
    )


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    config: GPTQConfig,
    *,
    name: str = "weight",
    cancel: CancelToken | None = None,
    sink: Sink = null_sink,
    dtype: torch.dtype = torch.float16,
) -> GPTQResult:
    """Quantize W [out, in] against the input Hessian H [in, in] (float32, not modified).

    Returns an IntWeight whose dequantization is the GPTQ solution. With act-order the columns
    are processed by decreasing diag(H); with static groups the group grids come from the
    unpermuted weight so groups stay contiguous in the original order (g_idx stays trivial and
    is omitted); without static groups the i-th processed block of `group_size` columns forms
    group i and `g_idx` maps each original column to its group. When group_size does not divide
    in_features there are ceil(in/group_size) groups and the last one is ragged: its grid is
    fitted on its own (fewer) columns, as in the reference implementation.
    """
    out_f, n_in = W.shape
    bits, sym = config.bits, config.sym
    maxq = 2**bits - 1
    gs = resolve_group_size(n_in, config.granularity, config.group_size, name)
    grouped = config.granularity is Granularity.GROUP and gs < n_in
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(torch.float32).clone()

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    # One grid for the whole row, fitted before any error is propagated: per tensor, per channel,
    # and per group when the group covers the whole row (group size ≥ in_features, e.g. 128 on a
    # 64-wide layer or 1024 on a 576-wide one) — that is the per-channel grid, not a dynamic group.
    tensor_params: tuple[torch.Tensor, torch.Tensor] | None = None
    if config.granularity is Granularity.TENSOR:
        s, z = choose_qparams(W, bits, sym, Granularity.TENSOR, n_in)
        tensor_params = (s.reshape(1).float().expand(out_f), z.reshape(1).float().expand(out_f))
    elif not grouped:
        tensor_params = _params(W, bits, sym)

    n_groups = num_groups(n_in, gs)  # ceil: the last group is ragged when gs does not divide n_in
    static: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    if grouped and config.static_groups:
        static = [_params(W[:, g * gs:(g + 1) * gs], bits, sym) for g in range(n_groups)]

    perm: torch.Tensor | None = None
    if config.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]

    # Threaded LAPACK (torch's MKL) stalls whenever another process holds a core: measured on the
    # 2-core box, the inverse of a 1024² Hessian took 0.5 s with 2 threads vs 0.065 s with 1, and
    # 3072² 2.1 s vs 0.95 s. Small inverses run serially; large ones still gain from threads.
    with _single_thread() if n_in <= _SERIAL_INVERSE_MAX and H.device.type == "cpu" else nullcontext():
        Hinv, damp_used = _inverse_hessian_cholesky(H, config.damp, name, sink)
    del H

    dev = W.device
    scales = torch.zeros(out_f, n_groups if grouped else 1, dtype=torch.float32, device=dev)
    zeros = torch.zeros_like(scales)
    if tensor_params is not None:
        scale, zero = tensor_params
        if config.granularity is Granularity.TENSOR:
            scales, zeros = scale[:1].reshape(1, 1).clone(), zero[:1].reshape(1, 1).clone()
        else:
            scales[:, 0], zeros[:, 0] = scale, zero
    perm_list = perm.tolist() if perm is not None else None

    bs = config.block_size
    if grouped and static is None:
        # A dynamic group's grid is fitted when its first column comes up; aligning blocks to
        # groups guarantees the whole group has received every pending lazy update by then.
        bs = gs * max(1, bs // gs) if gs <= bs else gs

    # Work on Wᵀ [in, out]: each GPTQ column is then a contiguous row, and the rank-1 updates
    # touch contiguous memory.
    Wt = W.t().contiguous()
    del W
    Qt = torch.empty(n_in, out_f, dtype=torch.float32, device=dev)
    losses = torch.zeros(out_f, dtype=torch.float32, device=dev)
    with _single_thread() if dev.type == "cpu" else nullcontext():
        _solve(Wt, Qt, Hinv, losses, scales, zeros, static, perm_list, tensor_params, bits, sym, gs, grouped, bs,
               name, cancel, sink)
    codes = Qt.t().to(torch.uint8)

    g_idx: torch.Tensor | None = None
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        if grouped and static is None:
            g_idx = (inv // gs).to(torch.int32)
    if static is not None:
        for g, (s, z) in enumerate(static):
            scales[:, g], zeros[:, g] = s, z

    weight = IntWeight(
        codes=codes.contiguous(),
        scale=scales,
        zero=zeros.round().to(torch.int32),
        bits=bits,
        group_size=gs,
        sym=sym,
        g_idx=g_idx,
        dtype=dtype,
    )
    return GPTQResult(weight=weight, row_losses=losses, damp=damp_used)


@contextmanager
def _single_thread() -> Iterator[None]:
    """The column loop is thousands of small ops; OpenMP fork/join per op costs more than it
    saves (measured 4-30x slower with 2 threads than 1 on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _solve(Wt: torch.Tensor, Qt: torch.Tensor, Hinv: torch.Tensor, losses: torch.Tensor, scales: torch.Tensor,
           zeros: torch.Tensor, static: list[tuple[torch.Tensor, torch.Tensor]] | None, perm_list: list[int] | None,
           tensor_params: tuple[torch.Tensor, torch.Tensor] | None, bits: int, sym: bool, gs: int, grouped: bool,
           bs: int, name: str, cancel: CancelToken | None, sink: Sink) -> None:
    """The blocked GPTQ sweep over Wᵀ [in, out] (updated in place); rounded codes go to Qt [in, out]."""
    n_in, out_f = Wt.shape
    maxq = 2**bits - 1
    scale, zero = tensor_params if tensor_params is not None else (None, None)
    for i1 in range(0, n_in, bs):
        check_cancel(cancel)
        i2 = min(i1 + bs, n_in)
        count = i2 - i1
        W1 = Wt[i1:i2]  # a view: updates land in Wt directly
        Err1 = torch.empty(count, out_f, dtype=torch.float32, device=Wt.device)
        Hinv1 = Hinv[i1:i2, i1:i2]
        diag = torch.diag(Hinv1).tolist()
        for i in range(count):
            col = i1 + i
            if grouped:
                if static is not None:
                    orig = perm_list[col] if perm_list is not None else col
                    scale, zero = static[orig // gs]
                elif col % gs == 0:
                    scale, zero = _params(Wt[col:col + gs].t(), bits, sym)
                    scales[:, col // gs], zeros[:, col // gs] = scale, zero
            w = W1[i]
            q = torch.div(w, scale).round_().add_(zero).clamp_(0, maxq)
            Qt[col] = q
            err = torch.sub(w, (q - zero).mul_(scale)).div_(diag[i])
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1.0)
            Err1[i] = err
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1.0)
        losses += Err1.square().sum(dim=0) / 2
        sink(Progress("gptq", i2, n_in, name))


@register(GPTQConfig)
class GPTQQuantizer:
    needs_calibration = True

    def __init__(self, config: GPTQConfig) -> None:
        self.config = config

    def quantize_layer(self, ctx: LayerContext) -> dict[str, IntWeight]:
        if not ctx.inputs or ctx.forward is None:
            raise ValueError("GPTQ needs calibration inputs; pass --calib builtin or a text file")
        results: dict[str, IntWeight] = {}
        metrics = ctx.extra.setdefault("metrics", {})
        # The layer is handed back with its float weights: the engine measures the error against
        # them and decides itself what feeds the next layer.
        originals = {n: lin.weight.detach().clone() for n, lin in ctx.linears.items()}
        try:
            # Inputs streamed from host memory (they did not fit the device) go through the
            # batch-by-batch capture passes: the staged layer keeps every batch's intermediates.
            staged = None if getattr(ctx.inputs, "streamed", False) else StagedLayer.build(ctx)
            if staged is None or not self._quantize_staged(ctx, staged, originals, results, metrics):
                self._quantize_groups(ctx, results, metrics)
        finally:
            with torch.no_grad():
                for n, w in originals.items():
                    ctx.linears[n].weight.copy_(w)
        return results

    def _quantize_groups(self, ctx: LayerContext, results: dict[str, IntWeight], metrics: dict) -> None:
        """Generic true-sequential order: one capture pass of the whole layer per group."""
        for group in input_groups(ctx):
            check_cancel(ctx.cancel)
            t0 = time.perf_counter()
            first = ctx.linears[group[0]]
            gptq = GPTQ(first.in_features, device=first.weight.device)
            capture_group_inputs(ctx, group, gptq.add_batch)
            self._solve_group(ctx, gptq, group, results, metrics)
            gptq.free()
            log.debug("GPTQ %s: %.2fs", _qualified(ctx, "+".join(group)), time.perf_counter() - t0)

    def _quantize_staged(self, ctx: LayerContext, staged: StagedLayer, originals: dict[str, torch.Tensor],
                         results: dict[str, IntWeight], metrics: dict) -> bool:
        """True-sequential GPTQ on a staged Llama-family layer: every part of the layer runs once
        per batch with the earlier groups already quantized (q/k/v → attention → o → norm →
        gate/up → down), and the layer's quantized output is left in ctx.extra["propagated"], so
        the engine needs no further pass. The output error of each linear on exactly these
        inputs comes from its Hessian: ‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ).
        Returns False (nothing done) when the linears do not map onto the stages."""
        stages = [[n for n in g if n in ctx.linears] for g in staged.groups()]
        if {n for g in stages for n in g} != set(ctx.linears):
            return False
        hidden = list(ctx.inputs or [])
        errors: dict[str, float] = {}
        with torch.no_grad():
            self._staged_group(ctx, stages[0], (staged.norm1(h) for h in hidden), originals, results, metrics,
                               errors)
            attn_in = [staged.attn_input(staged.norm1(h)) for h in _checked(ctx, hidden)]
            self._staged_group(ctx, stages[1], iter(attn_in), originals, results, metrics, errors)
            mid = [h + staged.o_proj(a) for h, a in zip(hidden, attn_in)]
            del attn_in
            self._staged_group(ctx, stages[2], (staged.norm2(h) for h in mid), originals, results, metrics, errors)
            # down_proj's inputs are kept for the final output when they fit the budget; otherwise
            # the MLP runs once more at the end (gate/up twice, still no attention).
            keep = _fits_budget(sum(h.shape[0] * h.shape[1] for h in mid) * staged.down_proj.in_features * 4,
                                staged.down_proj.weight.device)
            mlp_in: list[torch.Tensor] = []

            def down_inputs() -> Iterator[torch.Tensor]:
                for h in _checked(ctx, mid):
                    m = staged.mlp_input(staged.norm2(h))
                    if keep:
                        mlp_in.append(m)
                    yield m

            self._staged_group(ctx, stages[3], down_inputs(), originals, results, metrics, errors)
            if keep and len(mlp_in) != len(mid):  # down_proj skipped: the generator never ran
                mlp_in = [staged.mlp_input(staged.norm2(h)) for h in _checked(ctx, mid)]
            out: list[torch.Tensor] = []
            for i in range(len(mid)):
                check_cancel(ctx.cancel)
                h = mid[i]
                out.append(h + (staged.down_proj(mlp_in[i]) if keep else staged.mlp(staged.norm2(h))))
                mid[i] = None  # type: ignore[call-overload]  # free as we go
                if keep:
                    mlp_in[i] = None  # type: ignore[call-overload]
        ctx.extra["propagated"] = out
        ctx.extra["output_rel_error"] = errors
        return True

    def _staged_group(self, ctx: LayerContext, names: list[str], inputs: Iterator[torch.Tensor],
                      originals: dict[str, torch.Tensor], results: dict[str, IntWeight], metrics: dict,
                      errors: dict[str, float]) -> None:
        """Hessian of `names`' shared input from `inputs` (consumed whole even when every linear of
        the group is skipped, so that side effects such as keeping down_proj's inputs happen),
        then the group's GPTQ solve and each linear's output error."""
        if not names:
            for _ in inputs:
                check_cancel(ctx.cancel)
            return
        first = ctx.linears[names[0]]
        gptq = GPTQ(first.in_features, device=first.weight.device)
        for x in inputs:
            check_cancel(ctx.cancel)
            gptq.add_batch(x)
        self._solve_group(ctx, gptq, names, results, metrics)
        for n in names:
            errors[n] = _output_rel_error(originals[n], results[n], gptq.H)
        gptq.free()

    def _solve_group(self, ctx: LayerContext, gptq: GPTQ, group: list[str], results: dict[str, IntWeight],
                     metrics: dict) -> None:
        """GPTQ for linears sharing one Hessian; their weights are replaced by the dequantized
        result so the next group sees this group's quantized output (true-sequential)."""
        if gptq.nsamples == 0:
            raise ValueError(f"GPTQ {_qualified(ctx, group[0])}: the layer forward never reached this linear")
        # Per-tensor grids need each matrix alone; otherwise stack the group (same H).
        parts = [[n] for n in group] if self.config.granularity is Granularity.TENSOR else [group]
        for part in parts:
            stacked = torch.cat([ctx.linears[n].weight.detach() for n in part], dim=0)
            label = _qualified(ctx, "+".join(part))
            dtype = source_dtype(ctx, ctx.linears[part[0]].weight)
            res = gptq.quantize(stacked, self.config, name=label, cancel=ctx.cancel, sink=ctx.sink, dtype=dtype)
            row = 0
            for n in part:
                lin = ctx.linears[n]
                q = _slice_rows(res.weight, row, row + lin.out_features)
                loss = float(res.row_losses[row:row + lin.out_features].sum())
                row += lin.out_features
                results[n] = q
                with torch.no_grad():
                    lin.weight.copy_(q.dequantize().to(lin.weight.dtype))
                metrics.setdefault(n, {}).update({"gptq_loss": loss, "damp": res.damp})


def _fits_budget(nbytes: int, device: torch.device) -> bool:
    """Whether `nbytes` of kept activations fit the budget on `device` (its free memory: the
    host's available RAM, or the GPU's)."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    return nbytes <= min(GPTQ_KEEP_MAX_BYTES, free // 4)


def _checked(ctx: LayerContext, items: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    for x in items:
        check_cancel(ctx.cancel)
        yield x


def _output_rel_error(w: torch.Tensor, q: IntWeight, H: torch.Tensor) -> float:
    """‖X(W − Ŵ)ᵀ‖ / ‖XWᵀ‖ for the inputs X whose (scaled) XᵀX is H."""
    w = w.float()
    delta = w - q.dequantize().float().reshape(w.shape)
    noise = float(((delta @ H) * delta).sum())
    signal = float(((w @ H) * w).sum())
    return math.sqrt(max(noise, 0.0) / signal) if signal > 0 else 0.0


def _qualified(ctx: LayerContext, name: str) -> str:
    if not ctx.prefix:
        return name
    return ctx.prefix + name if ctx.prefix.endswith(".") else f"{ctx.prefix}.{name}"


def _slice_rows(w: IntWeight, start: int, stop: int) -> IntWeight:
    def rows(t: torch.Tensor) -> torch.Tensor:
        return t[start:stop].contiguous() if t.shape[0] > 1 else t.clone()

    return IntWeight(
        codes=w.codes[start:stop].contiguous(),
        scale=rows(w.scale),
        zero=rows(w.zero),
        bits=w.bits,
        group_size=w.group_size,
        sym=w.sym,
        g_idx=None if w.g_idx is None else w.g_idx.clone(),
        dtype=w.dtype,
    )

