"""Calibration plumbing shared by the calibrated methods: which linears of a decoder layer read
the same tensor (and which norm produced it), and the inputs those linears see while the engine's
`ctx.forward` runs the layer.

The grouping is discovered by running the layer once with hooks, not from module names, so it
holds for any decoder layout the engine can run (Llama, Mistral, Qwen2/3 …).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from core.events import check_cancel
from core.methods.base import LayerContext


@dataclass
class InputGroup:
    """Linears of one layer that read the same tensor.

    names: the ones being quantized (keys of ctx.linears), in true-sequential order.
    readers: every nn.Linear of the layer reading that tensor, quantized or skipped; folding a
        scale into the producer must compensate all of them.
    norm: relative name of the norm module whose output the tensor is, or None (e.g. o_proj,
        down_proj, whose inputs come from attention / the gated product).
    """

    names: list[str]
    readers: list[str]
    norm: str | None


class _StopForward(Exception):
    """Raised from a hook once the wanted inputs are captured, to skip the rest of the layer."""


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower() and isinstance(getattr(module, "weight", None), torch.Tensor)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (
        a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
    )


def layer_groups(ctx: LayerContext) -> list[InputGroup]:
    """Run the layer once on the first calibration batch and group linears by the tensor they read."""
    if not ctx.inputs or ctx.forward is None:
        raise ValueError(f"layer {ctx.prefix}: calibration inputs are needed to find which linears share inputs")
    seen_in: dict[str, torch.Tensor] = {}
    seen_out: dict[str, torch.Tensor] = {}
    handles = []
    linears = {n: m for n, m in ctx.module.named_modules() if isinstance(m, nn.Linear)}
    norms = {n: m for n, m in ctx.module.named_modules() if n and _is_norm(m)}

    def pre(name: str) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            seen_in.setdefault(name, args[0])

        return hook

    def post(name: str) -> Callable:
        def hook(_m: nn.Module, _args: tuple, out: object) -> None:
            if isinstance(out, torch.Tensor):
                seen_out.setdefault(name, out)

        return hook

    try:
        for n, m in linears.items():
            handles.append(m.register_forward_pre_hook(pre(n)))
        for n, m in norms.items():
            handles.append(m.register_forward_hook(post(n)))
        with torch.no_grad():
            ctx.forward(ctx.inputs[0][:1])  # one sample is enough to see who reads what
    finally:
        for h in handles:
            h.remove()

    groups: list[InputGroup] = []
    for name in ctx.linears:
        if any(name in g.names for g in groups):
            continue
        x = seen_in.get(name)
        if x is None:
            groups.append(InputGroup([name], [name], None))
            continue
        readers = [n for n in linears if n in seen_in and _same(seen_in[n], x)]
        names = [n for n in ctx.linears if n in readers]
        norm = next((n for n, out in seen_out.items() if _same(out, x)), None)
        groups.append(InputGroup(names, readers, norm))
    return groups


def input_groups(ctx: LayerContext) -> list[list[str]]:
    """Names of ctx.linears grouped by shared input, in true-sequential order."""
    return [g.names for g in layer_groups(ctx)]


def capture_group_inputs(
    ctx: LayerContext, names: list[str], fn: Callable[[torch.Tensor], None], *, stop_early: bool = True
) -> None:
    """Run every calibration batch through the layer as it is now (earlier groups already
    quantized) and call `fn` with the input [batch, seq, in] of the group's first linear.
    With stop_early the forward is abandoned right after, so capturing the q/k/v input costs
    almost nothing and capturing down_proj's costs less than a full layer."""
    target = ctx.linears[names[0]]

    def hook(_m: nn.Module, args: tuple) -> None:
        fn(args[0].detach())
        if stop_early:
            raise _StopForward

    handle = target.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for batch in ctx.inputs or []:
                check_cancel(ctx.cancel)
                try:
                    ctx.forward(batch)
                except _StopForward:
                    pass
    finally:
        handle.remove()


PreHook = Callable[[nn.Module, tuple], None]


def forward_with_hooks(
    ctx: LayerContext,
    hooks: Iterable[tuple[nn.Module, PreHook]],
    before_batch: Callable[[torch.Tensor], None] | None = None,
) -> None:
    """Run every calibration batch through the layer as it is now, with a forward pre-hook on
    each given module (the statistics passes of SmoothQuant, AWQ and LLM.int8()), cancel-checked
    between batches; `before_batch` sees each batch first. The hooks are removed even when a batch
    fails or the job is cancelled, so no later forward of the layer runs them."""
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_pre_hook(hook))
        with torch.no_grad():
            for batch in ctx.inputs or []:
                check_cancel(ctx.cancel)
                if before_batch is not None:
                    before_batch(batch)
                ctx.forward(batch)
    finally:
        for h in handles:
            h.remove()


class TokenSample:
    """About `tokens` random token positions of the calibration set, the same ones for every module
    hooked during one pass (AWQ's MLP scoring, SmoothQuant's α search): drawn per batch, before its
    forward (pass `before_batch` to `forward_with_hooks`), from a generator seeded with the layer
    index, so a run is reproducible."""

    def __init__(self, ctx: LayerContext, tokens: int) -> None:
        self._gen = torch.Generator().manual_seed(ctx.index)
        self.per_batch = max(1, math.ceil(tokens / max(len(ctx.inputs or []), 1)))
        self._pick: torch.Tensor | None = None

    def before_batch(self, batch: torch.Tensor) -> None:
        # Drawn on the CPU (the generator's device) whatever the batch's device, so every device
        # samples the same positions; moved beside the batch once.
        pick = torch.randperm(batch.shape[0] * batch.shape[1], generator=self._gen, device="cpu")[:self.per_batch]
        self._pick = pick.to(batch.device)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This batch's sampled rows of x [batch·seq, features] (a copy)."""
        if self._pick is None:
            raise RuntimeError("TokenSample.take before any batch: pass before_batch to forward_with_hooks")
        return x[self._pick].clone()


class StagedLayer:
    """A Llama-family decoder layer, h → h + attn(norm1(h)) → h₂ + mlp(norm2(h₂)), cut at the
    inputs of its linears so a true-sequential method can run each part once per batch and keep
    what the later parts need, instead of re-running the whole layer for every group of linears.

    `build` returns None unless one calibration sample through the stages reproduces
    `ctx.forward` (so a layer with extra norms, gates or a parallel block falls back to the
    generic capture passes). The attention's keyword arguments (mask, positions, rotary
    embeddings) are taken from that same forward, so the stages call the sub-modules exactly as
    the layer does.
    """

    def __init__(self, layer: nn.Module, attn_kwargs: dict) -> None:
        self.layer = layer
        self.norm1: nn.Module = layer.input_layernorm
        self.attn: nn.Module = layer.self_attn
        self.norm2: nn.Module = layer.post_attention_layernorm
        self.mlp: nn.Module = layer.mlp
        self.o_proj: nn.Linear = layer.self_attn.o_proj
        self.down_proj: nn.Linear = layer.mlp.down_proj
        self._attn_kwargs = attn_kwargs
        self._seq = _seq_len(attn_kwargs)

    # Relative names (as in ctx.linears) of the linears reading each stage's tensor.
    def groups(self) -> list[list[str]]:
        def children(parent: str, module: nn.Module, leave_out: nn.Module) -> list[str]:
            return [f"{parent}.{n}" for n, m in module.named_modules()
                    if n and isinstance(m, nn.Linear) and m is not leave_out]

        return [children("self_attn", self.attn, self.o_proj), ["self_attn.o_proj"],
                children("mlp", self.mlp, self.down_proj), ["mlp.down_proj"]]

    @classmethod
    def build(cls, ctx: LayerContext) -> StagedLayer | None:
        layer = ctx.module
        try:
            attn, mlp = layer.self_attn, layer.mlp
            parts = (layer.input_layernorm, layer.post_attention_layernorm, attn.o_proj, mlp.down_proj)
        except AttributeError:
            return None
        if not all(isinstance(p, nn.Module) for p in parts) or not ctx.inputs or ctx.forward is None:
            return None
        captured: dict = {}

        def grab(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.setdefault("kwargs", {k: v for k, v in kwargs.items() if k != "hidden_states"})
            captured.setdefault("positional", len(args))

        sample = ctx.inputs[0][:1]
        handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                ref = ctx.forward(sample)
        finally:
            handle.remove()
        if "kwargs" not in captured or captured["positional"] > 1:
            return None  # attention called in a way the stages cannot repeat
        staged = cls(layer, captured["kwargs"])
        if staged._seq is not None and staged._seq != sample.shape[1]:
            return None
        with torch.no_grad():
            h2 = sample + staged.o_proj(staged.attn_input(staged.norm1(sample)))
            out = h2 + staged.down_proj(staged.mlp_input(staged.norm2(h2)))
        if out.shape != ref.shape or not torch.allclose(out, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max())):
            return None
        return staged

    def _check_seq(self, x: torch.Tensor) -> None:
        if self._seq is not None and x.shape[1] != self._seq:
            raise ValueError(f"calibration batches must share one sequence length ({x.shape[1]} vs {self._seq})")

    def attn_input(self, x1: torch.Tensor) -> torch.Tensor:
        """The input of o_proj (the attention heads' output) for the normed hidden states x1."""
        self._check_seq(x1)
        return _input_of(self.o_proj, lambda: self.attn(hidden_states=x1, **self._attn_kwargs), "attention")

    def mlp_input(self, x2: torch.Tensor) -> torch.Tensor:
        """The input of down_proj (the gated product) for the normed hidden states x2."""
        return _input_of(self.down_proj, lambda: self.mlp(x2), "MLP")


def _input_of(target: nn.Module, run: Callable[[], object], block: str) -> torch.Tensor:
    """What `target` receives when `run()` calls it; the rest of the block is skipped."""
    got: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple) -> None:
        got.append(args[0])
        raise _StopForward

    handle = target.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            run()
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not got:
        raise RuntimeError(f"the {block} block never reached its last linear")
    return got[0]


def _seq_len(kwargs: dict) -> int | None:
    mask = kwargs.get("attention_mask")
    return int(mask.shape[-2]) if isinstance(mask, torch.Tensor) and mask.dim() >= 2 else None
