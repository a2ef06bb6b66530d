"""KV-cache layouts as each engine stores them, and how tensor parallelism divides them.

GQA / MHA / sliding-window layers cache 2 · kv_heads · head_dim values per token per layer (the
window caps the tokens of sliding layers). Multi-head latent attention (DeepSeek-V2/V3/R1, Kimi-K2)
is where the engines differ:

    vllm / sglang   the compressed latent, kv_lora_rank + qk_rope_head_dim (512 + 64 = 576) per
                    token per layer, replicated on every tensor-parallel rank (the latent has no
                    head axis to split)
    llama.cpp       "current" (since PR #19067, January 2026: V-less cache): the 576-wide latent;
                    "2025" (PR #12801, April 2025, until then): K 576 + V 512;
                    "pre-mla" (GGUFs converted before MLA support, or builds before April 2025):
                    full multi-head K (qk_nope + qk_rope) and V (v_head_dim) for every head
    transformers    expanded per-head K (qk_nope + qk_rope = 192) and V (128) for all heads:
                    128 · 320 = 40,960 values per token per layer, ≈ 71× the latent

Under tensor parallelism the KV heads are divided across ranks only down to one head per rank;
with more ranks than KV heads each rank keeps one (vLLM replicates them), so the total grows.
"""
from __future__ import annotations

import math

from core.param_count import ModelSpec

KV_DTYPES = ("fp16", "bf16", "fp8", "int8")
LLAMA_CPP_MLA_LAYOUTS = ("current", "2025", "pre-mla")


def kv_bytes_per_element(kv_dtype: str, engine: str) -> float:
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    if kv_dtype in ("fp16", "bf16"):
        return 2.0
    if kv_dtype == "int8" and engine == "llama.cpp":
        return 34 / 32  # q8_0 blocks: 32 int8 + one fp16 scale
    return 1.0


def mla_width(spec: ModelSpec, engine: str, llama_cpp_mla: str = "current") -> tuple[int, str, bool]:
    """(values cached per token per layer, description, split by TP) of an MLA model."""
    m = spec.mla
    if m is None:
        raise ValueError(f"{spec.name} has no multi-head latent attention")
    if llama_cpp_mla not in LLAMA_CPP_MLA_LAYOUTS:
        raise ValueError(f"llama_cpp_mla must be one of {', '.join(LLAMA_CPP_MLA_LAYOUTS)}, got {llama_cpp_mla!r}")
    latent = m.kv_lora_rank + m.qk_rope_head_dim
    k_head, v_head = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
    expanded = spec.num_heads * (k_head + v_head)
    expanded_desc = (f"expanded MHA: {spec.num_heads} heads × ({k_head} K + {v_head} V)")
    if engine == "transformers":
        return expanded, expanded_desc + " (transformers caches per-head K and V)", True
    if engine == "llama.cpp" and llama_cpp_mla == "pre-mla":
        return expanded, expanded_desc + " (llama.cpp GGUF without MLA metadata / build before PR #12801)", True
    if engine == "llama.cpp" and llama_cpp_mla == "2025":
        return (latent + m.kv_lora_rank,
                f"MLA latent K {latent} + V {m.kv_lora_rank} (llama.cpp PR #12801 to PR #19067)", False)
    return latent, f"MLA latent: {m.kv_lora_rank} kv_lora_rank + {m.qk_rope_head_dim} rope_dim", False


def kv_rank_share(spec: ModelSpec, engine: str, tp: int, llama_cpp_mla: str = "current") -> tuple[float, str]:
    """Share of one replica's KV that each of `tp` tensor-parallel ranks holds, and why.

    tp ranks together hold tp × share: 1 when the heads divide evenly, more when heads are
    replicated (fewer KV heads than ranks) or when the MLA latent is copied to every rank."""
    if tp <= 1:
        return 1.0, ""
    if spec.mla is not None:
        _, desc, split = mla_width(spec, engine, llama_cpp_mla)
        if not split:
            return 1.0, f"the MLA latent is replicated on each of the {tp} tensor-parallel ranks"
        heads = spec.num_heads
    else:
        heads = spec.num_kv_heads
    per_rank = max(1, math.ceil(heads / tp))
    share = per_rank / heads
    if per_rank * tp > heads:
        return share, (f"{heads} KV heads on {tp} ranks: one head per rank at least, so "
                       f"{per_rank * tp / heads:g}× the KV of one replica is stored")
    return share, ""


def kv_cache_layers(spec: ModelSpec, context: int, batch: int, kv_dtype: str = "fp16",
                    engine: str = "transformers", llama_cpp_mla: str = "current") -> tuple[list[float], str]:
    """KV-cache bytes per decoder layer for one replica (no TP), and the formula."""
    b = kv_bytes_per_element(kv_dtype, engine)
    if spec.mla is not None:
        width, desc, _ = mla_width(spec, engine, llama_cpp_mla)
        per = width * context * batch * b
        formula = f"{desc} = {width} per token × {spec.num_layers} layers × {context} tokens × {batch} batch × {b:g} B"
        return [per] * spec.num_layers, formula
    full = sum(1 for k in spec.layer_types if k == "full")
    sliding = spec.num_layers - full
    w = min(context, spec.sliding_window or context)
    out = []
    for kind in spec.layer_types:
        tokens = w if kind == "sliding" else context
        out.append(2 * spec.num_kv_heads * spec.head_dim * tokens * batch * b)
    head = f"2 × {spec.num_kv_heads} kv_heads × {spec.head_dim} head_dim"
    parts = []
    if full:
        parts.append(f"{head} × {full} layers × {context} tokens")
    if sliding:
        parts.append(f"{head} × {sliding} sliding layers × min({context}, {spec.sliding_window}) tokens")
    return out, " + ".join(parts) + f" (× {batch} batch × {b:g} B)"
