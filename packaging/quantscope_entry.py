"""Entry point of the standalone (PyInstaller) build: the same `quantscope` command as the
installed console script.

In a frozen app `sys.executable` is this program, not a Python interpreter, yet Quantscope starts
child processes as `sys.executable -m MODULE ...` (the GUI runs as `-m app`, so that core never
imports Qt). This entry point therefore also accepts `-m MODULE [ARGS]` and runs that bundled
module as __main__, like `python -m` would.
"""
from __future__ import annotations

import multiprocessing
import runpy
import sys


def main() -> int:
    if len(sys.argv) >= 3 and sys.argv[1] == "-m":
        module = sys.argv[2]
        sys.argv = [sys.argv[0], *sys.argv[3:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    from core.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    # A frozen app re-executes itself for multiprocessing children (the GUI's job processes,
    # app/jobproc.py); without this a child would start a second CLI instead of its worker.
    multiprocessing.freeze_support()
    sys.exit(main())
