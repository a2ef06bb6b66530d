"""AWQ GEMM checkpoint layout (AutoAWQ; read by transformers with gptqmodel, vLLM).

Per quantized linear (4-bit only; in/out = in/out features, G = in / group_size, which must be
whole: AutoAWQ and vLLM refuse a ragged last group, so this layout refuses it too):

* ``qweight`` int32 [in, out/8]: codes packed along the *output* dimension, eight per word in
  AWQ's interleaved order — bit slot j (bits 4j…4j+3) of word c holds output column
  8c + [0, 2, 4, 6, 1, 3, 5, 7][j].
* ``qzeros`` int32 [G, out/8]: zero points packed the same way (true zeros, no offset).
* ``scales`` float16 [G, out].

The GEMM kernels always subtract the stored zeros, so symmetric grids are written with their
constant zero 8 and ``zero_point: true``: the same function, in the one layout every AWQ
consumer reads.
"""
from __future__ import annotations

import json
from typing import Any, Callable, ClassVar

import torch

from core.config import Granularity
from core.export.base import json_sidecar, ragged_refusal, read_packed, register_exporter
from core.primitives import pack_int32, unpack_int32
from core.qtensors import IntWeight, QuantizedWeight

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


@register_exporter
class AWQExporter:
    name: ClassVar[str] = "awq"
    loaders: ClassVar[str] = "transformers (with gptqmodel), vLLM, AutoAWQ"
    # AutoAWQ's WQLinear_GEMM asserts in_features % group_size == 0 and vLLM's AWQ layer raises.
    ragged_reason: ClassVar[str | None] = "AutoAWQ's GEMM layout and vLLM refuse such checkpoints"

    def accepts(self, method_config: Any) -> str | None:
        method = method_config.method
        if method not in ("rtn", "gptq", "awq"):
            return f"the AWQ layout stores 4-bit integer weight-only grids; {method} is not one"
        if method_config.bits != 4:
            return f"the AWQ GEMM kernels are 4-bit only, not {method_config.bits}-bit (use --export gptq)"
        if Granularity(method_config.granularity) is not Granularity.GROUP:
            return "the AWQ layout needs per-group scales (e.g. --group-size 128)"
        if method == "gptq" and method_config.act_order and not method_config.static_groups:
            return "AWQ has no g_idx for act-order groups (use --export gptq)"
        return None

    def tensors(self, name: str, q: QuantizedWeight) -> dict[str, torch.Tensor]:
        if not isinstance(q, IntWeight) or q.act is not None or q.bits != 4:
            raise ValueError(f"{name}: the AWQ layout stores 4-bit integer weight-only grids")
        out_f, in_f = q.shape
        natural = torch.arange(in_f) // q.group_size
        if q.g_idx is not None and not torch.equal(q.g_idx.long(), natural):
            raise ValueError(f"{name}: act-order g_idx cannot be stored in the AWQ layout; use --export gptq")
        if out_f % 8:
            raise ValueError(f"{name}: out_features = {out_f} is not a multiple of 8, which AWQ packing needs")
        if q.scale.shape[1] > 1 and in_f % q.group_size:
            raise ValueError(ragged_refusal(self.name, name, in_f, q.group_size))
        scale = q.scale.float().expand(out_f, -1)
        zero = q.zero.expand(out_f, -1)
        return {
            f"{name}.qweight": pack_int32(q.codes.T.contiguous(), 4, axis=1, order=AWQ_ORDER),
            f"{name}.qzeros": pack_int32(zero.T.contiguous(), 4, axis=1, order=AWQ_ORDER),
            f"{name}.scales": scale.T.to(torch.float16).contiguous(),
        }

    def quantization_config(self, method_config: Any, quantized: list[str], ignored: list[str]) -> dict:
        from transformers import AwqConfig

        reason = self.accepts(method_config)
        if reason is not None:
            raise ValueError(f"AWQ layout cannot store {method_config.method}: {reason}")
        blocks = sorted({n for n in ignored if ".layers." in n})
        config = AwqConfig(bits=4, group_size=method_config.group_size, zero_point=True, version="gemm",
                           modules_to_not_convert=sorted(set(ignored)) or None).to_dict()
        config = json.loads(json.dumps(config, default=str))
        # Only the keys AWQ consumers read, under both spellings (transformers / AutoAWQ).
        keep = ("quant_method", "bits", "group_size", "zero_point", "version", "modules_to_not_convert")
        config = {k: config[k] for k in keep if k in config}
        config.update(quant_method="awq", version="gemm", w_bit=4, q_group_size=method_config.group_size)
        if blocks:
            config["modules_to_not_convert"] = sorted(set(ignored))
        return config

    def extra_files(self, quantization_config: dict) -> dict[str, str]:
        """AutoAWQ's `quant_config.json`."""
        doc = {"zero_point": quantization_config.get("zero_point", True),
               "q_group_size": quantization_config["q_group_size"], "w_bit": 4, "version": "GEMM"}
        return json_sidecar("quant_config.json", doc)

    @classmethod
    def detect(cls, quantization_config: dict) -> bool:
        return quantization_config.get("quant_method") == "awq"

    def read_weight(
        self, name: str, get: Callable[[str], torch.Tensor | None], quantization_config: dict
    ) -> QuantizedWeight | None:
        packed = read_packed(name, get, "AWQ")
        if packed is None:
            return None
        qweight, qzeros, scales = packed
        version = str(quantization_config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"{name}: AWQ version {version!r} is not supported (only gemm)")
        bits = int(quantization_config.get("bits", quantization_config.get("w_bit", 4)))
        if bits != 4:
            raise ValueError(f"{name}: AWQ GEMM checkpoints are 4-bit, config says {bits}")
        in_f = qweight.shape[0]
        groups = scales.shape[0]
        codes = unpack_int32(qweight, 4, axis=1, order=AWQ_ORDER).T.contiguous()
        zero = unpack_int32(qzeros, 4, axis=1, order=AWQ_ORDER).T.contiguous().to(torch.int32)
        group_size = in_f // groups
        sym = bool(torch.all(zero == 8)) or not quantization_config.get("zero_point", True)
        return IntWeight(codes=codes, scale=scales.float().T.contiguous(), zero=zero, bits=4,
                         group_size=group_size, sym=sym, dtype=torch.float16)
