"""`quantscope export`: write a model in another layout — a quantized folder re-laid out for
another loader (compressed-tensors, gptq, awq, bitsandbytes), or any folder as a llama.cpp GGUF
file — and optionally prove that the result loads and computes the same (`--verify`)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from core.cli import UserError, emit_json

FORMATS = ("gguf", "compressed-tensors", "gptq", "awq", "bitsandbytes")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export", help="write a model in another layout (GGUF, GPTQ, AWQ, compressed-tensors, bitsandbytes)",
        description="Re-lay out a Quantscope-quantized folder for another loader without re-quantizing, or "
                    "write any model folder (float or quantized, dequantized first) as a GGUF file.",
    )
    p.add_argument("--model", required=True, type=Path, help="quantized output folder, or a float model folder for gguf")
    p.add_argument("--format", required=True, choices=FORMATS, help="target layout")
    p.add_argument("--out", required=True, type=Path, help="output folder, or a .gguf file for --format gguf")
    p.add_argument("--preset", default=None, help="gguf only: F16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, "
                                                   "Q6_K, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M (default Q8_0)")
    p.add_argument("--verify", action="store_true",
                   help="load the result with its real consumer and compare logits and perplexity with Quantscope's model")
    p.add_argument("--reference", type=Path, default=None,
                   help="with --verify: the Quantscope model to compare against (default: --model for folders, "
                        "Quantscope's own GGUF reader for gguf)")
    p.add_argument("--tokens", type=int, default=128, help="with --verify: tokens of text to compare on (128)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output that Quantscope wrote (an empty folder, an earlier Quantscope "
                        "output or .gguf; anything else is refused)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    if args.preset is not None and args.format != "gguf":
        raise UserError(f"--preset applies to --format gguf only (the {args.format} layout keeps the stored codes)")
    if args.format == "gguf" and args.out.suffix != ".gguf":
        raise UserError(f"--out {args.out}: --format gguf writes one file; give a path ending in .gguf")
    if (args.reference is not None or args.tokens != 128) and not args.verify:
        raise UserError("--reference and --tokens apply with --verify only")
    if args.tokens < 2:
        raise UserError(f"--tokens must be at least 2, got {args.tokens}")
    if not args.model.is_dir():
        raise UserError(f"--model {args.model}: not a model folder (expected a folder with config.json)")
    if args.out.exists() and not args.overwrite:
        raise UserError(f"--out {args.out} already exists; pass --overwrite to replace it or choose another path")


def verify(path: Path, *, reference: Path | None = None, source: Path | None = None, tokens: int = 128) -> dict[str, Any]:
    """Run load-back verification on a finished export and print one summary line on stderr;
    returns the report as a dict for JSON output. Raises VerifyError (exit code 2) on a mismatch.
    `quantscope quantize --verify` calls this on its output folder."""
    from core.cli.quantize import ProgressPrinter
    from core.export.verify import verify_export

    report = verify_export(path, reference=reference, source=source, tokens=tokens, sink=ProgressPrinter())
    sys.stderr.write(
        f"verified {path.name} with {report.loader}: max logit diff {report.max_logit_diff:.3g} "
        f"(relative {report.rel_logit_diff:.2g}), perplexity {report.ppl_loader:.4f} vs {report.ppl_quantscope:.4f} "
        f"over {report.tokens} tokens\n"
    )
    return report.to_dict()


def _size_gib(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 2**30


def run(args: argparse.Namespace) -> int:
    from core.cli.quantize import ProgressPrinter

    _check(args)
    start = time.perf_counter()
    sink = ProgressPrinter()
    if args.format == "gguf":
        from core.export.gguf import export_gguf

        preset = args.preset or "Q8_0"
        out = export_gguf(args.model, args.out, preset, overwrite=args.overwrite, sink=sink)
    else:
        from core.export.convert import relayout

        preset = None
        out = relayout(args.model, args.out, args.format, overwrite=args.overwrite, sink=sink)
    seconds = time.perf_counter() - start
    report = None
    if args.verify:
        reference = args.reference if args.reference is not None else (None if args.format == "gguf" else args.model)
        # A GGUF's own tokenization is checked against the tokenizer of the folder it came from.
        source = args.model if args.format == "gguf" else None
        report = verify(out, reference=reference, source=source, tokens=args.tokens)
    if args.json:
        doc: dict[str, Any] = {"output": str(out), "format": args.format, "source": str(args.model),
                               "seconds": round(seconds, 3), "size_gib": _size_gib(out)}
        if preset is not None:
            doc["preset"] = preset
        if report is not None:
            doc["verify"] = report
        emit_json(doc)
        return 0
    what = f"{args.format} ({preset})" if preset else args.format
    sys.stdout.write(f"wrote {out} as {what} in {seconds:.1f} s, {_size_gib(out):.3f} GiB"
                     + (" — verified" if report else "") + "\n")
    return 0
