"""Options several subcommands share: where a command runs (--device) and on how many CPU
threads (--threads). Their values are checked by core.devices, the module that owns the policy."""
from __future__ import annotations

import argparse
from typing import Any

from core.cli import UserError


def add_device_options(parser: argparse.ArgumentParser, *, threads: bool = True) -> None:
    parser.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N",
                        help="where to run: auto (default: the GPU when one is present and the job fits its free "
                             "memory, else the CPU), cpu, cuda or cuda:N")
    if threads:
        parser.add_argument("--threads", type=int, default=None, metavar="N",
                            help="CPU threads (default: the cores this process may run on)")


def device_options(args: argparse.Namespace) -> dict[str, Any]:
    """{"device": spec, "threads": N or None} from parsed arguments, checked (UserError)."""
    from core.devices import check_device_spec, check_threads

    try:
        out: dict[str, Any] = {"device": check_device_spec(args.device)}
        out["threads"] = check_threads(getattr(args, "threads", None))
    except ValueError as exc:
        raise UserError(f"--{'device' if 'device' in str(exc) else 'threads'}: {exc}") from None
    return out
