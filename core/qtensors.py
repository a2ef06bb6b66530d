"""Containers for one quantized linear weight. Methods produce them, exporters serialise them,
readers rebuild them, and `dequantize()` turns them back into a float tensor [out, in].

These are the contract between methods/, export/ and the engine: keep fields stable.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ActQuant:
    """Activation quantization applied at inference (W8A8). `scheme` "dynamic" computes a
    per-token absmax scale on the fly; "static" uses the calibrated per-tensor `scale`."""

    bits: int = 8
    scheme: str = "dynamic"
    scale: torch.Tensor | None = None  # float32 scalar tensor for "static"

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        qmax = 2 ** (self.bits - 1) - 1
        if self.scheme == "static":
            s = self.scale.to(x.dtype)
        else:
            s = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / qmax
        return torch.clamp(torch.round(x / s), -qmax - 1, qmax) * s


@dataclass
class IntWeight:
    """Affine integer weight: x̂ = scale[r, g] · (codes[r, c] − zero[r, g]), g = g_idx[c].

    codes: uint8 [out, in], values in [0, 2^bits − 1] (symmetric uses zero = 2^(bits−1)).
    scale: float32 [out, n_groups]; per-tensor is [1, 1], per-channel [out, 1]; per-group
           n_groups = ceil(in / group_size) (the last group is ragged when group_size does not
           divide in: it holds in % group_size columns).
    zero:  int32, same shape as scale.
    group_size: input columns per group (in_features for per-channel and per-tensor).
    g_idx: int32 [in] group of each input column when act-order permuted them, else None.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    sym: bool
    g_idx: torch.Tensor | None = None
    dtype: torch.dtype = torch.float16
    act: ActQuant | None = None
    # (Σ(w − x̂)², Σw²) against the weight it was rounded from, when measured while rounding
    # (quantize_to_intweight(measure=True)); never stored in a checkpoint.
    error_sums: tuple[float, float] | None = field(default=None, compare=False, repr=False)

    kind = "int"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def group_index(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx.long()
        n_in = self.codes.shape[1]
        return torch.arange(n_in, device=self.codes.device) // self.group_size

    def dequantize(self) -> torch.Tensor:
        out, n_in = self.codes.shape
        scale = self.scale.float().expand(out, -1)
        zero = self.zero.float().expand(out, -1)
        if scale.shape[1] == 1:
            return (self.codes.float() - zero) * scale
        gs, groups = self.group_size, scale.shape[1]
        if self.g_idx is None and 0 < gs < n_in and n_in % gs and groups == -(-n_in // gs):
            # Ragged last group: the whole groups through a [out, G−1, gs] view and the tail
            # columns on their own (the same arithmetic as the gather below, without it).
            full, main = groups - 1, (groups - 1) * gs
            w = torch.empty(out, n_in, dtype=torch.float32, device=self.codes.device)
            body = self.codes[:, :main].reshape(out, full, gs).float().sub_(zero[:, :full, None])
            torch.mul(body, scale[:, :full, None], out=w[:, :main].view(out, full, gs))
            torch.mul(self.codes[:, main:].float().sub_(zero[:, full:]), scale[:, full:], out=w[:, main:])
            return w
        gi = self.group_index()
        return (self.codes.float() - zero[:, gi]) * scale[:, gi]


@dataclass
class FourBitWeight:
    """bitsandbytes NF4/FP4 weight, same layout as `bitsandbytes.functional.quantize_4bit`.

    packed: uint8 [ceil(n/2), 1], two codes per byte, first element in the high nibble.
    absmax: float32 [n_blocks] (or uint8 [n_blocks] when nested/double-quantized).
    nested_absmax: float32 [ceil(n_blocks/256)], nested_code: float32 [256], offset: float32 scalar
    are set only with double quantization.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    quant_type: str
    blocksize: int
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float16
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = 256
    offset: torch.Tensor | None = None

    kind = "4bit"

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def dequantize(self) -> torch.Tensor:
        from core.fourbit import dequantize_4bit

        return dequantize_4bit(self)


@dataclass
class Fp8Weight:
    """weight: torch.float8_e4m3fn or float8_e5m2 [out, in]; scale: float32 [out, 1] or [1]."""

    weight: torch.Tensor
    scale: torch.Tensor
    fmt: str = "e4m3"
    dtype: torch.dtype = torch.float16

    kind = "fp8"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scale.float()


@dataclass
class Int8RowWeight:
    """LLM.int8(): int8 [out, in] codes with row-wise absmax scale (x̂ = codes · scb / 127).
    At inference, input columns with any |x| ≥ threshold are multiplied in 16-bit against the
    dequantized weight columns; the rest in int8 with row-wise absmax activations."""

    codes: torch.Tensor
    scb: torch.Tensor  # float32 [out]: per-row absmax
    threshold: float = 6.0
    dtype: torch.dtype = torch.float16
    outlier_counts: dict[str, int] = field(default_factory=dict)

    kind = "int8_row"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * (self.scb.float()[:, None] / 127.0)


QuantizedWeight = IntWeight | FourBitWeight | Fp8Weight | Int8RowWeight
