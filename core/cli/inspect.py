"""`quantscope inspect`: weight and activation outlier statistics per linear layer."""
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
        "inspect", help="weight/activation outlier statistics per linear layer",
        description="Per linear layer: weight absmax per output and input channel, kurtosis, fraction of "
                    "weights beyond 3σ and 6σ; with --calib also activation absmax per channel over the "
                    "calibration text, the channels at or above the LLM.int8 threshold and the SmoothQuant "
                    "scales. Works on plain folders (streamed one decoder layer at a time, so models larger than "
                    "RAM work) and Quantscope-quantized folders (loaded whole, weights dequantized).",
    )
    p.add_argument("--model", required=True, type=Path, help="model folder (plain or quantized by Quantscope)")
    p.add_argument("--calib", default=None,
                   help="'builtin' (Python's pydoc topics) or a .txt/.jsonl file; adds activation statistics")
    p.add_argument("--samples", type=int, default=16, help="calibration samples (16)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample (512)")
    p.add_argument("--seed", type=int, default=0, help="seed for the calibration windows (0)")
    p.add_argument("--threshold", type=float, default=6.0, help="LLM.int8 outlier threshold (6.0)")
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength (0.5)")
    add_device_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.set_defaults(func=run)


def _calib(args: argparse.Namespace) -> Any:
    from core.config import CalibConfig

    if args.calib is None:
        return None
    if args.samples <= 0:
        raise UserError(f"--samples must be positive, got {args.samples}")
    if args.calib != "builtin" and not Path(args.calib).expanduser().is_file():
        raise UserError(f"--calib {args.calib}: file not found (use 'builtin' or a .txt/.jsonl file)")
    source = args.calib if args.calib == "builtin" else str(Path(args.calib).expanduser())
    return CalibConfig(source=source, samples=args.samples, seq_len=args.seq_len, seed=args.seed)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def run(args: argparse.Namespace) -> int:
    from core.cli.quantize import ProgressPrinter
    from core.outliers import inspect_model

    if not args.model.is_dir():
        raise UserError(f"--model {args.model}: not a model folder (give a folder with config.json and *.safetensors)")
    from core.devices import thread_scope

    opts = device_options(args)
    with thread_scope(opts["threads"]):
        report = inspect_model(args.model, _calib(args), threshold=args.threshold, alpha=args.alpha,
                               sink=ProgressPrinter(stream=sys.stderr), device=opts["device"])
    if args.json:
        emit_json(_json_safe(report))
        return 0
    has_act = report["calibration"] is not None
    head = f"{'layer':<44} {'shape':>12} {'absmax':>8} {'kurt':>8} {'>3σ %':>7} {'>6σ %':>8}"
    if has_act:
        head += f" {'act max':>9} {'outl ch':>7}"
    lines = [head]
    for e in report["layers"]:
        w = e["weight"]
        shape = "x".join(map(str, e["shape"]))
        line = (f"{e['name']:<44} {shape:>12} {w['absmax']:>8.3g} {w['kurtosis']:>8.3g} "
                f"{100 * w['frac_beyond_3sigma']:>7.3f} {100 * w['frac_beyond_6sigma']:>8.4f}")
        if "activation" in e:
            a = e["activation"]
            line += f" {a['absmax']:>9.3g} {a['n_outlier_channels']:>7d}"
        lines.append(line)
    s = report["summary"]
    lines.append(f"{s['linears']} linears; highest weight kurtosis {s['max_weight_kurtosis']:.3g} "
                 f"({s['max_weight_kurtosis_layer']})"
                 + (f"; {s['outlier_channels_total']} input channels ≥ {report['threshold']:g} in total" if has_act else ""))
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
