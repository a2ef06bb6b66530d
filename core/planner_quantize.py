"""Memory a quantization job needs: the layer-by-layer engine's peak CPU and GPU memory per
method, without loading weights (re-exported by core.planner)."""
from __future__ import annotations

from typing import Any

from core.config import GPTQ_KEEP_MAX_BYTES

GIB = 2**30


def _gib(n: float) -> float:
    return n / GIB


def _r(x: float, nd: int = 3) -> float:
    return round(float(x), nd)


# --- memory needed to quantize ----------------------------------------------------------------

QUANT_METHODS = ("rtn", "nf4", "fp8", "gptq", "awq", "smoothquant", "llm_int8")
_CALIBRATED = ("gptq", "awq", "smoothquant", "llm_int8")
PROCESS_BASE_GIB = 0.6  # Python + torch + transformers + tokenizer, measured RSS after import ≈ 0.3-0.6 GiB
CALIB_TOKENS_PER_BATCH = 4096  # the engine's forward batch (core.engine)


def _method_name(method: Any) -> str:
    name = method if isinstance(method, str) else getattr(method, "method", type(method).__name__)
    name = str(name).lower().replace("-", "_").replace(".", "_")
    name = {"fp4": "nf4"}.get(name, name)  # FourBitConfig.method is its quant_type
    if name not in QUANT_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(QUANT_METHODS)}")
    return name


def quantize_memory(model: Any, method: Any, calib: Any = None, *, device: str = "cpu") -> dict[str, Any]:
    """Peak memory the layer-by-layer engine needs to quantize `model` with `method`.

    The engine holds one decoder layer in float32 (plus the dequantized copy it uses to run the
    quantized layer forward), the calibration hidden states entering and leaving the layer
    (samples × seq_len × hidden × 4 B each), GPTQ's fp32 Hessian of one linear group at a time
    (with its working copies) and the activations its staged layer keeps,
    AWQ's cached linear inputs, and a model-size-independent process base. With device "cuda" the
    layer, Hessians and activations sit on the GPU and the CPU keeps the process and staging copy.
    calib: a core.config.CalibConfig (or anything with .samples and .seq_len); default 128 × 512.
    """
    name = _method_name(method)
    from core.planner import load_model

    spec = load_model(model)
    samples = int(getattr(calib, "samples", 128))
    seq_len = int(getattr(calib, "seq_len", 512))
    if samples <= 0 or seq_len <= 0:
        raise ValueError(f"calibration samples and seq_len must be positive, got {samples} × {seq_len}")
    H = spec.hidden_size
    layers = [spec.layer_tensors(i) for i in range(spec.num_layers)]
    layer_params = [sum(t.numel for t in lt) for lt in layers]
    big = max(range(spec.num_layers), key=lambda i: layer_params[i])
    lin = [t for t in layers[big] if t.role == "linear"]
    layer_fp32 = layer_params[big] * 4
    # The engine runs the calibration forward with dequantized weights beside the originals.
    dequant_copy = sum(t.numel for t in lin) * 4
    largest_linear = max((t.numel for t in lin), default=0) * 4
    parts: dict[str, float] = {"layer_fp32": layer_fp32, "dequantized_copy": dequant_copy,
                               "work_buffers": 2 * largest_linear}
    formulas = {
        "layer_fp32": f"largest decoder layer (#{big}) {layer_params[big]:,} params × 4 B",
        "dequantized_copy": "its linears dequantized for the quantized forward × 4 B",
        "work_buffers": "2 × largest linear × 4 B (rounding / clamping temporaries)",
    }
    calibrated = name in _CALIBRATED
    if calibrated:
        acts = 2 * samples * seq_len * H * 4
        parts["calibration_activations"] = acts
        formulas["calibration_activations"] = f"2 (layer in + out) × {samples} samples × {seq_len} seq_len × {H} hidden × 4 B"
        per_batch = max(1, CALIB_TOKENS_PER_BATCH // seq_len)
        parts["attention_scores"] = per_batch * spec.num_heads * seq_len * seq_len * 4
        formulas["attention_scores"] = f"{per_batch} samples per forward × {spec.num_heads} heads × {seq_len}² × 4 B"
        embed_stage = spec.vocab_size * H * 4 + acts / 2
        formulas["embedding_stage"] = (f"{spec.vocab_size} vocab × {H} hidden × 4 B + the embedded calibration text "
                                       "(before the first layer; freed after)")
    if name == "gptq":
        # One group's Hessian at a time (freed before the next group's is collected); while it
        # is solved, a working copy and the inverse's factor sit beside it (measured peak ≈ 3×).
        hess = 3 * max(((t.shape[0] if len(t.shape) == 3 else 1) * t.in_features ** 2 * 4 for t in lin), default=0)
        parts["hessians"] = hess
        formulas["hessians"] = "3 × the largest in_features² × 4 B (Hessian, working copy, inverse factor; of " + \
            ", ".join(sorted({f"{t.in_features}²" for t in lin})) + "; one linear group at a time)"
        # The staged layer keeps o_proj's inputs, and down_proj's when they fit its budget.
        tokens = samples * seq_len
        q_dim = spec.num_heads * spec.head_dim
        down_in = tokens * spec.intermediate_size * 4
        keeps_down = down_in <= GPTQ_KEEP_MAX_BYTES
        kept = tokens * q_dim * 4 + (down_in if keeps_down else 0)
        parts["gptq_kept_activations"] = kept
        formulas["gptq_kept_activations"] = (
            f"{samples} × {seq_len} tokens × ({q_dim} attention out"
            + (f" + {spec.intermediate_size} down_proj in" if keeps_down else "")
            + ") × 4 B (kept between the steps of the layer; down_proj's only when ≤ 4 GiB and a quarter of "
              "free memory)")
    if name == "awq":
        q_dim = spec.num_heads * spec.head_dim
        cached = samples * seq_len * (2 * H + q_dim + spec.intermediate_size) * 4
        parts["awq_linear_inputs"] = cached
        formulas["awq_linear_inputs"] = (f"{samples} × {seq_len} × (2×{H} + {q_dim} + {spec.intermediate_size}) × 4 B "
                                         "(inputs of qkv, o, gate/up, down kept for the scale search)")
    if name == "smoothquant" or name == "llm_int8":
        parts["channel_stats"] = sum(t.in_features for t in lin) * 4
        formulas["channel_stats"] = "per input channel max|x| of each linear × 4 B"
    base = PROCESS_BASE_GIB * GIB
    work = sum(parts.values())
    if calibrated and embed_stage > work:
        parts = {"embedding_stage": embed_stage}
        work = embed_stage
    if device.startswith("cuda"):
        gpu = work
        cpu = base + layer_fp32  # the layer is read and converted on the CPU before moving
    else:
        gpu = 0.0
        cpu = base + work
    formulas["process_base"] = f"{PROCESS_BASE_GIB:g} GiB Python + torch + transformers (independent of model size)"
    return {
        "method": name, "device": device, "samples": samples if calibrated else 0,
        "seq_len": seq_len if calibrated else 0,
        "peak_cpu_gib": _r(_gib(cpu)), "peak_gpu_gib": _r(_gib(gpu)),
        "parts_gib": {k: _r(_gib(v), 4) for k, v in parts.items()} | {"process_base": PROCESS_BASE_GIB},
        "formulas": formulas,
    }


def quantize_memory_all(model: Any, calib: Any = None, *, device: str = "cpu") -> dict[str, dict[str, Any]]:
    """quantize_memory for every method, keyed by method name."""
    from core.planner import load_model

    spec = load_model(model)
    return {m: quantize_memory(spec, m, calib, device=device) for m in QUANT_METHODS}
