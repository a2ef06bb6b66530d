"""`quantscope quantize`: quantize a model folder layer by layer into a new folder."""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from core.cli import UserError, emit_json
from core.cli.options import add_device_options, device_options

METHODS = ("rtn", "nf4", "fp4", "fp8", "gptq", "awq", "smoothquant", "llm_int8")

# Which method each option applies to; an option given for another method is refused, so a
# typo such as `--method rtn --double-quant` does not silently do nothing.
_APPLIES: dict[str, tuple[str, ...]] = {
    "bits": ("rtn", "gptq", "awq"),
    "group_size": ("rtn", "gptq", "awq"),
    "sym": ("rtn", "gptq", "awq"),
    "granularity": ("rtn", "gptq", "awq", "fp8"),
    "clip_search": ("rtn",),
    "double_quant": ("nf4", "fp4"),
    "blocksize": ("nf4", "fp4", "gptq"),
    "fp8_format": ("fp8",),
    "damp": ("gptq",),
    "act_order": ("gptq",),
    "alpha": ("smoothquant",),
    "act_scheme": ("smoothquant",),
    "threshold": ("llm_int8",),
}
_CALIB_OPTIONS = ("calib", "samples", "seq_len", "seed")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "quantize", help="quantize a model folder into a new folder",
        description="Quantize a Hugging Face model folder layer by layer (one decoder layer in memory at a time).",
    )
    p.add_argument("--model", required=True, type=Path, help="model folder with config.json and *.safetensors")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--out", required=True, type=Path, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--export", default=None, help="checkpoint layout (default: the method's usual layout; gptq when "
                   "the group size leaves a ragged last group in some linear)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output that Quantscope wrote (an empty folder or an earlier "
                        "Quantscope output; anything else is refused)")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--strict", action="store_true",
                   help="refuse a model whose side files are damaged (a tokenizer.json that does not load) "
                        "instead of warning and copying them as they are")
    p.add_argument("--resume", action="store_true",
                   help="continue a crashed job for the same --out from its last finished layer "
                        "(starts fresh, saying why, when the model or settings changed)")
    add_device_options(p)
    p.add_argument("--verify", action="store_true",
                   help="after writing, load the output with its consumer library and compare logits "
                        "with Quantscope's model (a mismatch exits non-zero; the output is kept)")
    g = p.add_argument_group("integer methods (rtn, gptq, awq)")
    g.add_argument("--bits", type=int, default=None, help="2-8 (default 4)")
    g.add_argument("--group-size", type=int, default=None, help="columns per scale group; -1 = per channel")
    sym = g.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_const", const=True, default=None)
    sym.add_argument("--asym", dest="sym", action="store_const", const=False)
    g.add_argument("--granularity", choices=("tensor", "channel", "group"), default=None)
    g.add_argument("--clip-search", action="store_true", default=None, help="rtn: search a clip ratio per group")
    g = p.add_argument_group("4-bit (nf4, fp4) and fp8")
    g.add_argument("--double-quant", action="store_true", default=None)
    g.add_argument("--blocksize", type=int, default=None, help="nf4/fp4 block size (64); gptq column block (128)")
    g.add_argument("--fp8-format", choices=("e4m3", "e5m2"), default=None)
    g = p.add_argument_group("calibrated methods (gptq, awq, smoothquant, llm_int8)")
    g.add_argument("--damp", type=float, default=None, help="gptq dampening (0.01)")
    g.add_argument("--act-order", action="store_true", default=None, help="gptq: columns by decreasing Hessian diagonal")
    g.add_argument("--alpha", default=None, metavar="A|auto",
                   help="smoothquant migration strength, 0-1 (0.5), or 'auto' to search it per layer")
    g.add_argument("--act-scheme", choices=("dynamic", "static"), default=None, help="smoothquant activations")
    g.add_argument("--threshold", type=float, default=None, help="llm_int8 outlier threshold (6.0)")
    g.add_argument("--calib", default=None, help="'builtin' or a .txt/.jsonl file")
    g.add_argument("--samples", type=int, default=None, help="calibration samples (128)")
    g.add_argument("--seq-len", type=int, default=None, help="calibration tokens per sample (512)")
    g.add_argument("--seed", type=int, default=None)
    p.add_argument("--skip", nargs="+", action="extend", default=[], metavar="PATTERN",
                   help="also keep modules whose name contains PATTERN (or matches it as a glob) unquantized")
    p.set_defaults(func=run)


def _given(args: argparse.Namespace, key: str) -> bool:
    return getattr(args, key, None) is not None


def method_config(args: argparse.Namespace) -> Any:
    """The method's frozen config from the parsed options (ValueError/UserError on bad input)."""
    from core.config import (
        CALIBRATED_METHODS,
        AWQConfig,
        FourBitConfig,
        FP8Config,
        GPTQConfig,
        Granularity,
        LLMInt8Config,
        RTNConfig,
        SmoothQuantConfig,
    )

    m = args.method
    for key, methods in _APPLIES.items():
        if _given(args, key) and m not in methods:
            flag = "--" + key.replace("_", "-")
            if key == "sym":
                flag = "--sym/--asym"
            raise UserError(f"{flag} does not apply to --method {m} (it applies to {', '.join(methods)})")
    if m not in CALIBRATED_METHODS:
        for key in _CALIB_OPTIONS:
            if _given(args, key):
                raise UserError(f"--{key.replace('_', '-')} does not apply to --method {m}: it needs no calibration")

    kw: dict[str, Any] = {}
    if m in ("rtn", "gptq", "awq"):
        if _given(args, "bits"):
            kw["bits"] = args.bits
        if _given(args, "sym"):
            kw["sym"] = args.sym
        granularity = Granularity(args.granularity) if args.granularity else None
        if _given(args, "group_size"):
            if args.group_size <= 0:
                if granularity is Granularity.GROUP:
                    raise UserError(f"--group-size {args.group_size} means per channel; drop --granularity group "
                                    "or give a positive group size")
                granularity = granularity or Granularity.CHANNEL
            else:
                if granularity not in (None, Granularity.GROUP):
                    raise UserError(f"--group-size {args.group_size} needs --granularity group, "
                                    f"not {granularity.value}")
                kw["group_size"] = args.group_size
        if granularity is not None:
            kw["granularity"] = granularity
    if m == "rtn":
        if args.clip_search:
            kw["clip_search"] = True
        return RTNConfig(**kw)
    if m in ("nf4", "fp4"):
        kw = {"quant_type": m, "double_quant": bool(args.double_quant)}
        if _given(args, "blocksize"):
            kw["blocksize"] = args.blocksize
        return FourBitConfig(**kw)
    if m == "fp8":
        kw = {}
        if args.fp8_format:
            kw["fmt"] = args.fp8_format
        if args.granularity:
            kw["granularity"] = args.granularity
        return FP8Config(**kw)
    if m == "gptq":
        if _given(args, "damp"):
            kw["damp"] = args.damp
        if _given(args, "blocksize"):
            kw["block_size"] = args.blocksize
        if args.act_order:
            kw["act_order"] = True
        return GPTQConfig(**kw)
    if m == "awq":
        return AWQConfig(**kw)
    if m == "smoothquant":
        if _given(args, "alpha"):
            kw["alpha"] = _alpha(args.alpha)
        if args.act_scheme:
            kw["act_scheme"] = args.act_scheme
        return SmoothQuantConfig(**kw)
    if _given(args, "threshold"):
        kw["threshold"] = args.threshold
    return LLMInt8Config(**kw)


def _alpha(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--alpha must be a number between 0 and 1 or 'auto', got {text!r}") from None


def calib_config(args: argparse.Namespace) -> Any:
    from core.config import CALIBRATED_METHODS, CalibConfig

    if args.method not in CALIBRATED_METHODS:
        return None
    kw = {k: getattr(args, k) for k in ("samples", "seq_len", "seed") if _given(args, k)}
    if args.calib:
        kw["source"] = args.calib
    return CalibConfig(**kw)


class ProgressPrinter:
    """Event sink that writes a simple line-based progress bar on stderr (a few lines a second
    at most, plus stage changes and the end of each stage)."""

    def __init__(self, stream: TextIO | None = None, width: int = 30, interval: float = 0.5) -> None:
        self.stream = stream
        self.width = width
        self.interval = interval
        self._last = -math.inf

    def __call__(self, event: Any) -> None:
        from core.events import Log, Progress, StageStarted

        if isinstance(event, StageStarted):
            msg = f" ({event.message})" if event.message else ""
            self._last = -math.inf  # the first step of a new stage always shows
            self._line(f"{event.stage}{msg}")
        elif isinstance(event, Progress) and event.total > 0:
            now = time.monotonic()
            if event.done < event.total and now - self._last < self.interval:
                return
            self._last = now
            filled = int(self.width * event.done / event.total)
            bar = "#" * filled + "-" * (self.width - filled)
            self._line(f"{event.stage} [{bar}] {event.done}/{event.total} {event.message}".rstrip())
        elif isinstance(event, Log) and event.level in ("warning", "error"):
            self._line(f"{event.level}: {event.message}")

    def _line(self, text: str) -> None:
        stream = self.stream or sys.stderr  # looked up late: tests and callers may swap sys.stderr
        stream.write(text + "\n")
        stream.flush()


def _verify(out: Path) -> tuple[dict[str, Any], str | None]:
    """`quantscope export --verify`'s check on the output: (report, error message or None)."""
    from core.cli.export import verify
    from core.export.verify import VerifyError

    try:
        return verify(out), None
    except VerifyError as exc:
        return {"ok": False, "error": str(exc)}, str(exc)


def _check_tokenizer(args: argparse.Namespace) -> None:
    """A tokenizer.json that does not load is copied into the output as is (the weights are still
    good): a warning line by default, a refusal before anything is written with --strict."""
    from core.events import Log
    from core.validate import tokenizer_problem

    problem = tokenizer_problem(args.model)
    if problem is None:
        return
    if args.strict:
        raise UserError(f"{problem} (--strict refuses a damaged tokenizer)")
    ProgressPrinter()(Log("warning", f"{problem}; it is copied into the output as it is (--strict refuses it)"))


def run(args: argparse.Namespace) -> int:
    from core.config import DEFAULT_SKIP, QuantJob
    from core.engine import run_quantization

    method = method_config(args)
    _check_tokenizer(args)
    job = QuantJob(
        model=args.model, out=args.out, method=method, calib=calib_config(args), export=args.export,
        skip=tuple(dict.fromkeys(DEFAULT_SKIP + tuple(args.skip))), overwrite=args.overwrite,
        resume=args.resume, **device_options(args),
    )
    result = run_quantization(job, sink=ProgressPrinter())
    verify_error = None
    doc = result.to_json()
    if args.verify:
        doc["verify"], verify_error = _verify(result.output)
        if verify_error:
            sys.stderr.write(f"quantscope quantize: error: verification failed (output kept in {result.output}): "
                             f"{verify_error}\n")
    if args.json:
        emit_json(doc)
        return 2 if verify_error else 0
    errors = [r["rel_error"] for r in result.layers]
    mean_rel = sum(errors) / len(errors) if errors else 0.0
    sys.stdout.write(
        f"wrote {result.output} ({result.method}, {result.export} layout)\n"
        f"{len(result.layers)} linears quantized in {result.seconds:.1f} s; mean relative error {mean_rel:.4f}; "
        f"peak RSS {result.peak_rss_gib:.2f} GiB; {result.source_gib:.3f} GiB -> {result.output_gib:.3f} GiB\n"
    )
    return 2 if verify_error else 0
