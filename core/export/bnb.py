"""bitsandbytes serialization: NF4/FP4 (± double quantization) and LLM.int8, exactly as
transformers saves a `load_in_4bit` / `load_in_8bit` model (checked against a real save with
transformers 5 + bitsandbytes 0.50 on CPU).

Per 4-bit linear `<m>` (QuantState.as_dict(packed=True) of bitsandbytes):
  <m>.weight                                   uint8 [ceil(n/2), 1]  packed codes, high nibble first
  <m>.weight.absmax                            float32 [n_blocks] (uint8 with double quant)
  <m>.weight.quant_map                         float32 [16] codebook
  <m>.weight.nested_absmax                     float32 [ceil(n_blocks/256)]     (double quant)
  <m>.weight.nested_quant_map                  float32 [256] dynamic map        (double quant)
  <m>.weight.quant_state.bitsandbytes__<type>  uint8 JSON: quant_type, blocksize, dtype, shape
                                               (+ nested_blocksize, nested_dtype, nested_offset)
Per LLM.int8 linear: <m>.weight int8 [out, in], <m>.SCB float32 [out] (row absmax),
<m>.weight_format uint8 scalar 0 (row-major).
"""
from __future__ import annotations

import json
from typing import Any, Callable, ClassVar

import torch

from core.config import FourBitConfig, LLMInt8Config
from core.export.base import register_exporter
from core.fourbit import codebook, dynamic_map
from core.qtensors import FourBitWeight, Int8RowWeight, QuantizedWeight

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in _DTYPES.items()}


def _json_tensor(doc: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(list(json.dumps(doc).encode("utf-8")), dtype=torch.uint8)


def _json_from_tensor(t: torch.Tensor) -> dict[str, Any]:
    return json.loads(bytes(t.to(torch.uint8).tolist()).decode("utf-8"))


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"bitsandbytes stores float32, float16 or bfloat16 weights, got {dtype}")
    return _DTYPE_NAMES[dtype]


@register_exporter
class BitsAndBytesExporter:
    name: ClassVar[str] = "bitsandbytes"
    loaders: ClassVar[str] = "transformers + bitsandbytes (load_in_4bit / load_in_8bit checkpoints)"

    def __init__(self) -> None:
        # compute dtype for the 4-bit config: the precision of the weights written so far
        self._dtype: torch.dtype | None = None

    def accepts(self, method_config: Any) -> str | None:
        if isinstance(method_config, (FourBitConfig, LLMInt8Config)):
            return None
        method = getattr(method_config, "method", type(method_config).__name__)
        return (f"the bitsandbytes layout stores only nf4, fp4 (± double quant) and llm_int8 weights, "
                f"not {method}")

    def tensors(self, name: str, q: QuantizedWeight) -> dict[str, torch.Tensor]:
        if isinstance(q, FourBitWeight):
            return self._fourbit_tensors(name, q)
        if isinstance(q, Int8RowWeight):
            self._dtype = self._dtype or q.dtype
            return {
                f"{name}.weight": q.codes.to(torch.int8).contiguous(),
                f"{name}.SCB": q.scb.float().contiguous(),
                f"{name}.weight_format": torch.tensor(0, dtype=torch.uint8),
            }
        raise ValueError(f"{name}: the bitsandbytes layout stores nf4/fp4 or llm_int8 weights, got {q.kind!r}")

    def _fourbit_tensors(self, name: str, q: FourBitWeight) -> dict[str, torch.Tensor]:
        self._dtype = self._dtype or q.dtype
        state: dict[str, Any] = {
            "quant_type": q.quant_type,
            "blocksize": q.blocksize,
            "dtype": _dtype_name(q.dtype),
            "shape": list(q.shape),
        }
        out = {
            f"{name}.weight": q.packed.to(torch.uint8).reshape(-1, 1).contiguous(),
            f"{name}.weight.absmax": q.absmax.contiguous(),
            f"{name}.weight.quant_map": codebook(q.quant_type),
        }
        if q.double_quant:
            nested_code = q.nested_code if q.nested_code is not None else dynamic_map(signed=True)
            out[f"{name}.weight.nested_absmax"] = q.nested_absmax.float().contiguous()
            out[f"{name}.weight.nested_quant_map"] = nested_code.float().contiguous()
            state.update(nested_blocksize=q.nested_blocksize, nested_dtype="float32",
                         nested_offset=float(q.offset))
        out[f"{name}.weight.quant_state.bitsandbytes__{q.quant_type}"] = _json_tensor(state)
        return out

    def quantization_config(self, method_config: Any, quantized: list[str], ignored: list[str]) -> dict:
        reason = self.accepts(method_config)
        if reason is not None:
            raise ValueError(reason)
        four = isinstance(method_config, FourBitConfig)
        compute = _DTYPE_NAMES.get(self._dtype, "float32") if self._dtype is not None else "float32"
        return {
            "quant_method": "bitsandbytes",
            "load_in_4bit": four,
            "load_in_8bit": not four,
            "_load_in_4bit": four,
            "_load_in_8bit": not four,
            "bnb_4bit_quant_type": method_config.quant_type if four else "fp4",
            "bnb_4bit_use_double_quant": bool(method_config.double_quant) if four else False,
            "bnb_4bit_compute_dtype": compute,
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_threshold": 6.0 if four else float(method_config.threshold),
            "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False,
            # modules kept in full precision; transformers must not wrap them as bnb layers
            "llm_int8_skip_modules": sorted(set(ignored)) or None,
        }

    @classmethod
    def detect(cls, quantization_config: dict) -> bool:
        return quantization_config.get("quant_method") == "bitsandbytes"

    def read_weight(
        self, name: str, get: Callable[[str], torch.Tensor | None], quantization_config: dict
    ) -> QuantizedWeight | None:
        scb = get(f"{name}.SCB")
        if scb is not None:
            codes = get(f"{name}.weight")
            if codes is None:
                raise ValueError(f"{name}.SCB is stored but {name}.weight is missing; the checkpoint is incomplete")
            return Int8RowWeight(codes=codes.to(torch.int8), scb=scb.float(),
                                 threshold=float(quantization_config.get("llm_int8_threshold", 6.0)))
        absmax = get(f"{name}.weight.absmax")
        if absmax is None:
            return None
        state_t = None
        for qt in ("nf4", "fp4"):
            state_t = get(f"{name}.weight.quant_state.bitsandbytes__{qt}")
            if state_t is not None:
                break
        packed = get(f"{name}.weight")
        if state_t is None or packed is None:
            raise ValueError(f"{name}: 4-bit tensors are incomplete (need .weight and "
                             f".weight.quant_state.bitsandbytes__nf4/fp4 beside .weight.absmax)")
        state = _json_from_tensor(state_t)
        dtype_name = state.get("dtype", "float16")
        if dtype_name not in _DTYPES:
            raise ValueError(f"{name}: unsupported 4-bit dtype {dtype_name!r} in quant_state")
        q = FourBitWeight(packed=packed.view(torch.uint8).reshape(-1, 1), absmax=absmax,
                          quant_type=state["quant_type"], blocksize=int(state["blocksize"]),
                          shape=tuple(int(d) for d in state["shape"]), dtype=_DTYPES[dtype_name])
        nested = get(f"{name}.weight.nested_absmax")
        if nested is not None:
            q.nested_absmax = nested.float()
            code = get(f"{name}.weight.nested_quant_map")
            q.nested_code = code.float() if code is not None else dynamic_map(signed=True)
            q.nested_blocksize = int(state.get("nested_blocksize", 256))
            q.offset = torch.tensor(float(state["nested_offset"]), dtype=torch.float32)
        return q
