"""The `quantscope` command. Each subcommand lives in its own module exposing
`register(subparsers)`, which adds its parser and sets `func` (args -> exit code)."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import signal
import sys
import threading
from typing import Any, Iterator

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


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C's KeyboardInterrupt, so a job
    stops the same way: its temporary output is removed and its lock released."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


# Signals that cancel a command as Ctrl-C does (a closed terminal, `kill`, a service stop).
_CANCEL_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def _cancel_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Terminated in the main thread while the command runs; repeats
    are ignored while it cleans up. The previous handlers are restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        for s in _CANCEL_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in _CANCEL_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


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
    # The desktop app keeps the default handlers: its job processes clean up after themselves.
    signals = _cancel_on_signals() if args.command != "gui" else contextlib.nullcontext()
    try:
        with signals:
            return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError, OSError) as exc:
        if args.verbose:
            raise
        print(f"quantscope {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Terminated as exc:
        _say(f"quantscope {args.command}: stopped by {exc}; nothing unfinished was left behind")
        return 128 + exc.signum
    except KeyboardInterrupt:
        _say(f"quantscope {args.command}: interrupted; nothing unfinished was left behind")
        return 130


def _say(line: str) -> None:
    """A last line on stderr, which a closed terminal (SIGHUP) may no longer take."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
