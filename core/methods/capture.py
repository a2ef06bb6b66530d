"""Calibration plumbing shared by the calibrated methods: which linears of a decoder layer read
the same tensor (and which norm produced it), and the inputs those linears see while the engine's
`ctx.forward` runs the layer.

The grouping is discovered by running the layer once with hooks, not from module names, so it
holds for any decoder layout the engine can run (Llama, Mistral, Qwen2/3 …).
"""
from __future__ import annotations

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
