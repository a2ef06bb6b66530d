"""Plan from a GGUF file's header: the exact bytes of every tensor (as stored, whatever mix of
block types the file holds) and the model's shape from its metadata, without reading weights.

The header also says how llama.cpp will lay out an MLA cache: a DeepSeek-style GGUF converted
with MLA support carries `<arch>.attention.key_length_mla`; one converted before it (or by an old
converter) does not, and llama.cpp then runs full multi-head attention with a per-head K/V cache.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from core.param_count import ModelSpec, TensorSpec, describe

# GGUF tensor name (within blk.N.) → the GGUF category planner mixes use; "_exps" are routed experts.
_ROLE_BY_PREFIX = (
    ("attn_q", "attn_q"), ("attn_k", "attn_k"), ("attn_v", "attn_v"), ("attn_output", "attn_output"),
    ("attn_kv", "attn_kv"), ("attn_qkv", "attn_qkv"),
    ("ffn_gate", "ffn_gate"), ("ffn_up", "ffn_up"), ("ffn_down", "ffn_down"),
)


def _scalar(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return None
    v = f.contents()
    if isinstance(v, list):
        return max(v) if v and all(isinstance(x, (int, float)) for x in v) else (len(v) or None)
    return v


def _classify(name: str, shape: tuple[int, ...], nbytes: int, dtype: str, expert_fraction: float) -> TensorSpec:
    if name == "token_embd.weight":
        return TensorSpec(name, shape, "embedding", -1, "token_embd", 1.0, nbytes, dtype)
    if name == "output.weight":
        return TensorSpec(name, shape, "lm_head", -1, "output", 1.0, nbytes, dtype)
    m = re.match(r"blk\.(\d+)\.(.+)$", name)
    layer = int(m.group(1)) if m else -1
    rest = m.group(2) if m else name
    if "norm" in rest or len(shape) < 2:
        role = "bias" if rest.endswith(".bias") else "norm"
        return TensorSpec(name, shape, role, layer, "other", 1.0, nbytes, dtype)
    if rest.startswith("ffn_gate_inp") or rest.startswith("exp_probs"):
        return TensorSpec(name, shape, "router", layer, "router", 1.0, nbytes, dtype)
    category = next((c for p, c in _ROLE_BY_PREFIX if rest.startswith(p)), "other")
    fraction = expert_fraction if "_exps" in rest else 1.0
    return TensorSpec(name, shape, "linear" if m else "other", layer, category, fraction, nbytes, dtype)


def spec_from_gguf(path: str | Path) -> ModelSpec:
    """ModelSpec of a GGUF file: exact tensor bytes from the header, config from its metadata."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(str(path), "r")
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path} is not a readable GGUF file ({exc}); re-download it or pass a model folder") from None
    arch = _scalar(reader, "general.architecture")
    if not arch:
        raise ValueError(f"{path} has no general.architecture in its GGUF metadata")

    def meta(key: str) -> Any:
        return _scalar(reader, f"{arch}.{key}")

    layers, hidden, heads = meta("block_count"), meta("embedding_length"), meta("attention.head_count")
    missing = [k for k, v in (("block_count", layers), ("embedding_length", hidden), ("attention.head_count", heads))
               if not v]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(f'{arch}.{k}' for k in missing)} in its GGUF metadata")
    n_exp, used = int(meta("expert_count") or 0), int(meta("expert_used_count") or 0)
    fraction = used / n_exp if n_exp else 1.0
    tensors = []
    vocab = 0
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(list(t.shape)))  # GGUF lists ne0 (the row) first
        if t.name == "token_embd.weight":
            vocab = shape[0]
        tensors.append(_classify(t.name, shape, int(t.n_bytes), t.tensor_type.name, fraction))
    names = {t.name for t in tensors}
    key_len = meta("attention.key_length")
    cfg: dict[str, Any] = {
        "model_type": str(arch), "hidden_size": int(hidden), "num_hidden_layers": int(layers),
        "num_attention_heads": int(heads), "num_key_value_heads": int(meta("attention.head_count_kv") or heads),
        "vocab_size": int(vocab or _scalar(reader, "tokenizer.ggml.tokens") or 0),
        "intermediate_size": int(meta("feed_forward_length") or 0),
        "max_position_embeddings": int(meta("context_length") or 0) or None,
        "tie_word_embeddings": "output.weight" not in names,
    }
    if key_len and not meta("attention.kv_lora_rank"):
        cfg["head_dim"] = int(key_len)
    if meta("attention.sliding_window"):
        cfg["sliding_window"] = int(meta("attention.sliding_window"))
    if n_exp:
        cfg.update(num_experts=n_exp, num_experts_per_tok=used,
                   moe_intermediate_size=int(meta("expert_feed_forward_length") or cfg["intermediate_size"]))
    notes = []
    mla_layout = None
    if meta("attention.kv_lora_rank"):
        rope = int(meta("rope.dimension_count") or 64)
        k_mla, v_mla = meta("attention.key_length_mla"), meta("attention.value_length_mla")
        k_full = int(k_mla or key_len or 192)
        cfg.update(kv_lora_rank=int(meta("attention.kv_lora_rank")), qk_rope_head_dim=rope,
                   qk_nope_head_dim=k_full - rope, v_head_dim=int(v_mla or meta("attention.value_length") or 128),
                   q_lora_rank=meta("attention.q_lora_rank"))
        if not k_mla:
            mla_layout = "pre-mla"
            notes.append("this GGUF predates llama.cpp's MLA support (no key_length_mla): llama.cpp caches full "
                         "per-head K and V; re-convert it for the latent cache")
    qtype = _scalar(reader, "general.file_type")
    cfg["quantization_config"] = {"quant_method": "gguf", "file_type": qtype, "mla_layout": mla_layout}
    spec = describe(cfg, tensors, name=path.name, source="gguf", exact=True, where=str(path))
    spec.notes += notes
    return spec
