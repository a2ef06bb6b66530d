"""Compare the planner's estimate with the memory really used when transformers loads a model
and runs one prefill + a few decode steps.

CPU: resident-set growth of a fresh subprocess (peak RSS sampled every 5 ms minus the RSS after
importing torch/transformers). GPU (when CUDA is available): torch.cuda.max_memory_allocated,
which excludes the CUDA context, so it is compared with weights + KV + activations only.

    .venv/bin/python benchmarks/planner_vs_measured.py [--context 1024] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GIB = 2**30

_CHILD = r"""
import json, sys, threading, time
import psutil, torch, transformers
path, dtype, context, device = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3]), sys.argv[4]
proc = psutil.Process()
base = proc.memory_info().rss
peak = [base]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.005)
t = threading.Thread(target=sample, daemon=True); t.start()
model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
loaded = proc.memory_info().rss
if device == "cuda":
    torch.cuda.synchronize(); after_load_gpu = torch.cuda.max_memory_allocated()
ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
with torch.no_grad():
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                   pad_token_id=0)
stop.set(); t.join()
out = {"load_rss": loaded - base, "peak_rss": peak[0] - base}
if device == "cuda":
    torch.cuda.synchronize()
    out["load_gpu"] = after_load_gpu; out["peak_gpu"] = torch.cuda.max_memory_allocated()
print(json.dumps(out))
"""


def measure(path: Path, dtype: str, context: int, device: str) -> dict[str, float]:
    res = subprocess.run([sys.executable, "-c", _CHILD, str(path), dtype, str(context), device],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def tiny_model(out: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from conftest import build_tokenizer, make_tiny_model

    return make_tiny_model(out, build_tokenizer(), dtype=torch.bfloat16, hidden_size=512, intermediate_size=1536,
                           layers=4)


def main() -> int:
    import torch

    from core import planner

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args()
    fmt = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[args.dtype]
    models: list[tuple[str, Path]] = []
    tmp = Path(tempfile.mkdtemp(prefix="qs-bench-"))
    models.append(("tiny llama (4 layers, h512)", tiny_model(tmp / "tiny")))
    try:
        from core.demo import prepare_smollm2

        models.append(("SmolLM2-135M", Path(prepare_smollm2())))
    except Exception as exc:  # the benchmark still reports the tiny model
        print(f"SmolLM2-135M unavailable: {exc}", file=sys.stderr)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    gpu = "h100-sxm"
    header = f"{'model':28s} {'dev':4s} {'est weights':>12s} {'meas load':>10s} {'err':>7s} " \
             f"{'est w+kv+act':>13s} {'meas peak':>10s} {'err':>7s}"
    print(f"context {args.context}, dtype {args.dtype}; sizes in MiB\n{header}\n{'-' * len(header)}")
    for label, path in models:
        row = planner.plan(path, gpu, formats=[fmt], context=args.context, cpu_ram_gib=64).formats[0]
        est_w = row.weights_bytes
        est_run = est_w + (row.kv_cache_gib + row.activations_gib) * GIB
        for dev in devices:
            m = measure(path, args.dtype, args.context, dev)
            load = m["load_gpu"] if dev == "cuda" else m["load_rss"]
            peak = m["peak_gpu"] if dev == "cuda" else m["peak_rss"]
            print(f"{label:28s} {dev:4s} {est_w / 2**20:12.1f} {load / 2**20:10.1f} {load / est_w - 1:+7.1%} "
                  f"{est_run / 2**20:13.1f} {peak / 2**20:10.1f} {peak / est_run - 1:+7.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
