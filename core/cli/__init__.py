"""The `quantscope` command. Each subcommand lives in its own module exposing
`register(subparsers)`, which adds its parser and sets `func` (args -> exit code)."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Any

from core import __version__

# Subcommand modules, imported lazily so `quantscope gpus` does not pay for transformers.
SUBCOMMANDS = {
    "gui": "core.cli.gui",
    "gpus": "core.cli.hardware",
    "catalog": "core.cli.catalog",
    "plan": "core.cli.plan",
    "inspect": "core.cli.inspect",
    "quantize": "core.cli.quantize",
    "eval": "core.cli.evaluate",
    "export": "core.cli.export",
}


class UserError(Exception):
    """Bad input: printed as one line on stderr, exit code 2."""


def emit_json(doc: Any) -> None:
    json.dump(doc, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantscope", description="Plan VRAM for, quantize and evaluate LLMs.")
    parser.add_argument("--version", action="version", version=f"quantscope {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue  # subcommand not built into this version
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        args = parser.parse_args(["gui"])
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError, OSError) as exc:
        if args.verbose:
            raise
        print(f"quantscope {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"quantscope {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
