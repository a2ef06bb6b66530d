"""compressed-tensors layout (read by transformers and vLLM).

Three on-disk formats, chosen by the weight container:

* ``pack-quantized`` — integer weight-only (``IntWeight`` without activation quantization):
  ``weight_packed`` int32 [out, ceil(in·b/32)] holding the codes as one dense little-endian bit
  stream per row, ``weight_scale`` [out, G] (per channel [out, 1], per tensor [1]),
  ``weight_shape`` int64 [2], and for asymmetric grids ``weight_zero_point`` packed the same way
  along the output dimension.
* ``int-quantized`` — W8A8 (``IntWeight`` with ``act``): ``weight`` int8 [out, in],
  ``weight_scale`` [out, 1], and ``input_scale`` [1] for static per-tensor activations.
* ``float-quantized`` — FP8 E4M3 (``Fp8Weight``): ``weight`` float8_e4m3fn, ``weight_scale``.

compressed-tensors stores signed codes (``q − 2^(b−1)``) and signed zero points; Quantscope's
codes are unsigned with an explicit zero, so the two differ by the constant offset 2^(b−1).
Its pack-quantized stream adds the same offset back before packing, so the packed bytes equal a
dense packing of Quantscope's unsigned codes.

The ``quantization_config`` block is built with compressed-tensors' own pydantic models so it
matches what the installed loader validates.
"""
from __future__ import annotations

import math
import re
import sys
from typing import Any, Callable, ClassVar

import torch

from core.config import Granularity
from core.export.base import ragged_refusal, register_exporter
from core.primitives import pack_codes, unpack_codes
from core.qtensors import ActQuant, Fp8Weight, IntWeight, QuantizedWeight

QUANT_METHOD = "compressed-tensors"
PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
FLOAT_QUANTIZED = "float-quantized"


def pack_dense_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """compressed-tensors' dense packing: unsigned codes uint8 [rows, n] (dim=1) → int32
    [rows, ceil(n·bits/32)]; code i sits at bit i·bits of the row's little-endian bit stream, so a
    code may straddle two words for 3/5/6/7 bits. dim=0 packs along the first axis instead."""
    c = codes.transpose(0, 1) if dim == 0 else codes
    n = c.shape[1]
    stream = pack_codes(c.to(torch.uint8), bits)
    words = math.ceil(n * bits / 32)
    pad = words * 4 - stream.shape[1]
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    if sys.byteorder != "little":
        stream = stream.reshape(stream.shape[0], words, 4).flip(-1).reshape(stream.shape[0], -1)
    packed = stream.contiguous().view(torch.int32)
    return (packed.transpose(0, 1) if dim == 0 else packed).contiguous()


def unpack_dense_int32(packed: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """Inverse of pack_dense_int32: int32 words → uint8 codes with `n` entries along `dim`."""
    p = packed.transpose(0, 1) if dim == 0 else packed
    stream = p.contiguous().view(torch.uint8)
    if sys.byteorder != "little":
        stream = stream.reshape(stream.shape[0], -1, 4).flip(-1).reshape(stream.shape[0], -1)
    codes = unpack_codes(stream, bits, n)
    return (codes.transpose(0, 1) if dim == 0 else codes).contiguous()


def _weight_strategy(q: IntWeight) -> str:
    out, n_in = q.shape
    if q.scale.numel() == 1:
        return "tensor"
    if q.scale.shape[1] == 1:
        return "channel"
    return "group"


def _has_act_order(q: IntWeight) -> bool:
    if q.g_idx is None:
        return False
    natural = torch.arange(q.shape[1]) // q.group_size
    return not torch.equal(q.g_idx.long(), natural)


def _args(bits: int, kind: str, sym: bool, strategy: str, group_size: int | None = None,
          dynamic: bool = False) -> dict[str, Any]:
    """One `QuantizationArgs` as compressed-tensors serialises it."""
    return {"num_bits": bits, "type": kind, "symmetric": sym, "group_size": group_size, "strategy": strategy,
            "dynamic": dynamic}


def _int_args(bits: int, sym: bool, granularity: Granularity, group_size: int) -> dict[str, Any]:
    if granularity is Granularity.GROUP and group_size > 0:
        return _args(bits, "int", sym, "group", group_size)
    if granularity is Granularity.TENSOR:
        return _args(bits, "int", sym, "tensor")
    return _args(bits, "int", sym, "channel")


@register_exporter
class CompressedTensorsExporter:
    name: ClassVar[str] = "compressed-tensors"
    loaders: ClassVar[str] = "transformers, vLLM"
    # compressed-tensors 0.20 refuses at load time ("tensor column shape must be divisble by the
    # given group_size"), and vLLM's kernels need whole groups.
    ragged_reason: ClassVar[str | None] = "transformers and vLLM refuse such checkpoints"

    def accepts(self, method_config: Any) -> str | None:
        method = method_config.method
        if method in ("nf4", "fp4"):
            return f"{method.upper()} is a bitsandbytes codebook format; compressed-tensors stores integer or FP8 grids"
        if method == "llm_int8":
            return "LLM.int8() mixed-precision outlier decomposition is a bitsandbytes format"
        if method == "fp8":
            if method_config.fmt != "e4m3":
                return "compressed-tensors float-quantized stores FP8 E4M3 only; use fmt e4m3"
            return None
        if method == "smoothquant":
            return None
        if method in ("rtn", "gptq", "awq"):
            if not method_config.sym:
                # Checked with a real load (transformers 5.x + compressed-tensors 0.20): an asymmetric
                # pack-quantized checkpoint fails on the packed zero-point's shape.
                return ("asymmetric integer weights do not load from compressed-tensors pack-quantized "
                        "in transformers; use --export gptq (or awq for 4-bit AWQ)")
            if method == "gptq" and method_config.act_order and not method_config.static_groups:
                return ("act-order without static groups needs a g_idx, which compressed-tensors no longer "
                        "supports; use --export gptq or static groups")
            return None
        return f"unknown method {method!r}"

    # --- writing -------------------------------------------------------------------------------

    def tensors(self, name: str, q: QuantizedWeight) -> dict[str, torch.Tensor]:
        if isinstance(q, Fp8Weight):
            if q.fmt != "e4m3":
                raise ValueError(f"{name}: compressed-tensors stores FP8 E4M3 only, got {q.fmt}")
            scale = q.scale.float().reshape(-1, 1) if q.scale.numel() > 1 else q.scale.float().reshape(1)
            return {f"{name}.weight": q.weight.to(torch.float8_e4m3fn).contiguous(),
                    f"{name}.weight_scale": scale.to(q.dtype).clone()}
        if not isinstance(q, IntWeight):
            raise ValueError(f"{name}: compressed-tensors cannot store a {q.kind} weight; "
                             "use --export bitsandbytes")
        if _has_act_order(q):
            raise ValueError(f"{name}: act-order g_idx cannot be stored in compressed-tensors; use --export gptq")
        strategy = _weight_strategy(q)
        if strategy == "group" and q.shape[1] % q.group_size:
            raise ValueError(ragged_refusal(self.name, name, q.shape[1], q.group_size))
        scale = q.scale.reshape(1) if strategy == "tensor" else q.scale
        scale = scale.to(q.dtype).clone()  # tensors handed to safetensors must not share memory
        if q.act is not None:
            if q.bits != 8 or not q.sym or strategy != "channel":
                raise ValueError(f"{name}: W8A8 export needs symmetric per-channel 8-bit weights, "
                                 f"got {q.bits}-bit {'sym' if q.sym else 'asym'} {strategy}")
            out = {f"{name}.weight": (q.codes.to(torch.int16) - 128).to(torch.int8).contiguous(),
                   f"{name}.weight_scale": scale}
            if q.act.scheme == "static":
                if q.act.scale is None:
                    raise ValueError(f"{name}: static activation quantization needs a calibrated scale")
                out[f"{name}.input_scale"] = q.act.scale.float().reshape(1).to(q.dtype).clone()
            return out
        out = {f"{name}.weight_packed": pack_dense_int32(q.codes, q.bits),
               f"{name}.weight_scale": scale,
               f"{name}.weight_shape": torch.tensor(list(q.shape), dtype=torch.int64)}
        if not q.sym:
            offset = 2 ** (q.bits - 1)
            if strategy == "tensor":
                out[f"{name}.weight_zero_point"] = (q.zero.reshape(1) - offset).to(torch.int8)
            else:
                zero = q.zero.expand(q.shape[0], -1).to(torch.uint8)
                out[f"{name}.weight_zero_point"] = pack_dense_int32(zero, q.bits, dim=0)
        return out

    def quantization_config(self, method_config: Any, quantized: list[str], ignored: list[str]) -> dict:
        """The `quantization_config` of config.json, spelled out as compressed-tensors'
        `QuantizationConfig.model_dump(mode="json")` writes it (a test checks that the library
        parses it back to the same config). Built by hand so that writing it does not import the
        library, which imports transformers: seconds of a streaming RTN run."""
        reason = self.accepts(method_config)
        if reason is not None:
            raise ValueError(f"compressed-tensors cannot store {method_config.method}: {reason}")
        method = method_config.method
        inputs = None
        if method == "fp8":
            fmt = FLOAT_QUANTIZED
            strategy = "channel" if Granularity(method_config.granularity) is Granularity.CHANNEL else "tensor"
            weights = _args(8, "float", True, strategy)
        elif method == "smoothquant":
            fmt = INT_QUANTIZED
            weights = _args(8, "int", True, "channel")
            if method_config.act_scheme == "dynamic":
                inputs = _args(8, "int", True, "token", dynamic=True)
            else:
                inputs = _args(8, "int", True, "tensor")
        else:
            fmt = PACK_QUANTIZED
            weights = _int_args(method_config.bits, method_config.sym, Granularity(method_config.granularity),
                                method_config.group_size)
        scheme = {"targets": ["Linear"], "weights": weights, "input_activations": inputs,
                  "output_activations": None, "format": fmt}
        return {
            "config_groups": {"group_0": scheme},
            "quant_method": QUANT_METHOD,
            "kv_cache_scheme": None,
            "format": fmt,
            "quantization_status": "compressed",
            "global_compression_ratio": None,
            "ignore": sorted(ignored),
            "moe_sparsity_config": None,
        }

    # --- reading -------------------------------------------------------------------------------

    @classmethod
    def detect(cls, quantization_config: dict) -> bool:
        return quantization_config.get("quant_method") == QUANT_METHOD

    def read_weight(
        self, name: str, get: Callable[[str], torch.Tensor | None], quantization_config: dict
    ) -> QuantizedWeight | None:
        if _ignored(name, quantization_config.get("ignore") or []):
            return None
        scheme = _scheme_for(name, quantization_config)
        if scheme is None:
            return None
        weights = scheme.get("weights") or {}
        inputs = scheme.get("input_activations")
        scale = get(f"{name}.weight_scale")
        if scale is None:
            return None
        packed = get(f"{name}.weight_packed")
        if packed is not None:
            return _read_packed(name, packed, scale, get, weights)
        weight = get(f"{name}.weight")
        if weight is None:
            raise ValueError(f"{name}: weight_scale present but no weight or weight_packed tensor")
        if weights.get("type") == "float":
            if weight.dtype != torch.float8_e4m3fn:
                raise ValueError(f"{name}: float-quantized weight must be float8_e4m3fn, got {weight.dtype}")
            fscale = scale.float().reshape(-1, 1) if scale.numel() > 1 else scale.float().reshape(1)
            return Fp8Weight(weight=weight, scale=fscale, fmt="e4m3", dtype=scale.dtype)
        if weight.dtype != torch.int8 or weights.get("num_bits") != 8:
            raise ValueError(f"{name}: int-quantized weight must be 8-bit int8, got {weight.dtype}")
        if not weights.get("symmetric", True):
            raise ValueError(f"{name}: asymmetric int-quantized weights are not supported")
        out, n_in = weight.shape
        wscale = scale.float().reshape(-1, 1)
        act = None
        if inputs is not None:
            if inputs.get("dynamic"):
                act = ActQuant(bits=int(inputs.get("num_bits", 8)), scheme="dynamic")
            else:
                input_scale = get(f"{name}.input_scale")
                if input_scale is None:
                    raise ValueError(f"{name}: static activation quantization but no input_scale tensor")
                act = ActQuant(bits=int(inputs.get("num_bits", 8)), scheme="static",
                               scale=input_scale.float().reshape(()))
        codes = (weight.to(torch.int16) + 128).to(torch.uint8)
        rows = wscale.shape[0]
        return IntWeight(codes=codes, scale=wscale, zero=torch.full((rows, 1), 128, dtype=torch.int32),
                         bits=8, group_size=n_in, sym=True, dtype=scale.dtype, act=act)


def _read_packed(
    name: str, packed: torch.Tensor, scale: torch.Tensor, get: Callable[[str], torch.Tensor | None],
    weights: dict,
) -> IntWeight:
    bits = int(weights.get("num_bits", 4))
    shape = get(f"{name}.weight_shape")
    if shape is None:
        raise ValueError(f"{name}: pack-quantized weight without weight_shape")
    out, n_in = (int(v) for v in shape.tolist())
    codes = unpack_dense_int32(packed, bits, n_in)
    strategy = weights.get("strategy") or "tensor"
    fscale = scale.float().reshape(1, 1) if strategy == "tensor" else scale.float()
    groups = fscale.shape[1]
    group_size = int(weights["group_size"]) if strategy == "group" else n_in
    sym = bool(weights.get("symmetric", True))
    offset = 2 ** (bits - 1)
    if sym:
        zero = torch.full(fscale.shape, offset, dtype=torch.int32)
    else:
        zp = get(f"{name}.weight_zero_point")
        if zp is None:
            raise ValueError(f"{name}: asymmetric pack-quantized weight without weight_zero_point")
        if strategy == "tensor":
            zero = (zp.to(torch.int32).reshape(1, 1) + offset)
        else:
            zero = unpack_dense_int32(zp, bits, out, dim=0)[:, :groups].to(torch.int32)
    return IntWeight(codes=codes, scale=fscale, zero=zero, bits=bits, group_size=group_size, sym=sym,
                     dtype=scale.dtype)


def _matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target


def _ignored(name: str, ignore: list[str]) -> bool:
    return any(_matches(name, t) for t in ignore)


def _scheme_for(name: str, quantization_config: dict) -> dict | None:
    """The config group whose targets name this module: an exact or regex match wins over the
    class target "Linear" (every module Quantscope quantizes is a Linear)."""
    groups = quantization_config.get("config_groups") or {}
    fallback = None
    for scheme in groups.values():
        if not isinstance(scheme, dict):
            continue
        targets = scheme.get("targets") or []
        if any(_matches(name, t) for t in targets):
            return scheme
        if "Linear" in targets and fallback is None:
            fallback = scheme
    return fallback
