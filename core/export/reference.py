"""Independent reference readers for the GPTQ and AWQ layouts, used to verify exports where the
real consumer (transformers + gptqmodel) cannot be installed.

Written from the published layouts (AutoGPTQ's and AutoAWQ's pack functions as documented), in
numpy, sharing no code with Quantscope's writers or packing primitives — a bug in the writers
therefore shows up as a mismatch instead of cancelling out.

GPTQ: bit i·b of column o's stream in `qweight` [in·b/32, out] (words little end first) starts
input row i's code; `qzeros` [G, out·b/32] likewise along the output; v1 stores zero − 1.
W[o, i] = (code − zero[g_idx[i], o]) · scales[g_idx[i], o], G = ceil(in / group_size) (a ragged
last group has in % group_size columns).

AWQ GEMM: word c of row i in `qweight` [in, out/8] holds output columns 8c + k at nibble
[0, 4, 1, 5, 2, 6, 3, 7][k]; `qzeros` alike; W[o, i] = (code − zero) · scale of group i // gs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

AWQ_NIBBLE_OF_COLUMN = np.array([0, 4, 1, 5, 2, 6, 3, 7])


def _bitstream_codes(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """words uint32 [W, cols], one little-endian bit stream per column → codes [n, cols]."""
    w = words.astype(np.uint64)
    w = np.concatenate([w, np.zeros((1, w.shape[1]), dtype=np.uint64)])  # codes may run past a word
    start = np.arange(n, dtype=np.uint64) * np.uint64(bits)
    idx = (start // np.uint64(32)).astype(np.int64)
    off = (start % np.uint64(32))[:, None]
    pair = w[idx] | (w[idx + 1] << np.uint64(32))
    return ((pair >> off) & np.uint64(2**bits - 1)).astype(np.int64)


def gptq_dequantize(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray | None,
                    bits: int, checkpoint_format: str, group_size: int | None = None) -> np.ndarray:
    """float32 [out, in] from one GPTQ module's tensors. Without g_idx, column i belongs to group
    i // group_size (config.json's group_size; the last group may be ragged, G = ceil(in / gs))."""
    n_in = qweight.shape[0] * 32 // bits
    out = scales.shape[1]
    codes = _bitstream_codes(qweight.view(np.uint32), bits, n_in)  # [in, out]
    zeros = _bitstream_codes(qzeros.view(np.uint32).T, bits, out).T  # [G, out]
    if checkpoint_format != "gptq_v2":
        zeros = zeros + 1
    if g_idx is None:
        gs = group_size if group_size is not None and group_size > 0 else n_in // scales.shape[0]
        g_idx = np.arange(n_in) // gs
    g = g_idx.astype(np.int64)
    w = (codes - zeros[g]).astype(np.float32) * scales[g].astype(np.float32)
    return w.T.copy()


def awq_dequantize(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 [out, in] from one AWQ GEMM module's tensors."""
    def unpack(words: np.ndarray) -> np.ndarray:
        u = words.view(np.uint32).astype(np.int64)
        nib = (u[:, :, None] >> (4 * np.arange(8))) & 0xF  # [rows, out/8, slot]
        return nib[:, :, AWQ_NIBBLE_OF_COLUMN].reshape(words.shape[0], -1)

    codes, zeros = unpack(qweight), unpack(qzeros)  # [in, out], [G, out]
    group = qweight.shape[0] // scales.shape[0]
    g = np.arange(qweight.shape[0]) // group
    w = (codes - zeros[g]).astype(np.float32) * scales[g].astype(np.float32)
    return w.T.copy()


def reference_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GPTQ or AWQ folder with the quantized linears dequantized to float32."""
    from safetensors.torch import load_file

    path = Path(path)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    method = qc["quant_method"]
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    # numpy for the packed integer and float16 tensors; the rest (possibly bfloat16) stays torch
    raw = {k: v.numpy() for k, v in tensors.items() if v.dtype in (torch.int32, torch.float16)}
    out: dict[str, torch.Tensor] = {}
    modules = {k[: -len(".qweight")] for k in raw if k.endswith(".qweight")}
    for m in modules:
        if method == "gptq":
            w = gptq_dequantize(raw[f"{m}.qweight"], raw[f"{m}.qzeros"], raw[f"{m}.scales"], raw.get(f"{m}.g_idx"),
                                int(qc["bits"]), str(qc.get("checkpoint_format", "gptq")),
                                int(qc.get("group_size", -1)))
        elif method == "awq":
            w = awq_dequantize(raw[f"{m}.qweight"], raw[f"{m}.qzeros"], raw[f"{m}.scales"])
        else:
            raise ValueError(f"{path}: reference reader handles gptq and awq, not {method}")
        out[f"{m}.weight"] = torch.from_numpy(w)
    for k, v in tensors.items():
        if k.rsplit(".", 1)[0] not in modules or k.endswith(".bias"):
            out[k] = v.float() if v.is_floating_point() else v
    return out


def reference_model(path: str | Path) -> torch.nn.Module:
    """A float32 transformers model holding the reference dequantization of a GPTQ/AWQ folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    config.pop("quantization_config", None)
    hf_config = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    state = reference_state_dict(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors {unexpected[:3]}")
    if [m for m in missing if m != "lm_head.weight"]:
        raise ValueError(f"{path}: tensors missing: {missing[:3]}")
    if "lm_head.weight" in missing:
        model.tie_weights()
    return model.eval()
