"""Tooltips for the controls that use a term of art, in plain words and with what the choice
does to size and quality. One place, so the Plan, Quantize and Inspect tabs say the same."""
from __future__ import annotations

TERMS: dict[str, str] = {
    "bits": "Bits per weight. Fewer bits → a smaller file and less VRAM (4-bit is about a quarter of 16-bit), "
            "but coarser rounding: 8 is near-lossless, 4 the usual trade-off, 3 and 2 lose noticeable quality.",
    "granularity": "How many weights share one scale. Per group (a scale for every G input columns): best quality, "
                   "a little extra size. Per channel: one scale per output row. Per tensor: one for all, smallest "
                   "and least accurate.",
    "group_size": "Input columns that share one scale (and zero point). Smaller groups follow the weights more "
                  "closely → better quality, but store more scales: at 4 bits, 128 adds about 0.13 bits per weight, "
                  "32 about 0.5.",
    "sym": "Zero point. Symmetric: the grid is centred on 0 and no zero point is stored. Asymmetric stores a zero "
           "point per group so the grid fits lopsided weights: better quality (clearly so for GPTQ and AWQ at "
           "4 bits) for a few hundredths of a bit per weight more.",
    "clip": "Search a clip ratio per group: shrink the range slightly so most weights land on finer steps. Lower "
            "error, slower quantization, same size.",
    "damp": "Damping: a fraction of the mean Hessian diagonal added before GPTQ inverts it. Higher is more stable "
            "with little calibration text but corrects less; 0.01 is the usual value. No effect on size.",
    "act_order": "Act-order: quantize the columns that matter most (largest Hessian diagonal) first, so the error "
                 "lands on the least important ones. Usually better quality; same size, a little slower.",
    "grid": "AWQ tries this many scaling strengths α between 0 and 1 per block and keeps the best. More points: "
            "slightly better quality, slower. No effect on size.",
    "awq_clip": "After scaling, search the clipping range per group that minimises the output error: better quality, "
                "slower, same size.",
    "blocksize": "Weights that share one absmax scale in NF4 (64 is bitsandbytes' default). Smaller blocks: better "
                 "quality, more scales to store.",
    "double_quant": "Quantize the per-block scales themselves to 8 bits: about 0.37 bits per weight smaller "
                    "(4.5 → 4.13) at a negligible quality cost.",
    "fp8_fmt": "FP8 format. E4M3: more precision, range ±448 (the usual choice for weights and activations). E5M2: "
               "wider range, less precision. Both are 8 bits.",
    "fp8_granularity": "One FP8 scale per output channel (better quality) or one per tensor (simplest kernels). "
                       "Same size.",
    "alpha": "SmoothQuant's migration strength α: how much of the activations' outliers is moved into the weights "
             "(s = max|X|^α / max|W|^(1−α)). 0.5 balances both; higher helps models with large activation "
             "outliers. No effect on size.",
    "act_scheme": "Activation scales. Dynamic: computed per token while running (better quality). Static: one "
                  "calibrated scale per tensor (faster kernels, may clip outliers).",
    "threshold": "LLM.int8() outlier threshold: activation columns with any |value| at or above it stay in 16-bit. "
                 "Lower keeps more columns in 16-bit: better quality, more memory, slower; 6.0 is the paper's value.",
    "samples": "Calibration samples: text sequences run through the model to measure its activations. More samples "
               "give GPTQ, AWQ and SmoothQuant statistics closer to real use (better quality) for more time and "
               "memory; 128 is typical, 8-32 a quick try. No effect on size.",
    "seq_len": "Tokens per calibration sample. Longer samples see longer-range behaviour; time and memory grow "
               "with samples × length.",
    "calib_source": "The text run through the model to measure activations. The built-in text is general prose "
                    "and code; text from your own domain helps quality there.",
    "kv_dtype": "KV dtype: the element type of the attention cache. fp16 is exact; fp8 and int8 halve the cache "
                "(longer context or bigger batches in the same memory) at a small quality cost.",
    "engine": "Inference engine the model will run under. It decides the memory beside the weights: the CUDA "
              "context, activation buffers and, for vLLM, the pool it reserves for the KV cache.",
    "context": "Context length: tokens per sequence the KV cache must hold. The cache grows linearly with it.",
    "batch": "Sequences served at once; each has its own KV cache, so the cache grows linearly with the batch.",
    "calibrate": "Run calibration text through the model to measure each input channel's activation maximum "
                 "(needed for the LLM.int8 outliers and SmoothQuant scales).",
    "windows": "Perplexity is measured on this many windows of text; more windows, a steadier figure, longer runs.",
    "eval_seq_len": "Tokens per evaluation window: longer windows give the model more context per prediction.",
}


def tip(term: str, extra: str = "") -> str:
    """The tooltip for `term`, with `extra` (a note about the current choice) after a blank line."""
    text = TERMS[term]
    return f"{text}\n\n{extra}" if extra else text
