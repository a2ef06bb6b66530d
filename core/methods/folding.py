"""Folding per-channel scales into a decoder layer without changing its float function: the
producer of a tensor (a norm, or a linear whose output rows feed the tensor) is divided by s and
every linear reading the tensor is multiplied by s on its input columns. Used by AWQ and
SmoothQuant.

Linear producers: o_proj reads the attention output, which is linear in v_proj's output, and
down_proj reads act(gate)·up, which is linear in up_proj's output. With grouped-query attention
v_proj has kv_heads·head_dim outputs while o_proj reads num_heads·head_dim inputs; query head h
reads kv head h // repeat (transformers' repeat_kv), so one scale per v channel is repeated for
every query head of its group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from core.methods.capture import InputGroup

# Producer of a linear's input when it is another linear of the same parent module.
PREVIOUS_LINEAR = {"o_proj": "v_proj", "down_proj": "up_proj"}


@dataclass(frozen=True)
class Producer:
    """What makes a group's input. Scales live on the producer's channels; `repeat` > 1 maps
    them onto more reader channels (GQA)."""

    name: str
    is_norm: bool
    head_dim: int = 1
    repeat: int = 1
    # A norm computing x̂·(offset + w) (Gemma: 1) is divided by s as (offset + w)/s − offset.
    offset: float = 0.0

    def to_reader(self, s: torch.Tensor) -> torch.Tensor:
        """Producer-channel values [kv·hd] → reader input channels [kv·repeat·hd]."""
        if self.repeat == 1:
            return s
        kv = s.numel() // self.head_dim
        return s.view(kv, 1, self.head_dim).expand(kv, self.repeat, self.head_dim).reshape(-1)

    def to_producer(self, stat: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        """Reader input-channel statistic → producer channels, combining the query heads that
        share a kv head by mean or max."""
        if self.repeat == 1:
            return stat
        kv = stat.numel() // (self.head_dim * self.repeat)
        view = stat.view(kv, self.repeat, self.head_dim)
        return (view.amax(dim=1) if reduce == "max" else view.mean(dim=1)).reshape(-1)


def producer_of(module: nn.Module, group: InputGroup, norm_offset: float = 0.0) -> Producer | None:
    """The norm or linear whose output the group reads, or None when there is none a scale can
    be folded into exactly (unknown layout, a fused linear, or shapes that do not line up).
    `norm_offset`: the family's RMSNorm multiplies by (norm_offset + weight)."""
    if group.norm is not None:
        return Producer(group.norm, True, offset=norm_offset)
    if len(group.readers) != 1:
        return None
    parent, _, leaf = group.readers[0].rpartition(".")
    prev = PREVIOUS_LINEAR.get(leaf)
    if prev is None:
        return None
    full = f"{parent}.{prev}" if parent else prev
    try:
        producer = module.get_submodule(full)
        reader = module.get_submodule(group.readers[0])
    except AttributeError:
        return None
    if not isinstance(producer, nn.Linear) or not isinstance(reader, nn.Linear):
        return None
    p_out, r_in = producer.out_features, reader.in_features
    if p_out == r_in:
        return Producer(full, False)
    head_dim = getattr(module.get_submodule(parent) if parent else module, "head_dim", None)
    if leaf != "o_proj" or not head_dim or r_in % p_out or p_out % int(head_dim):
        return None
    return Producer(full, False, int(head_dim), r_in // p_out)


def fold(module: nn.Module, group: InputGroup, producer: Producer, s: torch.Tensor) -> torch.Tensor:
    """Divide the producer by s (producer channels) and multiply the readers' input columns by
    the matching scales. Returns those reader-channel scales."""
    s = s.float()
    s_in = producer.to_reader(s)
    with torch.no_grad():
        target = module.get_submodule(producer.name)
        if producer.is_norm and producer.offset:
            w = target.weight
            w.copy_(((producer.offset + w.float()) / s - producer.offset).to(w.dtype))
        elif producer.is_norm:
            target.weight.div_(s.to(target.weight.dtype))
        else:
            target.weight.div_(s[:, None].to(target.weight.dtype))
        bias = getattr(target, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.div_(s.to(bias.dtype))
        for name in group.readers:
            lin = module.get_submodule(name)
            lin.weight.mul_(s_in[None, :].to(lin.weight.dtype))
    return s_in
