"""Quality benchmark on the real SmolLM2-135M-Instruct: perplexity on the held-out half of the
built-in corpus, KL divergence against the fp32 model, quantization wall time and peak RSS, for
every quantization method Quantscope has.

    .venv/bin/python benchmarks/quality.py [--samples 128] [--seq-len 512] [--windows 0 (all)]
        [--only NAME ...] [--markdown benchmarks/RESULTS.md]

Each method runs in its own subprocess so its peak RSS is its own (ru_maxrss of the child).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.config import (  # noqa: E402  (after the sys.path fix so a plain checkout runs)
    CALIBRATED_METHODS,
    AWQConfig,
    CalibConfig,
    FourBitConfig,
    GPTQConfig,
    LLMInt8Config,
    QuantJob,
    RTNConfig,
    SmoothQuantConfig,
)

GIB = 2**30

# Rows of the table: name -> (method config or None for the float model, export layout or None).
METHODS: dict[str, tuple[Any, str | None]] = {
    "fp32": (None, None),
    "RTN W8 (per-channel, sym)": (RTNConfig(bits=8, granularity="channel"), None),
    "RTN W4 g128 asym": (RTNConfig(bits=4, group_size=128, sym=False), None),
    "GPTQ W4 g128 asym": (GPTQConfig(bits=4, group_size=128, sym=False), None),
    "GPTQ W4 g128 asym act-order": (GPTQConfig(bits=4, group_size=128, sym=False, act_order=True), None),
    "AWQ W4 g128 asym": (AWQConfig(bits=4, group_size=128, sym=False), None),
    "RTN W3 g128 asym": (RTNConfig(bits=3, group_size=128, sym=False), None),
    "GPTQ W3 g128 asym": (GPTQConfig(bits=3, group_size=128, sym=False), None),
    "AWQ W3 g128 asym": (AWQConfig(bits=3, group_size=128, sym=False), None),
    "NF4 (block 64)": (FourBitConfig(quant_type="nf4", blocksize=64), None),
    "SmoothQuant W8A8 dynamic": (SmoothQuantConfig(alpha=0.5, act_scheme="dynamic"), None),
    "SmoothQuant W8A8 static": (SmoothQuantConfig(alpha=0.5, act_scheme="static"), None),
    "SmoothQuant W8A8 dynamic (α auto)": (SmoothQuantConfig(alpha="auto", act_scheme="dynamic"), None),
    "SmoothQuant W8A8 static (α auto)": (SmoothQuantConfig(alpha="auto", act_scheme="static"), None),
    "LLM.int8 (threshold 6)": (LLMInt8Config(threshold=6.0), None),
}


def _child(args: argparse.Namespace) -> None:
    """Quantize (unless fp32) and evaluate one method; print one JSON line."""
    import torch

    from core.demo import prepare_smollm2
    from core.engine import run_quantization
    from core.evaluate import evaluate_model
    from core.loader import load_model

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    src = prepare_smollm2()
    method, export = METHODS[args.child]
    seconds = 0.0
    ref, tok = load_model(src)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        model = ref
        if method is not None:
            calib = CalibConfig(samples=args.samples, seq_len=args.seq_len) if method.method in CALIBRATED_METHODS else None
            job = QuantJob(model=src, out=Path(tmp) / "q", method=method, calib=calib, export=export)
            t0 = time.perf_counter()
            run_quantization(job)
            seconds = time.perf_counter() - t0
            quant_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
            model, _ = load_model(job.out)
        else:
            quant_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
        res = evaluate_model(model, tok, heldout=True, seq_len=args.eval_seq_len, windows=args.windows or 1 << 30,
                             reference=None if method is None else ref)
    print(json.dumps({
        "name": args.child, "perplexity": res["perplexity"], "kl_divergence": res.get("kl_divergence", 0.0),
        "tokens": res.get("tokens"), "seconds": seconds, "peak_rss_gib": quant_rss,
    }))


def _run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", name, "--samples", str(args.samples), "--seq-len", str(args.seq_len),
           "--windows", str(args.windows), "--eval-seq-len", str(args.eval_seq_len), "--threads", str(args.threads)]
    if args.workdir:
        cmd += ["--workdir", args.workdir]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"name": name, "error": tail}
    return json.loads(lines[-1])


def _table(rows: list[dict[str, Any]]) -> str:
    base = next((r["perplexity"] for r in rows if r["name"] == "fp32" and "perplexity" in r), None)
    out = ["| method | perplexity | Δ vs fp32 | KL vs fp32 | quantize s | peak RSS GiB |",
           "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['name']} | failed: {r['error'][:120]} | | | | |")
            continue
        delta = f"{100 * (r['perplexity'] / base - 1):+.1f}%" if base else "?"
        out.append(f"| {r['name']} | {r['perplexity']:.3f} | {delta} | {r['kl_divergence']:.4f} | "
                   f"{r['seconds']:.1f} | {r['peak_rss_gib']:.2f} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=128, help="calibration samples")
    p.add_argument("--seq-len", type=int, default=512, help="calibration tokens per sample")
    p.add_argument("--windows", type=int, default=0,
                   help="evaluation windows (0 = the whole held-out half: 109 windows of 512 tokens)")
    p.add_argument("--eval-seq-len", type=int, default=512, help="evaluation window length")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0 = torch's default)")
    p.add_argument("--only", nargs="*", help="run only these rows (names as in the table)")
    p.add_argument("--workdir", default=None, help="where temporary quantized folders go")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return
    names = args.only or list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"unknown rows: {unknown}; known: {list(METHODS)}")
    rows = []
    for name in names:
        t0 = time.perf_counter()
        row = _run(name, args)
        rows.append(row)
        print(f"{name}: {json.dumps(row)} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
        if args.markdown:  # rewritten after every row so a long run leaves partial results
            _write_markdown(Path(args.markdown), rows, args)
    print(_table(rows))


def _write_markdown(path: Path, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    import shlex

    import torch

    cmd = "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    path.write_text(
        f"# Quality on SmolLM2-135M-Instruct\n\nCommand: `{cmd.strip()}`\n\n"
        f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {args.threads or torch.get_num_threads()} "
        f"torch thread(s) per run. Calibration: {args.samples} samples x {args.seq_len} tokens of the builtin "
        f"corpus; evaluation: {args.windows or 'all'} windows x {args.eval_seq_len} tokens of its held-out half "
        f"({next((r['tokens'] for r in rows if r.get('tokens')), '?')} predicted tokens).\n\n"
        f"{_table(rows)}\n"
    )


if __name__ == "__main__":
    main()
