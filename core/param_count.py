"""Describe a model's tensors from its config.json (or from real safetensors headers), so that
parameters, bytes per format, KV-cache geometry and per-layer sizes can be computed without weights.

Handles dense Llama-family models, GQA, tied embeddings, qk-norms, biases, sliding-window layer
patterns (Mistral, Gemma-2/3, Phi-3, Qwen), mixture-of-experts (Mixtral, Qwen-MoE with shared
experts, DeepSeek-V3 routed + shared experts and dense first layers) and DeepSeek's multi-head
latent attention (MLA). Synthesized tensors use Hugging Face names; routed experts are one fused
3-D tensor [experts, out, in] per projection and layer, which counts the same parameters.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class TensorSpec:
    """One weight tensor. `role`: embedding | lm_head | norm | bias | router | linear | other;
    `category`: the GGUF tensor class used for llama.cpp's type mixtures; `active_fraction`:
    share of its parameters used per token (top_k / experts for routed experts, else 1);
    `nbytes`: exact stored bytes when read from a real file, else None."""

    name: str
    shape: tuple[int, ...]
    role: str
    layer: int = -1
    category: str = "other"
    active_fraction: float = 1.0
    nbytes: int | None = None
    dtype: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def in_features(self) -> int:
        return self.shape[-1] if self.shape else 1


@dataclass(frozen=True)
class MLA:
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None


@dataclass
class ModelSpec:
    """What the planner needs to know about a model."""

    name: str
    config: dict[str, Any]
    tensors: list[TensorSpec]
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    layer_types: list[str]  # "full" | "sliding" per decoder layer
    sliding_window: int | None
    tied_embeddings: bool
    n_routed_experts: int = 0
    experts_per_tok: int = 0
    mla: MLA | None = None
    source: str = "config"  # "catalog" | "config" | "folder"
    exact: bool = False  # tensors read from safetensors headers
    quantization_config: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def active_params(self) -> float:
        return sum(t.numel * t.active_fraction for t in self.tensors)

    @property
    def exact_bytes(self) -> int | None:
        """Sum of stored tensor sizes for a real folder, None for a config-only model."""
        if not self.exact:
            return None
        return sum(t.nbytes or 0 for t in self.tensors)

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def n_gqa(self) -> int:
        return max(1, self.num_heads // max(1, self.num_kv_heads))

    def layer_tensors(self, i: int) -> list[TensorSpec]:
        return [t for t in self.tensors if t.layer == i]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "source": self.source, "exact": self.exact,
            "total_params": self.total_params, "active_params": round(self.active_params),
            "num_layers": self.num_layers, "hidden_size": self.hidden_size, "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "vocab_size": self.vocab_size,
            "tied_embeddings": self.tied_embeddings, "sliding_window": self.sliding_window,
            "sliding_layers": self.layer_types.count("sliding"), "routed_experts": self.n_routed_experts,
            "experts_per_token": self.experts_per_tok, "mla": self.mla is not None,
            "exact_bytes": self.exact_bytes, "notes": self.notes,
        }


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a config (multimodal configs nest it under text_config)."""
    inner = config.get("text_config")
    if isinstance(inner, dict) and "hidden_size" in inner:
        merged = dict(inner)
        merged.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", inner.get("tie_word_embeddings")))
        merged.setdefault("model_type", config.get("model_type"))
        return merged
    return config


def check_config(config: dict[str, Any], where: str = "config.json") -> None:
    missing = [f for f in REQUIRED_FIELDS if not isinstance(config.get(f), int) or config.get(f) <= 0]
    if not config.get("intermediate_size") and not config.get("moe_intermediate_size"):
        missing.append("intermediate_size")
    if missing:
        raise ValueError(
            f"{where} lacks {', '.join(missing)} (positive integers) needed to plan; "
            "add them or point --model at the model's full config.json"
        )


def _moe_style(cfg: dict[str, Any]) -> str:
    """"deepseek", "qwen" (moe_intermediate_size, optional shared expert), "mixtral" or ""."""
    if cfg.get("n_routed_experts"):
        return "deepseek"
    # transformers 5 serialises Qwen-MoE's num_experts as num_local_experts too; the expert size tells them apart.
    if cfg.get("num_experts") or cfg.get("num_local_experts"):
        return "qwen" if cfg.get("moe_intermediate_size") else "mixtral"
    return ""


def _moe_geometry(cfg: dict[str, Any]) -> tuple[int, int, int, int]:
    """(routed experts, experts per token, expert intermediate size, shared-expert intermediate)."""
    style = _moe_style(cfg)
    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    if style == "mixtral":
        return experts, int(cfg.get("num_experts_per_tok", 2)), int(cfg["intermediate_size"]), 0
    if style == "deepseek":
        moe_i = int(cfg["moe_intermediate_size"])
        return (int(cfg["n_routed_experts"]), int(cfg.get("num_experts_per_tok", 1)), moe_i,
                moe_i * int(cfg.get("n_shared_experts") or 0))
    if style == "qwen":
        return (experts, int(cfg.get("num_experts_per_tok", 1)), int(cfg["moe_intermediate_size"]),
                int(cfg.get("shared_expert_intermediate_size") or 0))
    return 0, 0, 0, 0


def _is_moe_layer(cfg: dict[str, Any], i: int) -> bool:
    style = _moe_style(cfg)
    if style == "mixtral":
        return True
    if style == "deepseek":
        return i >= int(cfg.get("first_k_dense_replace", 0)) and i % int(cfg.get("moe_layer_freq", 1)) == 0
    if style == "qwen":
        step = int(cfg.get("decoder_sparse_step", 1) or 1)
        return i not in (cfg.get("mlp_only_layers") or []) and (i + 1) % step == 0
    return False


def layer_types(cfg: dict[str, Any]) -> tuple[list[str], int | None]:
    """Per-layer attention kind ("full" / "sliding") and the window, following transformers'
    rules for each family."""
    n = int(cfg["num_hidden_layers"])
    window = cfg.get("sliding_window")
    mt = cfg.get("model_type", "")
    explicit = cfg.get("layer_types")
    if isinstance(explicit, list) and len(explicit) == n:
        kinds = ["sliding" if "sliding" in str(k) else "full" for k in explicit]
        return kinds, (int(window) if window and "sliding" in kinds else None)
    if not window:
        return ["full"] * n, None
    window = int(window)
    if mt.startswith("gemma3"):
        pattern = int(cfg.get("sliding_window_pattern", 6))
        return ["sliding" if (i + 1) % pattern else "full" for i in range(n)], window
    if mt == "gemma2":
        return ["sliding" if (i + 1) % 2 else "full" for i in range(n)], window
    if mt.startswith("qwen"):
        if not cfg.get("use_sliding_window", False):
            return ["full"] * n, None
        first = int(cfg.get("max_window_layers", n))
        return ["sliding" if i >= first else "full" for i in range(n)], window
    # Mistral, Phi-3 and other Llama-likes: the window applies to every layer when it is set.
    return ["sliding"] * n, window


_CATEGORY_RULES = (
    ("qkv_proj", "attn_qkv"), ("q_a_proj", "attn_q"), ("q_b_proj", "attn_q"), ("q_proj", "attn_q"),
    ("kv_a_proj", "attn_kv"), ("kv_b_proj", "attn_kv"), ("k_proj", "attn_k"), ("v_proj", "attn_v"),
    ("o_proj", "attn_output"), ("self_attn.dense", "attn_output"),
    ("gate_up_proj", "ffn_up"), ("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down"),
    (".w1.", "ffn_gate"), (".w3.", "ffn_up"), (".w2.", "ffn_down"),
)


def classify(name: str, shape: tuple[int, ...], *, tied: bool = False, expert_fraction: float = 1.0,
             nbytes: int | None = None, dtype: str | None = None) -> TensorSpec:
    """Role, layer and GGUF category of a tensor from its Hugging Face name and shape."""
    m = _LAYER_RE.search(name)
    layer = int(m.group(1)) if m else -1
    ndim = len(shape)
    category = "other"
    fraction = 1.0
    if "embed_tokens" in name or name.endswith("wte.weight"):
        role, category = "embedding", ("output" if tied else "token_embd")
    elif "lm_head" in name:
        role, category = "lm_head", "output"
    elif re.search(r"(mlp|block_sparse_moe)\.gate\.|\.router\.|shared_expert_gate|e_score_correction", name):
        role, category = "router", "router"
    elif ndim <= 1:
        role = "bias" if name.endswith(".bias") else "norm"
    elif layer >= 0:
        role = "linear"
        for pat, cat in _CATEGORY_RULES:
            if pat in name:
                category = cat
                break
        if ".experts." in name and "shared" not in name:
            fraction = expert_fraction
    else:
        role = "other"
    return TensorSpec(name, tuple(int(s) for s in shape), role, layer, category, fraction, nbytes, dtype)


def tensors_from_config(cfg: dict[str, Any]) -> list[TensorSpec]:
    """Every weight tensor the model has, synthesized from config facts."""
    H = int(cfg["hidden_size"])
    L = int(cfg["num_hidden_layers"])
    nh = int(cfg["num_attention_heads"])
    nkv = int(cfg.get("num_key_value_heads") or nh)
    hd = int(cfg.get("head_dim") or H // nh)
    V = int(cfg["vocab_size"])
    inter = int(cfg.get("intermediate_size") or 0)
    mt = cfg.get("model_type", "")
    tied = bool(cfg.get("tie_word_embeddings", False))
    attn_bias = bool(cfg.get("attention_bias", False))
    qkv_bias = attn_bias or mt in ("qwen2", "qwen2_moe")
    mlp_bias = bool(cfg.get("mlp_bias", False))
    qk_norm = mt.startswith("qwen3") or mt.startswith("gemma3")
    sandwich = mt.startswith("gemma2") or mt.startswith("gemma3")
    n_exp, top_k, moe_i, shared_i = _moe_geometry(cfg)
    fraction = top_k / n_exp if n_exp else 1.0
    mla = "kv_lora_rank" in cfg and cfg.get("kv_lora_rank")

    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (V, H))]
    for i in range(L):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (H,)), (p + "post_attention_layernorm.weight", (H,))]
        if sandwich:
            specs += [(p + "pre_feedforward_layernorm.weight", (H,)), (p + "post_feedforward_layernorm.weight", (H,))]
        a = p + "self_attn."
        if mla:
            rope, nope = int(cfg["qk_rope_head_dim"]), int(cfg["qk_nope_head_dim"])
            vd, kvr, qr = int(cfg["v_head_dim"]), int(cfg["kv_lora_rank"]), cfg.get("q_lora_rank")
            if qr:
                specs += [(a + "q_a_proj.weight", (int(qr), H)), (a + "q_a_layernorm.weight", (int(qr),)),
                          (a + "q_b_proj.weight", (nh * (nope + rope), int(qr)))]
            else:
                specs.append((a + "q_proj.weight", (nh * (nope + rope), H)))
            specs += [(a + "kv_a_proj_with_mqa.weight", (kvr + rope, H)), (a + "kv_a_layernorm.weight", (kvr,)),
                      (a + "kv_b_proj.weight", (nh * (nope + vd), kvr)), (a + "o_proj.weight", (H, nh * vd))]
        elif mt == "phi3":
            specs += [(a + "qkv_proj.weight", ((nh + 2 * nkv) * hd, H)), (a + "o_proj.weight", (H, nh * hd))]
        else:
            specs += [(a + "q_proj.weight", (nh * hd, H)), (a + "k_proj.weight", (nkv * hd, H)),
                      (a + "v_proj.weight", (nkv * hd, H)), (a + "o_proj.weight", (H, nh * hd))]
            if qkv_bias:
                specs += [(a + "q_proj.bias", (nh * hd,)), (a + "k_proj.bias", (nkv * hd,)), (a + "v_proj.bias", (nkv * hd,))]
            if attn_bias:
                specs.append((a + "o_proj.bias", (H,)))
            if qk_norm:
                specs += [(a + "q_norm.weight", (hd,)), (a + "k_norm.weight", (hd,))]
        if n_exp and _is_moe_layer(cfg, i):
            if _moe_style(cfg) == "mixtral":
                e = p + "block_sparse_moe."
                specs += [(e + "gate.weight", (n_exp, H)), (e + "experts.w1.weight", (n_exp, moe_i, H)),
                          (e + "experts.w3.weight", (n_exp, moe_i, H)), (e + "experts.w2.weight", (n_exp, H, moe_i))]
            else:
                e = p + "mlp."
                specs += [(e + "gate.weight", (n_exp, H)), (e + "experts.gate_proj.weight", (n_exp, moe_i, H)),
                          (e + "experts.up_proj.weight", (n_exp, moe_i, H)),
                          (e + "experts.down_proj.weight", (n_exp, H, moe_i))]
                if cfg.get("n_routed_experts") and cfg.get("topk_method", "noaux_tc") == "noaux_tc":
                    specs.append((e + "gate.e_score_correction_bias", (n_exp,)))
                if shared_i:
                    s = e + ("shared_experts." if cfg.get("n_routed_experts") else "shared_expert.")
                    specs += [(s + "gate_proj.weight", (shared_i, H)), (s + "up_proj.weight", (shared_i, H)),
                              (s + "down_proj.weight", (H, shared_i))]
                    if not cfg.get("n_routed_experts"):
                        specs.append((e + "shared_expert_gate.weight", (1, H)))
        else:
            m = p + "mlp."
            if mt == "phi3":
                specs += [(m + "gate_up_proj.weight", (2 * inter, H)), (m + "down_proj.weight", (H, inter))]
            else:
                specs += [(m + "gate_proj.weight", (inter, H)), (m + "up_proj.weight", (inter, H)),
                          (m + "down_proj.weight", (H, inter))]
                if mlp_bias:
                    specs += [(m + "gate_proj.bias", (inter,)), (m + "up_proj.bias", (inter,)), (m + "down_proj.bias", (H,))]
    specs.append(("model.norm.weight", (H,)))
    if not tied:
        specs.append(("lm_head.weight", (V, H)))
    return [classify(n, s, tied=tied, expert_fraction=fraction) for n, s in specs]


def describe(cfg: dict[str, Any], tensors: list[TensorSpec], *, name: str, source: str, exact: bool = False,
             where: str = "config.json") -> ModelSpec:
    """ModelSpec from a (text) config and its tensor list."""
    check_config(cfg, where)
    H = int(cfg["hidden_size"])
    nh = int(cfg["num_attention_heads"])
    kinds, window = layer_types(cfg)
    n_exp, top_k, moe_i, _ = _moe_geometry(cfg)
    mla = None
    if cfg.get("kv_lora_rank"):
        for f in ("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
            if not cfg.get(f):
                raise ValueError(f"{where} has kv_lora_rank (MLA) but lacks {f}; add it from the model's config.json")
        mla = MLA(int(cfg["kv_lora_rank"]), int(cfg["qk_rope_head_dim"]), int(cfg["qk_nope_head_dim"]),
                  int(cfg["v_head_dim"]), cfg.get("q_lora_rank"))
    notes: list[str] = []
    if cfg.get("num_nextn_predict_layers"):
        notes.append(f"{cfg['num_nextn_predict_layers']} multi-token-prediction layer(s) not counted (unused for plain decoding)")
    return ModelSpec(
        name=name, config=cfg, tensors=tensors, num_layers=int(cfg["num_hidden_layers"]), hidden_size=H,
        vocab_size=int(cfg["vocab_size"]), num_heads=nh, num_kv_heads=int(cfg.get("num_key_value_heads") or nh),
        head_dim=int(cfg.get("head_dim") or H // nh),
        intermediate_size=int(cfg.get("intermediate_size") or moe_i),
        layer_types=kinds, sliding_window=window, tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        n_routed_experts=n_exp, experts_per_tok=top_k, mla=mla, source=source, exact=exact,
        quantization_config=cfg.get("quantization_config") if isinstance(cfg.get("quantization_config"), dict) else None,
        notes=notes,
    )


def from_config(config: dict[str, Any], *, name: str = "config", source: str = "config",
                where: str = "config.json") -> ModelSpec:
    cfg = text_config(config)
    check_config(cfg, where)
    return describe(cfg, tensors_from_config(cfg), name=name, source=source, where=where)


def count_parameters(config: dict[str, Any]) -> dict[str, int]:
    """{"total", "active", "embedding", "non_embedding"} parameters of a config."""
    spec = from_config(config)
    emb = sum(t.numel for t in spec.tensors if t.role in ("embedding", "lm_head"))
    return {"total": spec.total_params, "active": round(spec.active_params), "embedding": emb,
            "non_embedding": spec.total_params - emb}
