"""`quantscope eval`: perplexity (and KL divergence against a reference) of a model folder."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from core.cli import UserError, emit_json
from core.cli.options import add_device_options, device_options


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval", help="perplexity and KL divergence of a model folder",
        description="Perplexity over consecutive non-overlapping windows of a text, from its start; "
                    "with --reference also the mean KL divergence of the next-token distributions. "
                    "Any Quantscope output folder is a valid --model.",
    )
    p.add_argument("--model", required=True, type=Path,
                   help="model folder (plain or quantized by Quantscope) or a .gguf file")
    p.add_argument("--text", default="builtin", help="'builtin' (Python's pydoc topics) or a .txt/.jsonl file")
    p.add_argument("--heldout", action="store_true",
                   help="evaluate the second half of the text (the half calibration does not draw from)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (512)")
    p.add_argument("--windows", type=int, default=16, help="number of windows (16; fewer if the text is shorter)")
    p.add_argument("--reference", type=Path, default=None, help="model folder to compute KL(reference || model) against")
    add_device_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    if args.seq_len < 2:
        raise UserError(f"--seq-len must be at least 2 tokens, got {args.seq_len}")
    if args.windows <= 0:
        raise UserError(f"--windows must be positive, got {args.windows}")
    if args.text != "builtin" and not Path(args.text).expanduser().is_file():
        raise UserError(f"--text {args.text}: file not found (use 'builtin' or a .txt/.jsonl file)")
    opts = device_options(args)
    if opts["device"].startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {args.device}: no CUDA GPU is available here; use --device cpu or auto")
    for flag, path in (("--model", args.model), ("--reference", args.reference)):
        if path is None or path.is_dir() or (path.suffix.lower() == ".gguf" and path.is_file()):
            continue
        raise UserError(f"{flag} {path}: not a model folder (give a folder with config.json and *.safetensors, "
                        "or a .gguf file)")


def run(args: argparse.Namespace) -> int:
    from core.cli.quantize import ProgressPrinter
    from core.evaluate import evaluate

    from core.devices import thread_scope

    _check(args)
    opts = device_options(args)
    with thread_scope(opts["threads"]):
        result = evaluate(
            args.model, text=args.text, seq_len=args.seq_len, windows=args.windows, reference=args.reference,
            heldout=args.heldout, device=opts["device"], sink=ProgressPrinter(stream=sys.stderr),
        )
    if args.json:
        # JSON has no Infinity/NaN; a diverged model reports null.
        emit_json({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()})
        return 0
    line = (f"{args.model}: perplexity {result['perplexity']:.4f} over {result['tokens']} tokens "
            f"({result['windows']} windows of {result['seq_len']})")
    if "kl_divergence" in result:
        line += f"; KL vs {args.reference} {result['kl_divergence']:.6f} nats/token"
    sys.stdout.write(f"{line}; {result['seconds']:.1f} s\n")
    if not math.isfinite(result["perplexity"]):
        sys.stderr.write("warning: perplexity is not finite; the model produces NaN/Inf logits\n")
    return 0
