"""GPTQ checkpoint layout (AutoGPTQ / GPTQModel; read by transformers with gptqmodel, vLLM).

Per quantized linear (in = in_features, out = out_features, b = bits, G = groups):

* ``qweight`` int32 [in·b/32, out]: the codes packed along the *input* dimension, one
  little-endian bit stream per output column (8 codes per word for 4-bit; 3-bit codes straddle
  words exactly as AutoGPTQ packs them).
* ``qzeros`` int32 [G, out·b/32]: zero points packed the same way along the output dimension.
* ``scales`` float16 [G, out].
* ``g_idx`` int32 [in]: the group of each input column (act-order permutes it).

G = ceil(in / group_size): when group_size does not divide in_features the last group is ragged
(in % group_size columns) and g_idx = column // group_size still names it, as the reference GPTQ
code and AutoGPTQ/GPTQModel's torch kernels lay it out.

Zero points: the original ("v1", ``checkpoint_format: gptq``) layout stores ``zero − 1`` and the
kernels add 1 back. A zero of 0, which asymmetric grids produce when a group has no negative
weight, cannot be stored that way (it wraps to 2^b − 1), so symmetric weights are written as v1 —
what every GPTQ consumer reads — and asymmetric weights as ``gptq_v2`` (true zeros; read by
GPTQModel and vLLM's gptq_v2 support).
"""
from __future__ import annotations

import json
from typing import Any, Callable, ClassVar

import torch

from core.config import Granularity
from core.export.base import json_sidecar, read_packed, register_exporter
from core.export.compressed_tensors import pack_dense_int32, unpack_dense_int32
from core.qtensors import IntWeight, QuantizedWeight

SUPPORTED_BITS = (2, 3, 4, 8)
V1 = "gptq"
V2 = "gptq_v2"


def checkpoint_format(sym: bool) -> str:
    return V1 if sym else V2


def _pack_columns(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8 [rows, n] → int32 [rows, n·bits/32], packed along n."""
    return pack_dense_int32(codes, bits, dim=1)


@register_exporter
class GPTQExporter:
    name: ClassVar[str] = "gptq"
    loaders: ClassVar[str] = "transformers (with gptqmodel), vLLM, GPTQModel"
    # Stores ceil(in/group_size) scale/zero rows and g_idx = column // group_size, as AutoGPTQ's
    # and GPTQModel's torch kernels allocate them (vLLM's GPTQ kernels refuse such in_features).
    ragged_reason: ClassVar[str | None] = None

    def accepts(self, method_config: Any) -> str | None:
        method = method_config.method
        if method not in ("rtn", "gptq", "awq"):
            return f"the GPTQ layout stores integer weight-only grids; {method} is not one"
        if method_config.bits not in SUPPORTED_BITS:
            return f"GPTQ kernels support {', '.join(map(str, SUPPORTED_BITS))}-bit weights, not {method_config.bits}-bit"
        if Granularity(method_config.granularity) is Granularity.TENSOR:
            return "the GPTQ layout has per-group or per-channel scales, not per-tensor"
        return None

    def tensors(self, name: str, q: QuantizedWeight) -> dict[str, torch.Tensor]:
        if not isinstance(q, IntWeight) or q.act is not None:
            raise ValueError(f"{name}: the GPTQ layout stores integer weight-only grids, got {q.kind}"
                             + (" with activation quantization" if isinstance(q, IntWeight) else ""))
        if q.bits not in SUPPORTED_BITS:
            raise ValueError(f"{name}: GPTQ supports {SUPPORTED_BITS} bits, got {q.bits}")
        out_f, in_f = q.shape
        per_word = 32 // q.bits if 32 % q.bits == 0 else 32
        for what, n in (("in_features", in_f), ("out_features", out_f)):
            if n % per_word:
                raise ValueError(f"{name}: {what} = {n} is not a multiple of {per_word}, which {q.bits}-bit "
                                 "GPTQ packing needs; skip this module")
        scale = q.scale.float().expand(out_f, -1)
        zero = q.zero.expand(out_f, -1).to(torch.int64)
        if checkpoint_format(q.sym) == V1:
            if bool((zero < 1).any()):
                raise ValueError(f"{name}: a zero point of 0 cannot be stored in GPTQ v1")
            zero = zero - 1
        return {
            f"{name}.qweight": _pack_columns(q.codes, q.bits).T.contiguous(),
            f"{name}.qzeros": _pack_columns(zero.T.contiguous().to(torch.uint8), q.bits),
            f"{name}.scales": scale.T.to(torch.float16).contiguous(),
            f"{name}.g_idx": q.group_index().to(torch.int32).contiguous(),
        }

    def quantization_config(self, method_config: Any, quantized: list[str], ignored: list[str]) -> dict:
        from transformers import GPTQConfig as HFGPTQConfig

        reason = self.accepts(method_config)
        if reason is not None:
            raise ValueError(f"GPTQ layout cannot store {method_config.method}: {reason}")
        per_group = Granularity(method_config.granularity) is Granularity.GROUP
        act_order = bool(getattr(method_config, "act_order", False))
        kwargs: dict[str, Any] = dict(
            bits=method_config.bits,
            group_size=method_config.group_size if per_group else -1,
            desc_act=act_order,
            act_group_aware=not act_order,  # transformers turns it off with desc_act and warns
            sym=bool(method_config.sym),
            checkpoint_format=checkpoint_format(bool(method_config.sym)),
            meta={"quantizer": [f"quantscope:{method_config.method}"]},
        )
        if hasattr(method_config, "damp"):
            kwargs["damp_percent"] = float(method_config.damp)
        blocks = sorted({n for n in ignored if ".layers." in n})
        if blocks:
            raise ValueError(f"the GPTQ layout quantizes every linear of a decoder layer; {blocks[0]} was "
                             "left unquantized (remove it from the skip list or use --export compressed-tensors)")
        config = json.loads(json.dumps(HFGPTQConfig(**kwargs).to_dict(), default=str))
        config["quant_method"] = "gptq"
        config["static_groups"] = bool(getattr(method_config, "static_groups", False))
        return config

    def extra_files(self, quantization_config: dict) -> dict[str, str]:
        """`quantize_config.json`, which AutoGPTQ-era tools read instead of config.json."""
        keys = ("bits", "group_size", "desc_act", "sym", "damp_percent", "true_sequential", "static_groups",
                "checkpoint_format", "meta")
        doc = {k: quantization_config[k] for k in keys if k in quantization_config}
        doc["quant_method"] = "gptq"
        return json_sidecar("quantize_config.json", doc)

    @classmethod
    def detect(cls, quantization_config: dict) -> bool:
        return quantization_config.get("quant_method") == "gptq"

    def read_weight(
        self, name: str, get: Callable[[str], torch.Tensor | None], quantization_config: dict
    ) -> QuantizedWeight | None:
        packed = read_packed(name, get, "GPTQ")
        if packed is None:
            return None
        qweight, qzeros, scales = packed
        g_idx = get(f"{name}.g_idx")  # optional: None reads as the natural column order
        bits = int(quantization_config.get("bits", 4))
        sym = bool(quantization_config.get("sym", True))
        fmt = str(quantization_config.get("checkpoint_format") or quantization_config.get("format") or V1)
        groups, out_f = scales.shape
        in_f = qweight.shape[0] * 32 // bits
        codes = unpack_dense_int32(qweight.T.contiguous(), bits, in_f)
        zero = unpack_dense_int32(qzeros, bits, out_f).to(torch.int32)
        if fmt != V2:
            zero = zero + 1
        group_size = int(quantization_config.get("group_size", -1))
        if group_size <= 0:
            group_size = in_f
        natural = torch.arange(in_f) // group_size
        gi = None
        if g_idx is not None and not torch.equal(g_idx.long(), natural):
            gi = g_idx.to(torch.int32)
        return IntWeight(codes=codes, scale=scales.float().T.contiguous(), zero=zero.T.contiguous(), bits=bits,
                         group_size=group_size, sym=sym, g_idx=gi, dtype=torch.float16)
