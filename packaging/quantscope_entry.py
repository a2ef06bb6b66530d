"""Entry point of the standalone (PyInstaller) build: the same `quantscope` command as the
installed console script."""
from __future__ import annotations

import multiprocessing
import sys

if __name__ == "__main__":
    # A frozen app re-executes itself for multiprocessing children; without this a child would
    # start a second CLI instead of its worker.
    multiprocessing.freeze_support()
    from core.cli import main

    sys.exit(main())
