"""A linear layer that computes with a quantized weight, so evaluation sees the real quantization
error: the dequantized weight for weight-only formats, fake-quantized activations for W8A8, and
the LLM.int8() mixed-precision decomposition for row-wise int8 weights."""
from __future__ import annotations

import torch
from torch import nn

from core.qtensors import Int8RowWeight, IntWeight, QuantizedWeight

# Input columns per exact float32 partial product in the int8 path: |Σ| ≤ 127·127·1024 < 2^24,
# so every partial sum of integer products is exactly representable.
_EXACT_CHUNK = 1024


def int8_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 quantization of activations [n, in]: (codes as float in [−127, 127],
    scale [n, 1]) with x ≈ codes · scale. All-zero rows get scale 1 (codes 0)."""
    absmax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    return torch.clamp(torch.round(x / scale), -127, 127), scale


def exact_int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [n, k] @ b [m, k]ᵀ for integer-valued float tensors with |values| ≤ 127, exact: float32
    products in chunks of 1024 columns (exact there), accumulated in float64."""
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[1], _EXACT_CHUNK):
        stop = start + _EXACT_CHUNK
        out += (a[:, start:stop].float() @ b[:, start:stop].float().T).double()
    return out


def llm_int8_matmul(
    x: torch.Tensor, codes: torch.Tensor, scb: torch.Tensor, w_dequant: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, int]:
    """LLM.int8() mixed decomposition of x [n, in] @ Wᵀ. Input columns holding any |x| ≥
    threshold are multiplied in float against the dequantized weight columns; the others in int8
    (row-wise absmax activations × int8 row-wise weights), accumulated exactly, then rescaled.
    Returns (float32 [n, out], number of outlier columns)."""
    x = x.float()
    outliers = (x.abs() >= threshold).any(dim=0)
    n_out = int(outliers.sum())
    regular = x.masked_fill(outliers[None, :], 0.0)
    xq, sx = int8_rowwise(regular)
    acc = exact_int_matmul(xq, codes.float())
    y = (acc * sx.double() * (scb.double()[None, :] / 127.0)).float()
    if n_out:
        y = y + x[:, outliers] @ w_dequant[:, outliers].float().T
    return y, n_out


class QuantLinear(nn.Module):
    """Drop-in replacement for nn.Linear built from a `core.qtensors` weight.

    The dequantized weight is computed once and kept as the (non-persistent) buffer `weight` in
    `compute_dtype`, so code that inspects `module.weight` keeps working. `outlier_columns` counts
    the LLM.int8 outlier columns seen by the last forward (0 for other formats).
    """

    def __init__(
        self,
        qweight: QuantizedWeight,
        bias: torch.Tensor | None = None,
        *,
        compute_dtype: torch.dtype = torch.float32,
        dequantized: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        w = qweight.dequantize() if dequantized is None else dequantized
        out_features, in_features = (int(d) for d in qweight.shape)
        w = w.reshape(out_features, in_features)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.qweight = qweight
        self.register_buffer("weight", w.to(compute_dtype).contiguous(), persistent=False)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias has shape {list(bias.shape)}, expected [{self.out_features}]")
            self.register_buffer("bias", bias.detach().to(compute_dtype).clone(), persistent=False)
        else:
            self.bias = None
        self._int8 = isinstance(qweight, Int8RowWeight)
        if self._int8:
            self.register_buffer("_codes", qweight.codes.to(torch.int8), persistent=False)
            self.register_buffer("_scb", qweight.scb.float(), persistent=False)
        self.outlier_columns = 0

    @property
    def format(self) -> str:
        return self.qweight.kind

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self._int8:
            flat = x.reshape(-1, self.in_features)
            y, self.outlier_columns = llm_int8_matmul(
                flat, self._codes, self._scb, self.weight, self.qweight.threshold
            )
            y = y.to(self.weight.dtype).reshape(*x.shape[:-1], self.out_features)
            if self.bias is not None:
                y = y + self.bias
            return y.to(dtype)
        h = x.to(self.weight.dtype)
        if isinstance(self.qweight, IntWeight) and self.qweight.act is not None:
            h = self.qweight.act.fake_quant(h)
        return nn.functional.linear(h, self.weight, self.bias).to(dtype)


def replace_linears(
    model: nn.Module, weights: dict[str, QuantizedWeight], *, compute_dtype: torch.dtype | None = None
) -> list[str]:
    """Replace each named nn.Linear of `model` (full module names, e.g.
    "model.layers.0.mlp.up_proj") by a QuantLinear of its quantized weight, keeping its bias.
    `compute_dtype` defaults to the replaced layer's weight dtype. Returns the replaced names."""
    done: list[str] = []
    for name, q in weights.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child, None)
        if not isinstance(linear, (nn.Linear, QuantLinear)):
            raise ValueError(f"{name} is not a linear layer of this model (found {type(linear).__name__})")
        if tuple(int(d) for d in q.shape) != (linear.out_features, linear.in_features):
            raise ValueError(
                f"quantized weight for {name} has shape {list(q.shape)} but the layer is "
                f"[{linear.out_features}, {linear.in_features}]; the checkpoint does not match its config"
            )
        dtype = compute_dtype or linear.weight.dtype
        if not dtype.is_floating_point or linear.weight.device.type == "meta":
            dtype = torch.float32
        bias = linear.bias if linear.bias is not None and linear.bias.device.type != "meta" else None
        if linear.bias is not None and bias is None:
            raise ValueError(f"{name} has a bias that was not loaded; the checkpoint lacks {name}.bias")
        module = QuantLinear(q, bias, compute_dtype=dtype)
        device = linear.weight.device if linear.weight.device.type != "meta" else torch.device("cpu")
        setattr(parent, child, module.to(device))
        done.append(name)
    return done
