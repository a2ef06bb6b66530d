"""Decode-speed model: time per generated token for one step of `batch` sequences.

    seconds = Σ_stages (bytes read on the stage's card / (bandwidth · efficiency))
            + routed-expert bytes / (bandwidth · efficiency · MoE efficiency)
            + bytes read from CPU RAM / CPU (or PCIe) bandwidth
            + layers · kernel overhead per layer + MoE layers · routing overhead
            + layers · 2 all-reduces · latency            (tensor parallel only)
            + engine step overhead
    tokens/s = batch / seconds

Pipeline stages (llama.cpp layer split, vLLM PP, transformers device_map) run one after another
for a single sequence, so their times add; tensor-parallel ranks read their shares at once, so a
stage's time is its per-rank bytes over one card's bandwidth. The constants below are the
model's only free parameters; each says where it comes from.
"""
from __future__ import annotations

from dataclasses import dataclass

# Share of the vendor's peak DRAM bandwidth that decode GEMV kernels sustain. Calibrated on the
# public llama.cpp measurement quoted in issue 18: Llama-3.1-8B Q4_K_M on an RTX 4090 decodes at
# 119-131 tok/s where the raw bandwidth bound (1008 GB/s, ≈5.1 GB read per token) gives 196;
# STREAM-like copy kernels on GDDR6X/HBM reach ≈ 80-90% of peak, GEMV with dequantization less.
GPU_BW_EFFICIENCY = 0.75

# Routed-expert matmuls at batch 1 read a handful of scattered experts per layer (llama.cpp
# mul_mat_id, vLLM fused_moe) and reach about half the dense-GEMV throughput. Fitted to the
# issue's multi-GPU llama.cpp DeepSeek-R1 figure (~12 tok/s measured) and the KTransformers /
# llama.cpp `-ot exps=CPU` reports of R1 Q4 on one 24 GB card (≈ 8-15 tok/s on 8-12 channel DDR5).
MOE_EXPERT_EFFICIENCY = 0.5

# Kernel launch + synchronisation per decoder layer and token. llama.cpp and vLLM replay CUDA
# graphs (≈ 10-15 µs per layer remains: ~10 kernels of a few µs each that do not overlap);
# transformers' eager loop launches every op from Python (≈ 20 ops × 3-5 µs per layer). With
# them a 135 M model lands near 1,000 tok/s instead of the bandwidth bound's ~5,000.
KERNEL_OVERHEAD_S_PER_LAYER = {"llama.cpp": 12e-6, "vllm": 12e-6, "transformers": 80e-6}

# Per step: sampling, scheduler and host-side bookkeeping (llama.cpp's sampler and graph build
# ≈ 0.2 ms; vLLM's scheduler + detokenizer ≈ 1 ms per step at batch 1, the V1 engine's published
# "CPU overhead" figures; transformers' generate loop ≈ 2 ms).
STEP_OVERHEAD_S = {"llama.cpp": 0.2e-3, "vllm": 1.0e-3, "transformers": 2.0e-3}

# Per MoE layer and token: router, top-k, token permutation and the expert kernels' own launches
# (vLLM fused_moe + shared experts, expert-parallel dispatch). A compromise: DeepSeek-R1 on 8×H200
# single-stream (~20-30 tok/s published in issue 18) would need ~0.45 ms, which would put
# gpt-oss-120b on one H100 far below its published single-stream speed; the R1 miss is listed
# and explained in benchmarks/planner_vs_published.md.
MOE_LAYER_OVERHEAD_S = {"llama.cpp": 40e-6, "vllm": 0.15e-3, "transformers": 0.3e-3}

# Latency of one small-message all-reduce (a token's hidden state, a few KB): nccl-tests report
# ≈ 8-15 µs over NVLink/NVSwitch and ≈ 25-40 µs over PCIe without NVLink; between machines over
# InfiniBand/RoCE ≈ 30-60 µs. Each decoder layer needs two (after attention and after the MLP).
ALLREDUCE_LATENCY_S = {"nvlink": 10e-6, "pcie": 30e-6, "network": 50e-6}
ALLREDUCES_PER_LAYER = 2


@dataclass(frozen=True)
class StageRead:
    """Bytes one pipeline stage's card (one TP rank) reads per decode step."""

    dense_bytes: float  # attention, dense MLPs, shared experts, norms, lm_head, KV
    expert_bytes: float  # routed experts' active bytes on this card
    bandwidth_gb_s: float
    layers: int
    moe_layers: int


def decode_seconds(stages: list[StageRead], *, engine: str, tp: int, interconnect: str,
                   cpu_dense_bytes: float = 0.0, cpu_expert_bytes: float = 0.0,
                   cpu_bandwidth_gb_s: float = 50.0) -> tuple[float, str]:
    """Seconds per decode step and the formula with the numbers in it."""
    if engine not in STEP_OVERHEAD_S:
        raise ValueError(f"engine must be one of {', '.join(STEP_OVERHEAD_S)}, got {engine!r}")
    if interconnect not in ALLREDUCE_LATENCY_S:
        raise ValueError(f"interconnect must be one of {', '.join(ALLREDUCE_LATENCY_S)}, got {interconnect!r}")
    gpu = 0.0
    parts = []
    for st in stages:
        bw = st.bandwidth_gb_s * 1e9 * GPU_BW_EFFICIENCY
        t = st.dense_bytes / bw + st.expert_bytes / (bw * MOE_EXPERT_EFFICIENCY)
        gpu += t
        parts.append(f"{(st.dense_bytes + st.expert_bytes) / 1e9:.2f} GB / {st.bandwidth_gb_s:g} GB/s")
    cpu = (cpu_dense_bytes + cpu_expert_bytes / MOE_EXPERT_EFFICIENCY) / (cpu_bandwidth_gb_s * 1e9)
    layers = sum(st.layers for st in stages)
    moe_layers = sum(st.moe_layers for st in stages)
    kernels = layers * KERNEL_OVERHEAD_S_PER_LAYER[engine] + moe_layers * MOE_LAYER_OVERHEAD_S[engine]
    comm = layers * ALLREDUCES_PER_LAYER * ALLREDUCE_LATENCY_S[interconnect] if tp > 1 else 0.0
    total = gpu + cpu + kernels + comm + STEP_OVERHEAD_S[engine]
    formula = (f"GPU reads ({' + '.join(parts)}) at {GPU_BW_EFFICIENCY:.0%} of peak"
               + (f", routed experts at {MOE_EXPERT_EFFICIENCY:.0%} of that" if any(s.expert_bytes for s in stages) else "")
               + (f" + {(cpu_dense_bytes + cpu_expert_bytes) / 1e9:.2f} GB from CPU RAM / {cpu_bandwidth_gb_s:g} GB/s"
                  if cpu_dense_bytes or cpu_expert_bytes else "")
               + f" + {kernels * 1e3:.2f} ms kernel overhead ({layers} layers"
               + (f", {moe_layers} MoE layers" if moe_layers else "") + ")"
               + (f" + {comm * 1e3:.2f} ms all-reduce ({ALLREDUCES_PER_LAYER} per layer over {interconnect})" if comm else "")
               + f" + {STEP_OVERHEAD_S[engine] * 1e3:g} ms {engine} step")
    return total, formula
