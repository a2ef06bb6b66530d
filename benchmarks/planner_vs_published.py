"""The planner against published measurements: GGUF file sizes, checkpoint sizes, engine log
lines, KV-cache tables and decode speeds, each with its source. Prints the markdown table kept
in benchmarks/planner_vs_published.md; tests/core/test_planner_published.py recomputes every
planner figure from the `query` column and fails when one drifts from the table.

    .venv/bin/python benchmarks/planner_vs_published.py > benchmarks/planner_vs_published.md

A query is `MODEL GPU FORMAT METRIC [key=value ...]`; METRIC is file_gb (weight bytes / 1e9, as
Hugging Face lists files), weights_gib, kv_gib or tok_s; keys are plan() keywords (engine,
context, num_gpus, batch ...). Goals: memory within 5%, decode within ±35%.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MEMORY_GOAL = 0.05
DECODE_GOAL = 0.35


@dataclass(frozen=True)
class Row:
    what: str
    query: str
    published: float
    source: str
    note: str = ""  # why a miss misses (required when the goal is not met)


_TB = "TheBloke/{}-GGUF file list on Hugging Face (decimal GB)"
_BART = "bartowski/Meta-Llama-3.1-{}-Instruct-GGUF file list on Hugging Face (decimal GB)"
ROWS: tuple[Row, ...] = (
    Row("Llama-2-7B Q4_0 GGUF file", "llama-2-7b h200 q4_0 file_gb engine=llama.cpp", 3.83, _TB.format("Llama-2-7B")),
    Row("Llama-2-7B Q4_K_M GGUF file", "llama-2-7b h200 q4_k_m file_gb engine=llama.cpp", 4.08, _TB.format("Llama-2-7B")),
    Row("Llama-2-7B Q8_0 GGUF file", "llama-2-7b h200 q8_0 file_gb engine=llama.cpp", 7.16, _TB.format("Llama-2-7B")),
    Row("Llama 7B F16 model size (llama-bench)", "llama-2-7b h200 fp16 weights_gib engine=llama.cpp", 12.55,
        "llama.cpp PR #3776 llama-bench table: llama 7B F16, size 12.55 GiB, 6.74 B params (seen in this session)"),
    Row("Mistral-7B-v0.1 Q4_K_M GGUF file", "mistral-7b-v0.1 h200 q4_k_m file_gb engine=llama.cpp", 4.37,
        _TB.format("Mistral-7B-v0.1")),
    Row("Mistral-7B-v0.1 Q8_0 GGUF file", "mistral-7b-v0.1 h200 q8_0 file_gb engine=llama.cpp", 7.70,
        _TB.format("Mistral-7B-v0.1")),
    Row("Mixtral-8x7B Q4_K_M GGUF file", "mixtral-8x7b h200 q4_k_m file_gb engine=llama.cpp", 26.44,
        _TB.format("Mixtral-8x7B-v0.1"),
        "the planner gives ffn_down Q6_K in 16 of 32 layers (current llama_tensor_get_type, +2.0 GB over "
        "8 experts × 4096 × 14336 per layer), which is about the whole difference; TheBloke's December-2023 "
        "file was quantized when the experts were 8 separate tensors per layer, so its llama.cpp likely "
        "counted the bumps differently; not checked against the file's tensor list"),
    Row("Llama-3.1-8B Q8_0 GGUF file", "llama-3.1-8b h200 q8_0 file_gb engine=llama.cpp", 8.54, _BART.format("8B")),
    Row("Llama-3.1-8B Q6_K GGUF file", "llama-3.1-8b h200 q6_k file_gb engine=llama.cpp", 6.60, _BART.format("8B")),
    Row("Llama-3.1-8B Q5_K_M GGUF file", "llama-3.1-8b h200 q5_k_m file_gb engine=llama.cpp", 5.73, _BART.format("8B")),
    Row("Llama-3.1-8B Q4_K_M GGUF file", "llama-3.1-8b h200 q4_k_m file_gb engine=llama.cpp", 4.92, _BART.format("8B")),
    Row("Llama-3.1-8B IQ4_XS GGUF file", "llama-3.1-8b h200 iq4_xs file_gb engine=llama.cpp", 4.45, _BART.format("8B")),
    Row("Llama-3.1-8B Q3_K_M GGUF file", "llama-3.1-8b h200 q3_k_m file_gb engine=llama.cpp", 4.02, _BART.format("8B")),
    Row("Llama-3.1-8B Q2_K GGUF file", "llama-3.1-8b h200 q2_k file_gb engine=llama.cpp", 3.18, _BART.format("8B")),
    Row("Llama-3.1-70B Q4_K_M GGUF file", "llama-3.1-70b h200 q4_k_m file_gb engine=llama.cpp", 42.52,
        _BART.format("70B")),
    Row("Llama-3.1-70B Q8_0 GGUF file (split)", "llama-3.1-70b h200 q8_0 file_gb engine=llama.cpp", 74.98,
        _BART.format("70B")),
    Row("Llama-3.1-405B Q4_K_M (Ollama llama3.1:405b)", "llama-3.1-405b h200 q4_k_m file_gb engine=llama.cpp", 243,
        "ollama.com/library/llama3.1 tag 405b: 243GB (Q4_K_M)"),
    Row("DeepSeek-R1 671B Q4_K_M (Ollama deepseek-r1:671b)", "deepseek-r1 h200 q4_k_m file_gb engine=llama.cpp", 404,
        "ollama.com/library/deepseek-r1 tag 671b: 404GB (Q4_K_M)"),
    Row("gpt-oss-120b checkpoint (MXFP4 experts, BF16 rest)", "gpt-oss-120b h100-sxm mxfp4 weights_gib engine=vllm",
        60.8, "OpenAI gpt-oss model card, checkpoint size table: 60.8 GiB (recalled, not re-fetched here)"),
    Row("gpt-oss-20b checkpoint (MXFP4 experts, BF16 rest)", "gpt-oss-20b h100-sxm mxfp4 weights_gib engine=vllm",
        12.8, "OpenAI gpt-oss model card, checkpoint size table: 12.8 GiB (recalled, not re-fetched here)"),
    Row("Llama-3.1-8B BF16 in vLLM (\"Loading model weights took\")", "llama-3.1-8b h100-sxm bf16 weights_gib engine=vllm",
        14.99, "vLLM log line `Loading model weights took 14.99 GB` for Llama-3(.1)-8B, widely quoted in vLLM "
        "issues (recalled, not re-fetched here)"),
    Row("Llama-3.1-8B KV cache, 128k tokens, FP16", "llama-3.1-8b h200 bf16 kv_gib context=128000", 15.62,
        "Hugging Face blog \"Llama 3.1 - 405B, 70B & 8B\", KV-cache table (GB there are GiB of 128,000 tokens)"),
    Row("Llama-3.1-70B KV cache, 128k tokens, FP16", "llama-3.1-70b h200 bf16 kv_gib context=128000", 39.06,
        "Hugging Face blog \"Llama 3.1 - 405B, 70B & 8B\", KV-cache table"),
    Row("DeepSeek-R1 KV in transformers, 8k tokens", "deepseek-r1 h200 fp8 kv_gib context=8192", 38.0,
        "issue 18 (audit): transformers caches expanded per-head K/V, ≈38 GiB at 8k"),
    Row("Llama-3.1-8B Q4_K_M decode, RTX 4090, llama.cpp", "llama-3.1-8b rtx-4090 q4_k_m tok_s engine=llama.cpp context=512",
        125, "issue 18: 119-131 tok/s measured publicly (midpoint)"),
    Row("Llama-3-8B Q4_0 decode (ubatch 1), RTX 3090", "llama-3.1-8b rtx-3090 q4_0 tok_s engine=llama.cpp context=512",
        155.0, "llama.cpp PR #15802 table: RTX 3090, llama 8B Q4_0, microbatch 1, pp512: 155.02 t/s (seen in this session)"),
    Row("Llama-3-8B Q4_0 decode at 32k depth, RTX 4090",
        "llama-3.1-8b rtx-4090 q4_0 tok_s engine=llama.cpp context=33280", 98.1,
        "llama.cpp PR #17505 table: RTX 4090, llama 8B Q4_0, microbatch 1, pp512@d32768: 98.14 t/s (seen in this session)"),
    Row("Llama-2-7B F16 decode, M2 Ultra 76-core, llama.cpp Metal",
        "llama-2-7b apple-m2-ultra fp16 tok_s engine=llama.cpp context=512", 41.0,
        "llama.cpp discussion #4167 (Apple Silicon), tg128 (recalled, not re-fetched here)"),
    Row("Llama-2-7B Q8_0 decode, M2 Ultra 76-core", "llama-2-7b apple-m2-ultra q8_0 tok_s engine=llama.cpp context=512",
        66.6, "llama.cpp discussion #4167 (Apple Silicon), tg128 (recalled, not re-fetched here)"),
    Row("Llama-2-7B Q4_0 decode, M2 Ultra 76-core", "llama-2-7b apple-m2-ultra q4_0 tok_s engine=llama.cpp context=512",
        94.3, "llama.cpp discussion #4167 (Apple Silicon), tg128 (recalled, not re-fetched here)",
        "Metal's Q4_0 mat-vec is limited by dequantization on the GPU cores, not by the 800 GB/s: the published "
        "figure is 3.83 GB × 94 ≈ 360 GB/s, 45% of peak, where F16 and Q8_0 reach 68-65%; the planner uses one "
        "efficiency (75%) for every block type"),
    Row("DeepSeek-R1 FP8 single stream, 8×H200, vLLM", "deepseek-r1 h200 fp8 tok_s engine=vllm num_gpus=8", 25,
        "issue 18: ~20-30 tok/s published for one stream",
        "the planner's MoE overhead per layer (0.15 ms, see core/planner_decode.py) is set so gpt-oss and "
        "Qwen3-MoE single-stream figures stay plausible; R1's published single-stream speed implies ~0.45 ms "
        "per MoE layer (fused_moe with block-FP8, MLA decode kernels and 8-way all-reduces at batch 1), which "
        "this model does not reproduce"),
)


def evaluate(query: str) -> float:
    """The planner's figure for one query."""
    from core import planner

    parts = query.split()
    model, gpu, fmt, metric = parts[:4]
    kw: dict[str, object] = {"cpu_ram_gib": 2048.0}
    for item in parts[4:]:
        key, value = item.split("=", 1)
        kw[key] = int(value) if value.isdigit() else value
    row = planner.plan(model, gpu, formats=[fmt], **kw).formats[0]  # type: ignore[arg-type]
    if metric == "file_gb":
        return row.weights_bytes / 1e9
    if metric == "weights_gib":
        return row.weights_gib
    if metric == "kv_gib":
        return row.kv_cache_gib
    if metric == "tok_s":
        if row.decode_tokens_per_s is None:
            raise ValueError(f"no decode estimate for {query}")
        return row.decode_tokens_per_s
    raise ValueError(f"unknown metric {metric!r} in {query!r}")


def within_goal(query: str, planned: float, published: float) -> bool:
    goal = DECODE_GOAL if query.split()[3] == "tok_s" else MEMORY_GOAL
    return abs(planned / published - 1) <= goal


def render() -> str:
    for r in ROWS:
        if "|" in r.what + r.source + r.note:
            raise ValueError(f"row {r.what!r}: a | would break the markdown table")
    lines = ["| # | measurement | query | published | source | planner | error | goal |",
             "|---|---|---|---:|---|---:|---:|---|"]
    for i, r in enumerate(ROWS, 1):
        p = evaluate(r.query)
        ok = within_goal(r.query, p, r.published)
        lines.append(f"| {i} | {r.what} | `{r.query}` | {r.published:g} | {r.source} | {p:.2f} | "
                     f"{(p / r.published - 1) * 100:+.1f}% | {'met' if ok else 'MISS: ' + r.note} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(render() + "\n")
