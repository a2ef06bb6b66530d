"""`quantscope gpus`: detected NVIDIA GPUs (matched to the catalog) and system RAM."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from core.cli import emit_json


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("gpus", help="detected GPUs and system RAM",
                              description="NVIDIA GPUs seen by PyTorch (and NVML when installed), matched to the "
                                          "GPU catalog for bandwidth and native formats, and system RAM.")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from core.hardware import detect

    hw = detect()
    if args.json:
        emit_json(hw.to_json())
    else:
        sys.stdout.write(hw.summary() + "\n")
    return 0
