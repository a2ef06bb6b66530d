"""VRAM planning: per-format memory estimates, the GPU/CPU offload split, a decode-speed estimate
and the memory a quantization job needs — all without loading weights.

Every estimate is the sum of parts, and every part carries the formula shown to the user:
    weights      quantized linears at the format's bits per weight (scales, zeros, metadata
                 included); embeddings, lm_head and norms in 16-bit (GGUF: llama.cpp's own mix)
    KV cache     2 · kv_heads · head_dim · tokens · batch · bytes per attention layer, tokens capped
                 at the window on sliding-window layers; MLA as each engine stores it (planner_kv)
    activations  the live tensors of one decoder layer for a prefill chunk, plus fp32 logits
                 (llama.cpp: its compute buffer, growing with context × ubatch without flash attention)
    overhead     CUDA context and the engine's own reservations, per card
Several cards (planner_parallel): each card's own share is checked against that card's usable
memory. MoE expert offload keeps routed experts in CPU RAM and everything else on the GPU.
Decode speed: planner_decode (bandwidth at a calibrated efficiency plus kernel, routing and
all-reduce latencies). Sizes are GiB (2^30 bytes); bandwidths decimal GB/s.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from core import catalog
from core.catalog import GPUSpec
from core.formats import DEFAULT_PLAN_FORMATS, Format, Kind, Support, get_format, gguf_tensor_type, gguf_type_bpw, support
from core.param_count import ModelSpec, TensorSpec, classify, describe, from_config, text_config
from core.validate import check_config_bounds
from core.planner_decode import StageRead, decode_seconds
from core.planner_kv import (KV_DTYPES, LLAMA_CPP_MLA_LAYOUTS, kv_bytes_per_element,  # noqa: F401 - public API
                             kv_cache_layers, kv_rank_share)
from core.planner_parallel import Card, Layout, make_layout, stage_layers
from core.planner_quantize import QUANT_METHODS, quantize_memory, quantize_memory_all  # noqa: F401 - public API

log = logging.getLogger(__name__)

GIB = 2**30
ENGINES = ("transformers", "vllm", "llama.cpp")
DEFAULT_CPU_BANDWIDTH_GB_S = 50.0  # dual-channel DDR5 desktop; servers reach 200-400
DEFAULT_PCIE_BANDWIDTH_GB_S = 25.0  # PCIe 4.0 x16, effective
# vLLM's default max_num_batched_tokens for the OpenAI server (EngineArgs V1 defaults): 2048 on
# cards with less than 70 GiB, 8192 on larger ones. Its profiling run sizes activations with it.
VLLM_BATCHED_TOKENS_SMALL, VLLM_BATCHED_TOKENS_LARGE, VLLM_LARGE_CARD_GIB = 2048, 8192, 70.0
LLAMA_CPP_UBATCH = 512  # llama.cpp's default -ub (physical batch) for prompt processing
NCCL_BUFFERS_GIB = 0.25  # per card when several cards talk (NCCL/custom all-reduce buffers)


@dataclass(frozen=True)
class EngineProfile:
    name: str
    cuda_context_gib: float  # per card: CUDA context, cuBLAS workspace, engine buffers
    extra_gib: float  # per card: CUDA graphs (vLLM), ...
    extra_label: str
    fragmentation: float  # share of (KV + activations) lost to the caching allocator
    prefill_chunk: int | None  # tokens processed per prefill step (None: the whole prompt; vLLM: by card)
    embeddings_on_gpu: bool
    gpu_layers_first: bool  # offload keeps the first layers on the GPU (else the last)
    kv_follows_layer: bool  # KV of CPU-resident layers lives in CPU RAM
    offload_streams_weights: bool  # CPU-resident weights are copied over PCIe every token
    tensor_parallel: bool  # several cards read their shares in parallel


ENGINE_PROFILES: dict[str, EngineProfile] = {
    "transformers": EngineProfile("transformers", 0.5, 0.0, "", 0.10, None, True, True, False, True, False),
    "vllm": EngineProfile("vllm", 0.5, 0.5, "CUDA graphs", 0.0, 8192, True, True, False, True, True),
    "llama.cpp": EngineProfile("llama.cpp", 0.3, 0.0, "", 0.0, 512, False, False, True, False, False),
}


def _gib(n: float) -> float:
    return n / GIB


def _r(x: float, nd: int = 3) -> float:
    return round(float(x), nd)


# --- model sources ----------------------------------------------------------------------------

def load_model(model: Any) -> ModelSpec:
    """A ModelSpec from a catalog id, a model folder (safetensors headers read exactly), a
    config.json path, a config dict, a core.model_io.ModelSource or a ModelSpec."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, dict):
        check_config_bounds(text_config(model), "config")
        return from_config(model, name=str(model.get("_name_or_path") or model.get("model_type") or "config"))
    if hasattr(model, "tensors") and hasattr(model, "config") and hasattr(model, "path"):
        return _from_source(model)
    s = str(model)
    path = Path(s).expanduser()
    if path.is_dir():
        from core.model_io import open_model

        return _from_source(open_model(path, check_architecture=False))
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            from core.planner_gguf import spec_from_gguf

            return spec_from_gguf(path)
        if path.suffix != ".json":
            raise ValueError(f"{path} is not a folder, a GGUF file or a config.json; pass a model folder, "
                             "a .gguf, a config.json or a catalog id")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"corrupt {path}: {exc}; fix the JSON or re-download it") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{path} is not a JSON object; pass a model's config.json")
        check_config_bounds(text_config(cfg), str(path))
        return from_config(cfg, name=path.parent.name or path.name, where=str(path))
    if ("/" in s or s.startswith(".")) and catalog.find_model(s) is None:
        raise ValueError(f"model folder not found: {s} (pass an existing folder, a config.json or a catalog id)")
    entry = catalog.get_model(s)
    spec = from_config(entry.config, name=entry.name, source="catalog", where=f"catalog entry {entry.id}")
    if entry.notes:
        spec.notes.append(entry.notes)
    return spec


def _from_source(src: Any) -> ModelSpec:
    cfg = text_config(dict(src.config))
    where = str(Path(src.path) / "config.json")
    check_config_bounds(cfg, where)
    if not src.has_weights:
        return from_config(cfg, name=Path(src.path).name, where=where)
    from core.param_count import _moe_geometry, check_config

    check_config(cfg, where)
    n_exp, top_k, _, _ = _moe_geometry(cfg)
    fraction = top_k / n_exp if n_exp else 1.0
    tied = "lm_head.weight" not in src.tensors
    tensors = [classify(name, tuple(t.shape), tied=tied, expert_fraction=fraction, nbytes=int(t.nbytes), dtype=t.dtype)
               for name, t in src.tensors.items()]
    if tied:
        cfg = {**cfg, "tie_word_embeddings": True}
    spec = describe(cfg, tensors, name=Path(src.path).name, source="folder", exact=True, where=where)
    return spec


# --- per-format weight bytes ------------------------------------------------------------------

def _keep_bits(fmt: Format) -> float:
    """Bits of the tensors a format leaves unquantized (embeddings, lm_head, norms)."""
    return 32.0 if fmt.name == "fp32" else 16.0


def unquantized_patterns(qc: dict[str, Any] | None) -> list[str]:
    """Module patterns a checkpoint's quantization_config leaves in 16-bit: transformers'
    modules_to_not_convert (gpt-oss: attention, router, embeddings, lm_head), compressed-tensors'
    ignore ("re:" regexes or names), bitsandbytes' llm_int8_skip_modules."""
    if not qc:
        return []
    out: list[str] = []
    for key in ("modules_to_not_convert", "ignore", "llm_int8_skip_modules"):
        v = qc.get(key)
        if isinstance(v, list):
            out += [str(x) for x in v if x]
    return out


def keeps_unquantized(name: str, patterns: list[str]) -> bool:
    """Whether tensor `name` belongs to a module the patterns exclude: "re:" regex search,
    shell-style wildcards on the module path, or a dotted name / suffix / substring."""
    import fnmatch
    import re

    module = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
    for pat in patterns:
        if pat.startswith("re:"):
            if re.search(pat[3:], module) or re.search(pat[3:], name):
                return True
        elif "*" in pat:
            if fnmatch.fnmatchcase(module, pat) or fnmatch.fnmatchcase(module, pat + ".*"):
                return True
        elif module == pat or module.startswith(pat + ".") or module.endswith("." + pat) or f".{pat}." in f".{module}.":
            return True
    return False


def tensor_bits(t: TensorSpec, fmt: Format, spec: ModelSpec, sup: Support | None = None) -> float:
    """Bits per weight one tensor occupies in memory under `fmt`."""
    if fmt.kind is Kind.GGUF:
        if t.role in ("norm", "bias", "router"):
            return 32.0
        if t.role == "other" and len(t.shape) < 2:
            return 32.0
        cat = t.category
        if t.role == "embedding":
            cat = "output" if spec.tied_embeddings else "token_embd"
        elif t.role == "lm_head":
            cat = "output"
        return gguf_type_bpw(gguf_tensor_type(fmt, cat, t.layer, spec.num_layers, t.in_features, n_gqa=spec.n_gqa,
                                              n_expert=spec.n_routed_experts))
    if fmt.kind is Kind.FLOAT:
        return float(fmt.bits)
    if t.role != "linear":
        return _keep_bits(fmt)
    if sup is not None and sup.weight_bits is not None:
        return sup.weight_bits
    return fmt.bits_per_weight(t.in_features)


@dataclass
class _Costs:
    """Bytes of one format's weights and KV, split by where they can live."""

    layer_weights: list[float]  # per decoder layer, all parameters
    layer_active: list[float]  # per decoder layer, bytes read per token (MoE: top-k experts)
    layer_kv: list[float]
    embedding: float
    head: float  # lm_head (tied: a copy counted only where an engine duplicates it) + final norm + other
    quantized_params: int
    quantized_bits: float

    @property
    def weights(self) -> float:
        return sum(self.layer_weights) + self.embedding + self.head


def is_routed_expert(t: TensorSpec) -> bool:
    """A routed expert's weights (not a shared expert's): what "experts on CPU" moves."""
    n = t.name
    return t.role == "linear" and (".experts." in n or "_exps" in n) and "shared" not in n


def _weight_costs(spec: ModelSpec, fmt: Format | None, sup: Support | None
                  ) -> tuple[list[float], list[float], float, float, int, float, list[float], list[float]]:
    """Per-layer bytes (all, read per token), embedding, head, quantized params and bits, and the
    per-layer bytes of routed experts (all, read per token)."""
    L = spec.num_layers
    lw, la = [0.0] * L, [0.0] * L
    lr, lra = [0.0] * L, [0.0] * L
    emb = head = 0.0
    qp, qbits = 0, 0.0
    # Planning a checkpoint's own format keeps the modules its quantization_config excludes in 16-bit.
    keep = unquantized_patterns(spec.quantization_config) if fmt is not None and fmt.name == _stored_format(spec) else []
    for t in spec.tensors:
        if fmt is None:  # stored bytes of a real (quantized) folder
            nbytes = float(t.nbytes or 0)
        elif keep and t.role == "linear" and keeps_unquantized(t.name, keep):
            nbytes = t.numel * 2.0
        else:
            bits = tensor_bits(t, fmt, spec, sup)
            nbytes = t.numel * bits / 8
            if t.role == "linear":
                qp += t.numel
                qbits += t.numel * bits
        if 0 <= t.layer < L:
            lw[t.layer] += nbytes
            la[t.layer] += nbytes * t.active_fraction
            if is_routed_expert(t):
                lr[t.layer] += nbytes
                lra[t.layer] += nbytes * t.active_fraction
        elif t.role == "embedding":
            emb += nbytes
        else:
            head += nbytes
    return lw, la, emb, head, qp, qbits, lr, lra


def prefill_chunk(engine: str, gpu: GPUSpec | None = None) -> int | None:
    """Tokens one prefill step processes: vLLM's max_num_batched_tokens default for the card,
    llama.cpp's ubatch, None (the whole prompt) for transformers."""
    if engine == "vllm" and gpu is not None:
        large = gpu.usable_memory_gib >= VLLM_LARGE_CARD_GIB
        return VLLM_BATCHED_TOKENS_LARGE if large else VLLM_BATCHED_TOKENS_SMALL
    return ENGINE_PROFILES[engine].prefill_chunk


def activation_bytes(spec: ModelSpec, context: int, batch: int, engine: str, act_bytes: float = 2.0,
                     gpu: GPUSpec | None = None, flash_attention: bool = True) -> tuple[float, str]:
    """Peak live activations of one decoder layer during prefill, plus fp32 logits. Without
    flash attention llama.cpp's compute buffer also holds one layer's fp32 attention scores,
    ubatch × context × heads × 4 B (GiBs at 32k context)."""
    chunk_size = prefill_chunk(engine, gpu)
    tokens = batch * context if chunk_size is None else min(batch * context, chunk_size)
    H = spec.hidden_size
    if spec.mla is not None:
        q_dim = spec.num_heads * (spec.mla.qk_nope_head_dim + spec.mla.qk_rope_head_dim)
        kv_dim = spec.num_heads * (spec.mla.qk_nope_head_dim + spec.mla.v_head_dim) // 2
    else:
        q_dim = spec.num_heads * spec.head_dim
        kv_dim = spec.num_kv_heads * spec.head_dim
    if spec.is_moe:
        cfg = spec.config
        moe_i = int(cfg.get("moe_intermediate_size") or cfg.get("intermediate_size"))
        inter = max(spec.intermediate_size, moe_i * spec.experts_per_tok)
    else:
        inter = spec.intermediate_size
    attn = 2 * q_dim + 2 * kv_dim + H
    mlp = 3 * inter
    per_token = 2 * H + max(attn, mlp)
    logits = batch * spec.vocab_size * 4
    total = tokens * per_token * act_bytes + logits
    chunk = "whole prompt" if chunk_size is None else f"chunk ≤ {chunk_size}"
    formula = (f"{tokens} tokens ({chunk}) × (2×{H} hidden + max(attention {attn}, MLP 3×{inter})) × {act_bytes:g} B"
               f" + logits {batch} × {spec.vocab_size} vocab × 4 B")
    if engine == "llama.cpp" and not flash_attention:
        scores = tokens * min(context, batch * context) * spec.num_heads * 4
        total += scores
        formula += f" + attention scores {tokens} ubatch × {context} context × {spec.num_heads} heads × 4 B (no flash attention)"
    return total, formula


# --- plan results -----------------------------------------------------------------------------

@dataclass
class FormatPlan:
    format: str
    label: str
    bits_per_weight: float  # of the quantized linears (GGUF mixtures: their average)
    effective_bits_per_weight: float  # all weights, 16-bit parts included
    weights_gib: float
    weights_bytes: int
    kv_cache_gib: float
    activations_gib: float
    overhead_gib: float
    total_gib: float
    capacity_gib: float
    fits: bool  # everything on the GPU(s)
    gpu_layers: int
    cpu_layers: int
    gpu_used_gib: float
    cpu_ram_needed_gib: float
    fits_with_offload: bool
    missing_gib: float  # memory short even with offload (0 when it runs)
    decode_tokens_per_s: float | None
    native: bool
    runs: bool
    support_note: str
    formulas: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tp: int = 1
    pp: int = 1
    nodes: int = 1
    cards: list[dict[str, Any]] = field(default_factory=list)  # per-card figures (Card.to_json)
    max_card_gib: float = 0.0  # the fullest card's total
    decode_total_tokens_per_s: float | None = None  # all `batch` sequences together
    expert_offload: bool = False
    cpu_moe_layers: int = 0  # decoder layers whose routed experts live in CPU RAM
    experts_cpu_gib: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in (
            "format", "label", "bits_per_weight", "effective_bits_per_weight", "weights_gib", "weights_bytes",
            "kv_cache_gib",
            "activations_gib", "overhead_gib", "total_gib", "capacity_gib", "fits", "gpu_layers", "cpu_layers",
            "gpu_used_gib", "cpu_ram_needed_gib", "fits_with_offload", "missing_gib", "decode_tokens_per_s",
            "native", "runs", "support_note", "formulas", "notes", "tp", "pp", "nodes", "cards", "max_card_gib", "decode_total_tokens_per_s",
            "expert_offload", "cpu_moe_layers", "experts_cpu_gib")}
        return d


@dataclass
class Plan:
    model: dict[str, Any]
    gpu: dict[str, Any]
    num_gpus: int
    context: int
    batch: int
    kv_dtype: str
    engine: str
    gpu_memory_utilization: float
    cpu_ram_gib: float
    cpu_bandwidth_gb_s: float
    formats: list[FormatPlan]
    notes: list[str] = field(default_factory=list)
    layout: dict[str, Any] = field(default_factory=dict)

    def row(self, name: str) -> FormatPlan:
        fmt = get_format(name).name if name != "stored" else "stored"
        for r in self.formats:
            if r.format == fmt:
                return r
        raise KeyError(f"format {name!r} is not in this plan ({', '.join(r.format for r in self.formats)})")

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "gpu": self.gpu, "num_gpus": self.num_gpus, "context": self.context,
            "batch": self.batch, "kv_dtype": self.kv_dtype, "engine": self.engine,
            "gpu_memory_utilization": self.gpu_memory_utilization, "cpu_ram_gib": _r(self.cpu_ram_gib),
            "cpu_bandwidth_gb_s": self.cpu_bandwidth_gb_s,
            "layout": self.layout, "formats": [f.to_json() for f in self.formats], "notes": self.notes,
        }


@dataclass
class _Setup:
    spec: ModelSpec
    gpu: GPUSpec
    num_gpus: int
    context: int
    batch: int
    kv_dtype: str
    engine: str
    util: float
    cpu_ram_gib: float
    cpu_bw: float
    pcie_bw: float
    layout: Layout
    cpu_moe_layers: int = 0  # the first N decoder layers keep their routed experts in CPU RAM
    llama_cpp_mla: str = "current"
    flash_attention: bool = True


def _validate(context: int, batch: int, engine: str, num_gpus: int, util: float, kv_dtype: str) -> None:
    if not isinstance(context, int) or context <= 0:
        raise ValueError(f"context must be a positive number of tokens (e.g. 4096), got {context}")
    if not isinstance(batch, int) or batch <= 0:
        raise ValueError(f"batch must be a positive integer (e.g. 1), got {batch}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if not isinstance(num_gpus, int) or not 1 <= num_gpus <= 8:
        raise ValueError(f"num_gpus must be between 1 and 8 identical cards per machine, got {num_gpus}")
    if not 0.0 < util <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], e.g. 0.9, got {util}")
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")


def resolve_gpu(gpu: GPUSpec | str | None) -> GPUSpec:
    """A GPUSpec from a spec, a catalog id/name, or "auto" (the first detected GPU; ValueError
    when none is detected)."""
    if isinstance(gpu, GPUSpec):
        return gpu
    if gpu is None or str(gpu).lower() == "auto":
        from core.hardware import detect

        hw = detect()
        if not hw.gpus:
            raise ValueError("no GPU detected; pass a GPU from the catalog (e.g. --gpu rtx-4090; see `quantscope catalog gpus`)")
        return hw.gpus[0].spec()
    return catalog.get_gpu(str(gpu))


def resolve_gpus(gpu: GPUSpec | str | list[GPUSpec | str] | tuple[GPUSpec | str, ...] | None) -> list[GPUSpec]:
    """One GPUSpec per listed card: a spec, a catalog id, "auto", a list of them, or a
    comma-separated string ("rtx-4090,rtx-3090") for unequal cards."""
    if isinstance(gpu, (list, tuple)):
        items: list[Any] = list(gpu)
    elif isinstance(gpu, str) and "," in gpu:
        items = [x.strip() for x in gpu.split(",") if x.strip()]
    else:
        items = [gpu]
    if not items:
        raise ValueError("no GPU given; name at least one (see `quantscope catalog gpus`)")
    return [resolve_gpu(x) for x in items]


def _setup(model: Any, gpu: Any, *, context: int, batch: int, kv_dtype: str, engine: str,
           num_gpus: int, gpu_memory_utilization: float, cpu_ram_gib: float | None,
           cpu_bandwidth_gb_s: float | None, pcie_bandwidth_gb_s: float | None, tp: int | None = None,
           pp: int | None = None, nodes: int = 1, interconnect: str | None = None, expert_offload: bool = False,
           cpu_moe_layers: int | None = None, llama_cpp_mla: str = "current",
           flash_attention: bool = True) -> _Setup:
    _validate(context, batch, engine, num_gpus, gpu_memory_utilization, kv_dtype)
    if llama_cpp_mla not in LLAMA_CPP_MLA_LAYOUTS:
        raise ValueError(f"llama_cpp_mla must be one of {', '.join(LLAMA_CPP_MLA_LAYOUTS)}, got {llama_cpp_mla!r}")
    spec = load_model(model)
    qc = spec.quantization_config or {}
    if engine == "llama.cpp" and llama_cpp_mla == "current" and qc.get("mla_layout") == "pre-mla":
        llama_cpp_mla = "pre-mla"  # the GGUF header says llama.cpp will run full multi-head attention
    gpus = resolve_gpus(gpu)
    # Formats must run on every card: support is judged on the oldest one.
    g = min(gpus, key=lambda c: c.compute_capability)
    for card in gpus:
        if card.memory_gib <= 0:
            raise ValueError(f"GPU {card.name} has no memory size; use custom_gpu(memory_gib, bandwidth_gb_s)")
        if engine not in card.engines:
            raise ValueError(f"{engine} does not run on {card.name} (engines there: {', '.join(card.engines)})")
    layout = make_layout(spec, gpus, engine, num_gpus=num_gpus, tp=tp, pp=pp, nodes=nodes, interconnect=interconnect)
    n_moe = 0
    if expert_offload or cpu_moe_layers is not None:
        if not spec.is_moe:
            raise ValueError(f"{spec.name} has no routed experts; expert offload needs a mixture-of-experts model")
        L = spec.num_layers
        n_moe = L if cpu_moe_layers is None else cpu_moe_layers
        if not isinstance(n_moe, int) or not 0 <= n_moe <= L:
            raise ValueError(f"cpu_moe_layers must be between 0 and {L} (the model's decoder layers), got {cpu_moe_layers}")
    if cpu_ram_gib is None:
        from core.hardware import system_memory

        cpu_ram_gib = system_memory().available_gib
    if cpu_ram_gib < 0:
        raise ValueError(f"cpu_ram_gib must be zero or positive, got {cpu_ram_gib}")
    cpu_bw = DEFAULT_CPU_BANDWIDTH_GB_S if cpu_bandwidth_gb_s is None else float(cpu_bandwidth_gb_s)
    pcie_bw = DEFAULT_PCIE_BANDWIDTH_GB_S if pcie_bandwidth_gb_s is None else float(pcie_bandwidth_gb_s)
    if cpu_bw <= 0 or pcie_bw <= 0:
        raise ValueError("cpu and PCIe bandwidths must be positive GB/s")
    return _Setup(spec, g, layout.n_cards, context, batch, kv_dtype, engine, gpu_memory_utilization,
                  float(cpu_ram_gib), cpu_bw, pcie_bw, layout, n_moe, llama_cpp_mla, flash_attention)


def _stored_format(spec: ModelSpec) -> str:
    from core.formats import format_from_quantization_config

    qc = spec.quantization_config
    if qc and str(qc.get("quant_method", "")).lower() == "mxfp4":  # gpt-oss: MXFP4 experts
        return "mxfp4"
    return format_from_quantization_config(qc) or "stored"


def _layer_order(s: _Setup) -> list[int]:
    L = s.spec.num_layers
    return list(range(L)) if ENGINE_PROFILES[s.engine].gpu_layers_first else list(range(L - 1, -1, -1))


def most_layers_that_fit(num_layers: int, fits: Callable[[int], bool]) -> int:
    """The largest n in [0, num_layers] with fits(n), or 0 when none fits. GPU bytes only grow
    with the layers placed on it (each adds its weights, and its KV where the KV follows the
    layer), so fits is monotone and a bisection finds the same n as counting down from the top
    with O(log L) calls instead of O(L) — each call sums O(L) layers, so O(L log L) in all."""
    lo, hi = 0, num_layers
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _cards(s: _Setup, gpu_layers: list[int], lw: list[float], kv_one: list[float], share: float, emb: float,
           head: float, act_stage: float, per_card_gib: float, util: float) -> list[Card]:
    """Each card's own weights, KV, activations and overhead for the layers on the GPU(s).
    vLLM splits layers evenly over pipeline stages; llama.cpp and transformers in proportion to
    each card's memory. Embeddings sit on the first stage (when on a GPU), lm_head on the last."""
    lay, prof = s.layout, ENGINE_PROFILES[s.engine]
    L = s.spec.num_layers
    sizes = [1.0] * lay.pp if s.engine == "vllm" else [lay.stage_cards(st)[0].usable_memory_gib for st in range(lay.pp)]
    split = stage_layers(len(gpu_layers), sizes)
    on = set(gpu_layers)
    # transformers keeps the KV of CPU-resident layers on the GPU (the first card holds it)
    stray_kv = 0.0 if prof.kv_follows_layer else sum(kv_one[i] for i in range(L) if i not in on) * share
    out: list[Card] = []
    for st, idx in enumerate(split):
        layers = [gpu_layers[k] for k in idx]
        w = sum(lw[i] for i in layers) + (emb if st == 0 and prof.embeddings_on_gpu else 0.0)
        w += head if st == lay.pp - 1 else 0.0
        kv_c = sum(kv_one[i] for i in layers) * share + (stray_kv if st == 0 else 0.0)
        act_c = act_stage / lay.tp
        for g in lay.stage_cards(st):
            over = per_card_gib * GIB + prof.fragmentation * (kv_c + act_c)
            out.append(Card(len(out), g, st, layers, w / lay.tp, kv_c, act_c, over, g.usable_memory_gib * GIB * util))
    return out


def _decode(s: _Setup, cards: list[Card], gpu_layers: list[int], la: list[float], lr: list[float],
            lra: list[float], kv_one: list[float], share: float, head_read: float, cpu_moe: set[int],
            sup: Support) -> tuple[float | None, float | None, str]:
    """Per-sequence and aggregate decode tokens/s for this split (planner_decode)."""
    spec, lay, prof = s.spec, s.layout, ENGINE_PROFILES[s.engine]
    if not sup.runs or any(c.gpu.bandwidth_gb_s <= 0 for c in cards):
        return None, None, "not estimated: this GPU's bandwidth is unknown or the format does not run on it"
    L = spec.num_layers
    touched = 1.0
    if spec.is_moe:
        # Distinct experts a batch touches: each sequence picks top-k of n independently.
        k = spec.experts_per_tok / spec.n_routed_experts
        touched = (1 - (1 - k) ** s.batch) / k
    lra_b = [x * touched for x in lra]
    stages: list[StageRead] = []
    for st in range(lay.pp):
        c = cards[st * lay.tp]
        dense = sum(la[i] - lra[i] for i in c.layers) / lay.tp + c.kv
        dense += head_read / lay.tp if st == lay.pp - 1 else 0.0
        experts = sum(lra_b[i] for i in c.layers if i not in cpu_moe) / lay.tp
        stages.append(StageRead(dense, experts, c.gpu.bandwidth_gb_s, len(c.layers), sum(1 for i in c.layers if lr[i])))
    on = set(gpu_layers)
    off = [i for i in range(L) if i not in on]
    cpu_dense = sum(la[i] - lra[i] for i in off)
    if prof.kv_follows_layer:
        cpu_dense += sum(kv_one[i] for i in off) * share
    cpu_experts = sum(lra_b[i] for i in set(off) | cpu_moe)
    if off:
        stages.append(StageRead(0.0, 0.0, 1.0, len(off), sum(1 for i in off if lr[i])))
    off_bw = min(s.cpu_bw, s.pcie_bw) if prof.offload_streams_weights and off else s.cpu_bw
    seconds, formula = decode_seconds(stages, engine=s.engine, tp=lay.tp, interconnect=lay.interconnect,
                                      cpu_dense_bytes=cpu_dense, cpu_expert_bytes=cpu_experts,
                                      cpu_bandwidth_gb_s=off_bw)
    if s.batch > 1:
        formula += f"; per sequence, {s.batch} sequences per step"
    return _r(1.0 / seconds, 2), _r(s.batch / seconds, 2), formula


def _row(s: _Setup, fmt_name: str, gpu_layers: int | None) -> FormatPlan:
    spec, prof = s.spec, ENGINE_PROFILES[s.engine]
    stored = fmt_name == "stored" or (spec.quantization_config is not None and spec.exact)
    fmt: Format | None = None if stored else get_format(fmt_name)
    notes: list[str] = []
    if fmt is not None:
        sup = support(fmt, s.gpu.native_formats, s.gpu.compute_capability)
        label, name = fmt.label, fmt.name
    else:
        name = _stored_format(spec)
        gguf_type = (spec.quantization_config or {}).get("quant_method") == "gguf"
        label = "GGUF file as stored (exact tensor bytes)" if gguf_type else f"as stored ({name})"
        sup = Support(True, True, "")
        if name != "stored":
            try:
                f2 = get_format(name)
                sup = support(f2, s.gpu.native_formats, s.gpu.compute_capability)
                if sup.weight_bits is not None:  # the upcast is not modelled on real bytes
                    sup = Support(sup.native, sup.runs, sup.how + " (memory shown as stored)")
            except ValueError:
                pass
    lw_all, la_all, emb, head, qp, qbits, lr, lra = _weight_costs(spec, fmt, sup)
    lay = s.layout
    kv_one, kv_formula = kv_cache_layers(spec, s.context, s.batch, s.kv_dtype, s.engine, s.llama_cpp_mla)
    share, share_note = kv_rank_share(spec, s.engine, lay.tp, s.llama_cpp_mla)
    kv_layers = [k * share * lay.tp for k in kv_one]  # all TP ranks of a layer's stage together
    if share_note:
        notes.append(share_note)
        kv_formula += f"; × {share * lay.tp:g} under TP {lay.tp}"
    act_b = 4.0 if fmt is not None and fmt.name == "fp32" else 2.0
    smallest = min(lay.cards, key=lambda g: g.usable_memory_gib)
    act_stage, act_formula = activation_bytes(spec, s.context, s.batch, s.engine, act_b, smallest, s.flash_attention)
    act = act_stage * lay.pp  # every stage holds one layer's live activations (split over its TP ranks)
    if lay.pp > 1:
        act_formula += f"; on each of {lay.pp} stages"
    weights = sum(lw_all) + emb + head
    kv = sum(kv_layers)
    # MoE expert offload: the routed experts of the first cpu_moe_layers layers live in CPU RAM.
    cpu_moe = set(range(s.cpu_moe_layers))
    experts_cpu = sum(lr[i] for i in cpu_moe)
    lw = [lw_all[i] - (lr[i] if i in cpu_moe else 0.0) for i in range(spec.num_layers)]
    multi = lay.n_cards > 1 and s.engine != "llama.cpp"
    per_card = prof.cuda_context_gib + prof.extra_gib + (NCCL_BUFFERS_GIB if multi else 0.0)
    overhead = per_card * GIB * lay.n_cards + prof.fragmentation * (kv + act)
    over_formula = f"{lay.n_cards} card(s) × ({prof.cuda_context_gib:g} GiB CUDA context"
    if prof.extra_gib:
        over_formula += f" + {prof.extra_gib:g} GiB {prof.extra_label}"
    if multi:
        over_formula += f" + {NCCL_BUFFERS_GIB:g} GiB NCCL buffers"
    over_formula += ")"
    if prof.fragmentation:
        over_formula += f" + {prof.fragmentation:.0%} allocator fragmentation × (KV + activations)"
    total = weights + kv + act + overhead
    util = s.util if s.engine == "vllm" else 1.0
    capacity = sum(g.usable_memory_gib for g in lay.cards) * GIB * util

    # Offload split: fixed GPU parts, then whole decoder layers in the engine's order.
    L = spec.num_layers
    fixed = overhead + act + head + (emb if prof.embeddings_on_gpu else 0.0)
    cpu_fixed = (0.0 if prof.embeddings_on_gpu else emb) + experts_cpu
    order = _layer_order(s)

    def usage(n: int) -> tuple[float, float]:
        on_gpu = set(order[:n])
        gpu_b = fixed + sum(lw[i] for i in on_gpu)
        cpu_b = cpu_fixed + sum(lw[i] for i in range(L) if i not in on_gpu)
        for i in range(L):
            if i in on_gpu or not prof.kv_follows_layer:
                gpu_b += kv_layers[i]
            else:
                cpu_b += kv_layers[i]
        return gpu_b, cpu_b

    if gpu_layers is None:
        n = most_layers_that_fit(L, lambda k: usage(k)[0] <= capacity)
    else:
        if not 0 <= gpu_layers <= L:
            raise ValueError(f"gpu_layers must be between 0 and {L} (the model's decoder layers), got {gpu_layers}")
        n = gpu_layers
    gpu_b, cpu_b = usage(n)
    ram = s.cpu_ram_gib * GIB
    gpu_ok = gpu_b <= capacity
    fits = gpu_ok and n == L and cpu_b <= ram
    fits_off = gpu_ok and cpu_b <= ram
    missing = max(0.0, gpu_b - capacity) + max(0.0, cpu_b - ram)
    if not gpu_ok:
        notes.append(f"even with every decoder layer in CPU RAM the GPU needs {_gib(gpu_b):.2f} GiB "
                     f"(overhead, activations, lm_head{', embeddings' if prof.embeddings_on_gpu else ''}) "
                     f"of {_gib(capacity):.2f} GiB" if n == 0 else
                     f"{n} layers on the GPU need {_gib(gpu_b):.2f} GiB of {_gib(capacity):.2f} GiB")
    if cpu_b > ram:
        notes.append(f"the CPU side needs {_gib(cpu_b):.2f} GiB but {s.cpu_ram_gib:.2f} GiB of RAM is available")
    if not fits and fits_off:
        notes.append(f"offload: {n} of {L} decoder layers on the GPU, {L - n} in CPU RAM ({_gib(cpu_b):.2f} GiB)")

    cards = _cards(s, sorted(order[:n]), lw, kv_one, share, emb, head, act_stage, per_card, util)
    over = [c for c in cards if not c.fits]
    if over and lay.n_cards > 1:
        worst = max(over, key=lambda c: c.total - c.capacity)
        notes.append(f"card {worst.index} ({worst.gpu.name}) needs {_gib(worst.total):.2f} GiB of its "
                     f"{_gib(worst.capacity):.2f} GiB: each card must hold its own share")
        fits = fits_off = False
        missing = max(missing, max(c.total - c.capacity for c in over))
    if cpu_moe:
        fits = False  # "fits" means everything on the GPU(s); fits_with_offload says whether it runs
        notes.append(f"experts on CPU: the routed experts of {sum(1 for i in cpu_moe if lr[i])} of {L} layers stay in CPU RAM "
                     f"({_gib(experts_cpu):.2f} GiB; llama.cpp -ot exps=CPU / --n-cpu-moe {len(cpu_moe)}), "
                     "attention, dense layers and shared experts on the GPU")
    head_read = head + (emb if spec.tied_embeddings else 0.0)  # a tied lm_head reads the embedding matrix
    tps, total_tps, speed_formula = _decode(s, cards, sorted(order[:n]), la_all, lr, lra, kv_one, share, head_read,
                                            cpu_moe, sup)
    if prof.offload_streams_weights and n < L:
        notes.append(f"{s.engine} copies CPU-resident weights over PCIe every token ({s.pcie_bw:g} GB/s)")

    n_params = spec.total_params
    all_bits = 8 * weights / n_params if n_params else 0.0
    bpw = qbits / qp if qp else all_bits
    if fmt is None:
        src = "GGUF header" if spec.source == "gguf" else "safetensors headers"
        weights_formula = f"exact stored tensor bytes from the {src}: {weights:,.0f} B"
    elif fmt.kind is Kind.GGUF:
        weights_formula = (f"{qp:,} linear params × {bpw:.4f} bpw (llama.cpp {fmt.label} mix) + embeddings/lm_head "
                           "per llama.cpp rules + norms F32")
    elif fmt.kind is Kind.FLOAT:
        weights_formula = f"{n_params:,} params × {fmt.bits:g} bits / 8"
    else:
        upcast = f" (upcast to {sup.weight_bits:g}-bit on this GPU)" if sup.weight_bits else ""
        weights_formula = (f"{qp:,} linear params × {bpw:.4f} bpw{upcast} + {n_params - qp:,} params "
                           f"(embeddings, lm_head, norms) × {_keep_bits(fmt):g} bits")
    if not sup.native:
        notes.append(f"{s.gpu.name}: {sup.how}")
    if s.engine == "vllm":
        pool = capacity - (weights + act + overhead)
        if pool > 0:
            per_tok = kv / (s.context * s.batch)
            notes.append(f"vLLM claims {s.util:.0%} of each card ({_gib(capacity):.2f} GiB) and fills "
                         f"{_gib(pool):.2f} GiB with KV blocks ≈ {int(pool / per_tok):,} tokens")
    return FormatPlan(
        format=name, label=label, bits_per_weight=_r(bpw, 4), effective_bits_per_weight=_r(all_bits, 4),
        weights_gib=_r(_gib(weights)), weights_bytes=int(round(weights)), kv_cache_gib=_r(_gib(kv)), activations_gib=_r(_gib(act)),
        overhead_gib=_r(_gib(overhead)), total_gib=_r(_gib(total)), capacity_gib=_r(_gib(capacity)), fits=fits,
        gpu_layers=n, cpu_layers=L - n, gpu_used_gib=_r(_gib(gpu_b)), cpu_ram_needed_gib=_r(_gib(cpu_b)),
        fits_with_offload=fits_off, missing_gib=_r(_gib(missing)), decode_tokens_per_s=tps, native=sup.native,
        runs=sup.runs, support_note=sup.how,
        formulas={"weights": weights_formula, "kv_cache": kv_formula, "activations": act_formula,
                  "overhead": over_formula, "decode_tokens_per_s": speed_formula},
        notes=notes, tp=lay.tp, pp=lay.pp, nodes=lay.nodes, cards=[c.to_json() for c in cards],
        max_card_gib=_r(_gib(max(c.total for c in cards))), expert_offload=bool(cpu_moe),
        cpu_moe_layers=len(cpu_moe), experts_cpu_gib=_r(_gib(experts_cpu)), decode_total_tokens_per_s=total_tps,
    )


def _gpu_json(s: _Setup) -> dict[str, Any]:
    return s.gpu.to_json()  # the first card; Plan.layout lists every card


def plan(model: Any, gpu: Any = "auto", *, formats: list[str] | tuple[str, ...] | None = None,
         context: int = 4096, batch: int = 1, kv_dtype: str = "fp16", engine: str = "transformers",
         num_gpus: int = 1, gpu_memory_utilization: float = 0.9, cpu_ram_gib: float | None = None,
         cpu_bandwidth_gb_s: float | None = None, pcie_bandwidth_gb_s: float | None = None,
         **parallel: Any) -> Plan:
    """Memory, offload split and decode speed for each format (default: DEFAULT_PLAN_FORMATS).

    model: catalog id, model folder, config.json path, GGUF file, config dict or ModelSpec. A
    quantized folder (config has quantization_config) or a GGUF file is planned once, with its
    real stored bytes.
    gpu: GPUSpec, catalog id/name, "auto" for the first detected GPU, or a list / comma-separated
    string of cards ("rtx-4090,rtx-3090") for unequal cards.
    cpu_ram_gib: RAM available for offloaded layers (default: this machine's available RAM).
    parallel (keyword only): tp, pp, nodes (machines of num_gpus cards), interconnect
    ("nvlink" | "pcie" | "network"), expert_offload (routed experts in CPU RAM), cpu_moe_layers
    (only the first N layers' experts), llama_cpp_mla ("current" | "2025" | "pre-mla"),
    flash_attention (llama.cpp compute buffer).
    """
    s = _setup(model, gpu, context=context, batch=batch, kv_dtype=kv_dtype, engine=engine, num_gpus=num_gpus,
               gpu_memory_utilization=gpu_memory_utilization, cpu_ram_gib=cpu_ram_gib,
               cpu_bandwidth_gb_s=cpu_bandwidth_gb_s, pcie_bandwidth_gb_s=pcie_bandwidth_gb_s, **parallel)
    notes = list(s.spec.notes)
    if s.spec.quantization_config is not None and s.spec.exact:
        names = ["stored"]
        if formats:
            notes.append("this folder is already quantized: planned with its stored bytes; --formats ignored")
    else:
        names = [get_format(f).name for f in (formats or DEFAULT_PLAN_FORMATS)]
        own = _stored_format(s.spec) if s.spec.quantization_config is not None else "stored"
        if not formats and own != "stored" and own not in names:
            names.insert(0, own)  # a config-only quantized checkpoint: its own format first
    if s.context > int(s.spec.config.get("max_position_embeddings") or s.context):
        notes.append(f"context {s.context} exceeds the model's max_position_embeddings "
                     f"({s.spec.config['max_position_embeddings']})")
    if s.batch > 1 and s.spec.is_moe:
        notes.append("MoE with batch > 1: decode reads the distinct experts the batch touches, "
                     "n · (1 − (1 − k/n)^batch) per layer, assuming independent routing")
    if s.spec.mla is not None and s.engine == "transformers":
        notes.append("transformers caches MLA as expanded per-head K and V (≈70× the latent vLLM and llama.cpp keep)")
    rows = [_row(s, n, None) for n in names]
    return Plan(model=s.spec.to_json(), gpu=_gpu_json(s), num_gpus=s.num_gpus, context=s.context, batch=s.batch,
                kv_dtype=s.kv_dtype, engine=s.engine, gpu_memory_utilization=s.util, cpu_ram_gib=s.cpu_ram_gib,
                cpu_bandwidth_gb_s=s.cpu_bw, formats=rows, notes=notes, layout=s.layout.to_json())


def plan_offload(model: Any, gpu: Any = "auto", *, format: str = "int4_g128", gpu_layers: int,
                 context: int = 4096, batch: int = 1, kv_dtype: str = "fp16", engine: str = "transformers",
                 num_gpus: int = 1, gpu_memory_utilization: float = 0.9, cpu_ram_gib: float | None = None,
                 cpu_bandwidth_gb_s: float | None = None, pcie_bandwidth_gb_s: float | None = None,
                 **parallel: Any) -> FormatPlan:
    """One format with a user-chosen number of decoder layers on the GPU (the GUI's slider):
    GPU and CPU memory for that split, whether it fits, and the decode speed. `parallel` as in
    plan() (expert_offload / cpu_moe_layers give the "experts on CPU" view)."""
    s = _setup(model, gpu, context=context, batch=batch, kv_dtype=kv_dtype, engine=engine, num_gpus=num_gpus,
               gpu_memory_utilization=gpu_memory_utilization, cpu_ram_gib=cpu_ram_gib,
               cpu_bandwidth_gb_s=cpu_bandwidth_gb_s, pcie_bandwidth_gb_s=pcie_bandwidth_gb_s, **parallel)
    name = "stored" if s.spec.quantization_config is not None and s.spec.exact else get_format(format).name
    return _row(s, name, gpu_layers)
