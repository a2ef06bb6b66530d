"""The weight-format registry: what each storage format costs in bits per weight (codes plus
scales, zeros and block metadata), which hardware datatypes its matmuls use, and what an engine
does on a GPU that cannot run it natively.

Everything here is data plus small pure functions; the planner, the exporters and the GUI read it.
Names are stable identifiers (lower-case); `label` is for people.

Bits per weight (bpw) for a weight matrix with rows of `in_features` columns:
    bpw = bits + (scale_bits + zero_bits) / group            (group formats, bitsandbytes, MX)
    bpw = bits + (scale_bits + zero_bits) · ceil(in/group) / in  (integer groups with a ragged last group)
    bpw = bits + (scale_bits + zero_bits) / in_features      (per-output-row formats: group_size None)
    bpw = 8 · block_bytes / block_elements                   (GGUF block types)
NF4 with double quantization stores 8-bit absmax codes per 64-block plus one fp32 scale per 256
absmax codes: 4 + 8/64 + 32/(64·256).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from enum import Enum


class Kind(str, Enum):
    FLOAT = "float"  # plain IEEE/bfloat storage, no scales
    FP8 = "fp8"  # 8-bit float codes with a per-channel scale
    INT = "int"  # affine integer codes, per-channel or per-group scales (GPTQ/AWQ/compressed-tensors)
    NF = "nf"  # bitsandbytes NF4 codebook, blockwise absmax
    GGUF = "gguf"  # llama.cpp block types (and file-type mixtures of them)
    MICROSCALING = "microscaling"  # OCP MX / NVIDIA NVFP4: small float codes, shared block scale


@dataclass(frozen=True)
class Fallback:
    """What an engine does with this format on a GPU whose compute capability is at least
    `min_cc` but which lacks the format's native datatype. `weight_bits` is the bits per weight
    the weights then occupy in GPU memory (None: unchanged, the kernel dequantizes on the fly)."""

    min_cc: float
    how: str
    weight_bits: float | None = None


@dataclass(frozen=True)
class Format:
    name: str
    label: str
    bits: float  # bits of one code
    kind: Kind
    signed: bool
    group_size: int | None  # weights sharing a scale; None = one scale per output row; 0 = no scale
    scale_bits: int = 0
    zero_bits: int = 0
    # Extra bits per group beyond scale/zero (NF4 double quant: the nested fp32 scale, amortised).
    extra_bits_per_group: float = 0.0
    # Hardware datatypes the matmul can run in; the GPU runs the format natively if it lists any.
    compute: tuple[str, ...] = ()
    weight_only: bool = True  # activations stay 16-bit
    # Whether embeddings and lm_head are stored in this format too (GGUF) or kept 16-bit.
    quantizes_embeddings: bool = False
    gguf_type: str | None = None  # base GGML block type for GGUF formats
    mixture: bool = False  # GGUF file type mixing several block types (see gguf_tensor_type)
    fallbacks: tuple[Fallback, ...] = ()
    description: str = ""
    aliases: tuple[str, ...] = field(default=())

    def bits_per_weight(self, in_features: int | None = None) -> float:
        """Bits per weight including scales, zeros and metadata, for a matrix whose rows have
        `in_features` columns (only per-row formats depend on it; None means 4096). GGUF mixtures
        return their base type here; use `gguf_tensor_type` per tensor for the real mix."""
        if self.kind is Kind.GGUF:
            return gguf_type_bpw(self.gguf_type or "F16")
        if self.group_size == 0:
            return float(self.bits)
        group = self.group_size if self.group_size is not None else (in_features or 4096)
        meta = self.scale_bits + self.zero_bits + self.extra_bits_per_group
        if self.kind is Kind.INT and in_features and in_features % group:
            # Integer groups run along each row: a group size that does not divide the row
            # leaves a ragged last group, so a row holds ceil(in / group) scales (fewer columns
            # share the last one). NF4/MX blocks are amortised over the flat tensor instead.
            return self.bits + meta * -(-in_features // group) / in_features
        return self.bits + meta / group

    @property
    def bpw(self) -> float:
        """Nominal bits per weight (per-row formats at 4096 columns)."""
        return self.bits_per_weight()

    def to_json(self) -> dict:
        return {
            "name": self.name, "label": self.label, "bits": self.bits, "kind": self.kind.value,
            "signed": self.signed, "group_size": self.group_size, "scale_bits": self.scale_bits,
            "zero_bits": self.zero_bits, "bits_per_weight": round(self.bpw, 6),
            "compute": list(self.compute), "weight_only": self.weight_only,
            "quantizes_embeddings": self.quantizes_embeddings, "gguf_type": self.gguf_type,
            "mixture": self.mixture, "description": self.description,
        }


# GGML block types: (elements per block, bytes per block), as in gguf-py's GGML_QUANT_SIZES.
GGUF_TYPES: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
    "IQ4_NL": (32, 18),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
    "Q8_K": (256, 292),
    # i-quants (llama.cpp ggml-common.h block_iq*): lattice codebooks, 256-weight super-blocks
    "IQ1_S": (256, 50), "IQ1_M": (256, 56), "IQ2_XXS": (256, 66), "IQ2_XS": (256, 74), "IQ2_S": (256, 82),
    "IQ3_XXS": (256, 98), "IQ3_S": (256, 110), "IQ4_XS": (256, 136),
    "MXFP4": (32, 17),  # gpt-oss GGUFs: 32 E2M1 codes + one E8M0 scale
}


def gguf_type_bpw(type_name: str) -> float:
    block, nbytes = GGUF_TYPES[type_name]
    return 8.0 * nbytes / block


# Formats computed in 16-bit after an in-kernel dequantization (weight-only): any GPU with
# FP16 runs them at full speed; Pascal P40 (slow FP16) dequantizes to FP32 instead.
_WEIGHT_ONLY_16 = ("fp16", "bf16")
_PASCAL_FP32 = Fallback(6.0, "kernel dequantizes to FP32 (this GPU has no fast FP16): runs, slower prefill")

_GGUF_FALLBACKS = (Fallback(6.0, "llama.cpp dequantizes blocks in its kernels (FP32 math on this GPU): runs, slower prefill"),)

_FP4_FALLBACKS = (
    Fallback(8.0, "weight-only FP4 via the Marlin kernel (W4A16): same weight memory, 16-bit matmuls"),
    Fallback(0.0, "no kernel for this GPU: weights are upcast to 16-bit at load", 16.0),
)


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("fp32", "FP32", 32, Kind.FLOAT, True, 0, compute=("fp32",), weight_only=False,
           description="IEEE float32; every CUDA GPU runs it (slowly: no tensor cores before TF32)."),
    Format("bf16", "BF16", 16, Kind.FLOAT, True, 0, compute=("bf16",), weight_only=False,
           fallbacks=(Fallback(6.0, "no BF16 on this GPU: engines load the weights as FP16 (values above 65504 overflow) "
                               "or FP32 (twice the memory); memory shown for FP16"),),
           description="bfloat16, the usual checkpoint dtype; needs Ampere (sm80) or newer.", aliases=("bfloat16",)),
    Format("fp16", "FP16", 16, Kind.FLOAT, True, 0, compute=("fp16",), weight_only=False,
           fallbacks=(Fallback(6.0, "no fast FP16 on this GPU: matmuls run at FP32 speed (1/64 rate FP16 on P40)"),),
           description="IEEE float16.", aliases=("float16", "half")),
    Format("fp8", "FP8 E4M3", 8, Kind.FP8, True, None, scale_bits=32, compute=("fp8",), weight_only=False,
           fallbacks=(
               # vLLM's FP8 Marlin path runs from Turing (sm75) on: weights stay 1 byte.
               Fallback(7.5, "weight-only FP8 via the Marlin kernel (W8A16, vLLM): same weight memory, 16-bit matmuls"),
               Fallback(0.0, "no FP8 kernel before Turing: weights are upcast to 16-bit at load", 16.0),
           ),
           description="float8 e4m3 weights and activations with a per-channel fp32 weight scale (W8A8); "
                       "native on Ada (sm89), Hopper and Blackwell.", aliases=("fp8_e4m3", "float8")),
    Format("int8", "INT8 (W8A8)", 8, Kind.INT, True, None, scale_bits=16, compute=("int8",), weight_only=False,
           fallbacks=(Fallback(6.0, "no INT8 tensor cores: dequantized to 16-bit in the kernel (W8A16)"),),
           description="int8 weights, per-channel 16-bit scale, int8 activations (SmoothQuant / LLM.int8 style)."),
    Format("int4_g128", "INT4 g128 (sym)", 4, Kind.INT, True, 128, scale_bits=16, compute=_WEIGHT_ONLY_16,
           fallbacks=(_PASCAL_FP32,),
           description="4-bit symmetric integer weights, one fp16 scale per 128 columns (GPTQ/AWQ/compressed-tensors), "
                       "weight-only.", aliases=("int4", "w4a16")),
    Format("int4_g128_asym", "INT4 g128 (asym)", 4, Kind.INT, False, 128, scale_bits=16, zero_bits=4,
           compute=_WEIGHT_ONLY_16, fallbacks=(_PASCAL_FP32,),
           description="4-bit asymmetric integer weights: fp16 scale and a 4-bit packed zero point per 128 columns."),
    Format("int3_g128", "INT3 g128 (sym)", 3, Kind.INT, True, 128, scale_bits=16, compute=_WEIGHT_ONLY_16,
           fallbacks=(_PASCAL_FP32,),
           description="3-bit symmetric integer weights, one fp16 scale per 128 columns, weight-only.", aliases=("int3",)),
    Format("nf4", "NF4 (bs64)", 4, Kind.NF, True, 64, scale_bits=32, compute=_WEIGHT_ONLY_16,
           fallbacks=(_PASCAL_FP32,),
           description="bitsandbytes NormalFloat4: 16-value codebook, fp32 absmax per 64 weights."),
    Format("nf4_dq", "NF4 + double quant", 4, Kind.NF, True, 64, scale_bits=8, extra_bits_per_group=32 / 256,
           compute=_WEIGHT_ONLY_16, fallbacks=(_PASCAL_FP32,),
           description="NF4 whose absmax values are themselves quantized to 8 bits in blocks of 256 "
                       "(one fp32 scale each).", aliases=("nf4+dq", "nf4-dq")),
    Format("q8_0", "GGUF Q8_0", 8, Kind.GGUF, True, 32, compute=("int8", "fp16"), quantizes_embeddings=True,
           gguf_type="Q8_0", fallbacks=_GGUF_FALLBACKS, description="llama.cpp: 32 int8 codes + fp16 scale per block."),
    Format("q6_k", "GGUF Q6_K", 6, Kind.GGUF, True, 256, compute=("int8", "fp16"), quantizes_embeddings=True,
           gguf_type="Q6_K", fallbacks=_GGUF_FALLBACKS,
           description="llama.cpp k-quant: 256-weight super-blocks of 16×16, 8-bit sub-scales, fp16 scale."),
    Format("q5_k_m", "GGUF Q5_K_M", 5, Kind.GGUF, True, 256, compute=("int8", "fp16"), quantizes_embeddings=True,
           gguf_type="Q5_K", mixture=True, fallbacks=_GGUF_FALLBACKS,
           description="Q5_K everywhere except output (Q6_K) and attn_v / ffn_down in the first and last eighth "
                       "and every third layer between (Q6_K)."),
    Format("q4_k_m", "GGUF Q4_K_M", 4, Kind.GGUF, True, 256, compute=("int8", "fp16"), quantizes_embeddings=True,
           gguf_type="Q4_K", mixture=True, fallbacks=_GGUF_FALLBACKS,
           description="Q4_K everywhere except output (Q6_K) and attn_v / ffn_down in the first and last eighth "
                       "and every third layer between (Q6_K)."),
    Format("q3_k_m", "GGUF Q3_K_M", 3, Kind.GGUF, True, 256, compute=("int8", "fp16"), quantizes_embeddings=True,
           gguf_type="Q3_K", mixture=True, fallbacks=_GGUF_FALLBACKS,
           description="Q3_K base; attn_v Q5_K in the first two layers then Q4_K; attn_output Q4_K; ffn_down Q5_K "
                       "in the first 1/16 of layers then Q4_K; output Q6_K."),
    Format("q2_k", "GGUF Q2_K", 2, Kind.GGUF, True, 256, compute=("int8", "fp16"), quantizes_embeddings=True,
           gguf_type="Q2_K", mixture=True, fallbacks=_GGUF_FALLBACKS,
           description="Q2_K base; attn_v Q4_K (GQA ≥ 4) or Q3_K; ffn_down and attn_output Q3_K; output Q6_K."),
    Format("q4_0", "GGUF Q4_0", 4.5, Kind.GGUF, True, 32, compute=("int8", "fp16"), quantizes_embeddings=True,
           gguf_type="Q4_0", fallbacks=_GGUF_FALLBACKS,
           description="llama.cpp legacy: 32 4-bit codes + one fp16 scale per block; output Q6_K (llama-bench's model)."),
    Format("iq1_s", "GGUF IQ1_S", 1.5625, Kind.GGUF, True, 256, compute=("int8", "fp16"), quantizes_embeddings=True,
           gguf_type="IQ1_S", fallbacks=_GGUF_FALLBACKS,
           description="llama.cpp i-quant: 1.5625 bpw (50 B per 256 weights); needs an importance matrix. "
                       "Planned as IQ1_S everywhere with output Q6_K (llama.cpp's real mix bumps a few tensors)."),
    Format("iq1_m", "GGUF IQ1_M", 1.75, Kind.GGUF, True, 256, compute=("int8", "fp16"), quantizes_embeddings=True,
           gguf_type="IQ1_M", fallbacks=_GGUF_FALLBACKS, description="llama.cpp i-quant: 1.75 bpw (56 B per 256)."),
    Format("iq2_xxs", "GGUF IQ2_XXS", 2.0625, Kind.GGUF, True, 256, compute=("int8", "fp16"),
           quantizes_embeddings=True, gguf_type="IQ2_XXS", fallbacks=_GGUF_FALLBACKS,
           description="llama.cpp i-quant: 2.0625 bpw (66 B per 256)."),
    Format("iq2_xs", "GGUF IQ2_XS", 2.3125, Kind.GGUF, True, 256, compute=("int8", "fp16"), quantizes_embeddings=True,
           gguf_type="IQ2_XS", fallbacks=_GGUF_FALLBACKS, description="llama.cpp i-quant: 2.3125 bpw (74 B per 256)."),
    Format("iq2_s", "GGUF IQ2_S", 2.5625, Kind.GGUF, True, 256, compute=("int8", "fp16"), quantizes_embeddings=True,
           gguf_type="IQ2_S", fallbacks=_GGUF_FALLBACKS, description="llama.cpp i-quant: 2.5625 bpw (82 B per 256)."),
    Format("iq3_xxs", "GGUF IQ3_XXS", 3.0625, Kind.GGUF, True, 256, compute=("int8", "fp16"),
           quantizes_embeddings=True, gguf_type="IQ3_XXS", fallbacks=_GGUF_FALLBACKS,
           description="llama.cpp i-quant: 3.0625 bpw (98 B per 256)."),
    Format("iq3_s", "GGUF IQ3_S", 3.4375, Kind.GGUF, True, 256, compute=("int8", "fp16"), quantizes_embeddings=True,
           gguf_type="IQ3_S", fallbacks=_GGUF_FALLBACKS, description="llama.cpp i-quant: 3.4375 bpw (110 B per 256)."),
    Format("iq4_xs", "GGUF IQ4_XS", 4.25, Kind.GGUF, True, 256, compute=("int8", "fp16"), quantizes_embeddings=True,
           gguf_type="IQ4_XS", fallbacks=_GGUF_FALLBACKS,
           description="llama.cpp i-quant: 4.25 bpw (136 B per 256): non-linear 4-bit grid, 6-bit sub-scales."),
    Format("iq4_nl", "GGUF IQ4_NL", 4.5, Kind.GGUF, True, 32, compute=("int8", "fp16"), quantizes_embeddings=True,
           gguf_type="IQ4_NL", fallbacks=_GGUF_FALLBACKS,
           description="llama.cpp: non-linear 4-bit grid, 32-weight blocks with an fp16 scale (4.5 bpw)."),
    Format("mxfp4", "MXFP4", 4, Kind.MICROSCALING, True, 32, scale_bits=8, compute=("fp4",),
           fallbacks=_FP4_FALLBACKS,
           description="OCP MX: E2M1 codes, one E8M0 (power-of-two) scale per 32 weights; native on Blackwell."),
    Format("nvfp4", "NVFP4", 4, Kind.MICROSCALING, True, 16, scale_bits=8, compute=("fp4",),
           fallbacks=_FP4_FALLBACKS,
           description="NVIDIA FP4: E2M1 codes, one FP8 E4M3 scale per 16 weights plus a per-tensor fp32 scale; "
                       "native on Blackwell."),
    Format("fp6", "FP6 (MXFP6)", 6, Kind.MICROSCALING, True, 32, scale_bits=8, compute=("fp6",),
           fallbacks=(
               Fallback(7.0, "weight-only FP6 kernel (FP6-LLM style, W6A16): same weight memory, 16-bit matmuls"),
               Fallback(0.0, "no FP6 kernel for this GPU: weights are upcast to 16-bit at load", 16.0),
           ),
           description="OCP MXFP6 (E3M2/E2M3 codes, E8M0 scale per 32 weights); native on Blackwell."),
)}

DEFAULT_PLAN_FORMATS = ("bf16", "fp8", "int8", "int4_g128", "nf4", "q8_0", "q6_k", "q5_k_m", "q4_k_m",
                        "q3_k_m", "q2_k")

_ALIASES = {a: f.name for f in FORMATS.values() for a in f.aliases}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def get_format(name: str) -> Format:
    """Format by name or alias (case-insensitive); ValueError with the closest names on typos."""
    key = _normalise(name)
    key = _ALIASES.get(key, _ALIASES.get(name.strip().lower(), key))
    if key in FORMATS:
        return FORMATS[key]
    close = difflib.get_close_matches(key, list(FORMATS) + list(_ALIASES), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown format {name!r}{hint} (known: {', '.join(FORMATS)})")


def list_formats() -> list[Format]:
    return list(FORMATS.values())


@dataclass(frozen=True)
class Support:
    native: bool
    runs: bool
    how: str  # what happens on this GPU (empty when native)
    weight_bits: float | None = None  # bits per weight held in memory when upcast, else None


def support(fmt: Format, native_formats: tuple[str, ...] | list[str], compute_capability: float) -> Support:
    """Whether a GPU with these native datatypes and compute capability runs `fmt` natively,
    and if not, what the engines do instead."""
    if any(c in native_formats for c in fmt.compute):
        return Support(True, True, "")
    for fb in fmt.fallbacks:
        if compute_capability >= fb.min_cc:
            return Support(False, True, fb.how, fb.weight_bits)
    return Support(False, False, f"{fmt.label} has no kernel for compute capability {compute_capability:g}")


# --- GGUF file-type mixtures -------------------------------------------------------------------
# llama.cpp (llama_tensor_get_type) bumps a few sensitive tensors above the file type's base type.
# Categories follow GGUF tensor names: output (lm_head; the embedding when tied), token_embd,
# attn_q/k/v/output, ffn_gate/up/down (experts included), other (router, norms: kept F32).

def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# Block types that need rows divisible by 256, and what llama.cpp uses when a row is not.
_K_FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
               "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
               "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL"}


def gguf_tensor_type(fmt: Format, category: str, layer: int, n_layers: int, row: int, *,
                     n_gqa: int = 1, n_expert: int = 0) -> str:
    """GGML type llama.cpp's quantizer gives one 2-D tensor of a GGUF file type.

    category: "output", "token_embd", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
    "ffn_up", "ffn_down", "router" or "other". layer/n_layers: decoder layer index and count
    (-1 for tensors outside layers). row: elements per row (in_features). n_gqa: attention
    heads per KV head. n_expert: routed experts (0 for dense).
    """
    if fmt.kind is not Kind.GGUF:
        raise ValueError(f"{fmt.name} is not a GGUF format")
    base = fmt.gguf_type or "F16"
    name = fmt.name
    if category in ("router", "other"):
        return "F32"
    t = base
    if category == "output":
        if row % 256:
            t = "Q8_0"
        elif base not in ("Q8_0", "Q6_K"):
            t = "Q6_K"
    elif category in ("attn_v", "attn_k") and n_expert == 8 and name != "q8_0":
        t = "Q8_0"  # llama.cpp: for 8-expert models this costs ~128 MB and helps a lot
    elif category == "attn_v":
        if name == "q2_k":
            t = "Q4_K" if n_gqa >= 4 else "Q3_K"
        elif name == "q3_k_m":
            t = "Q5_K" if layer < 2 else "Q4_K"
        elif name in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, n_layers):
            t = "Q6_K"
    elif category == "ffn_down":
        if name == "q2_k":
            t = "Q3_K"
        elif name == "q3_k_m":
            t = "Q5_K" if layer < n_layers // 16 else "Q4_K"
        elif name in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, n_layers):
            t = "Q6_K"
    elif category == "attn_output":
        if n_expert == 8 and name in ("q2_k", "q3_k_m", "q4_k_m"):
            t = "Q5_K"
        elif name == "q2_k":
            t = "Q3_K"
        elif name == "q3_k_m":
            t = "Q4_K"
    if t in _K_FALLBACK and row % 256:
        t = _K_FALLBACK[t]
    if GGUF_TYPES[t][0] > 1 and row % GGUF_TYPES[t][0]:
        t = "F16"
    return t


def format_from_quantization_config(qc: dict | None) -> str | None:
    """Registry name of a checkpoint's `quantization_config` (compressed-tensors, GPTQ, AWQ,
    bitsandbytes, FP8), or None when it matches no registry format."""
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method == "bitsandbytes":
        if qc.get("load_in_8bit"):
            return "int8"
        if str(qc.get("bnb_4bit_quant_type", "nf4")).lower() == "nf4":
            return "nf4_dq" if qc.get("bnb_4bit_use_double_quant") else "nf4"
        return None
    if method == "fp8":
        return "fp8"
    if method in ("gptq", "awq"):
        bits, group = qc.get("bits"), qc.get("group_size")
        sym = bool(qc.get("sym", method == "gptq")) and method != "awq"
        return _int_format(bits, group, sym)
    if method == "compressed-tensors":
        for group in (qc.get("config_groups") or {}).values():
            w = (group or {}).get("weights") or {}
            if w.get("type") == "float" and w.get("num_bits") == 8:
                return "fp8"
            if w.get("type") == "float" and w.get("num_bits") == 4:
                return "nvfp4" if w.get("group_size") == 16 else "mxfp4"
            if w.get("type") == "int":
                if w.get("num_bits") == 8 and w.get("strategy") == "channel":
                    return "int8"
                return _int_format(w.get("num_bits"), w.get("group_size"), bool(w.get("symmetric", True)))
    return None


def _int_format(bits: object, group: object, sym: bool) -> str | None:
    if group != 128 or bits not in (3, 4):
        return None
    if bits == 4:
        return "int4_g128" if sym else "int4_g128_asym"
    return "int3_g128" if sym else None
