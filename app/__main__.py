"""`python -m app [--model PATH|CATALOG_ID] [--theme light|dark]` — what `quantscope gui` runs."""
from __future__ import annotations

import argparse
import sys

from app.main import run_app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quantscope gui")
    parser.add_argument("--model", default=None)
    parser.add_argument("--theme", choices=("light", "dark"), default=None)
    args = parser.parse_args(argv)
    return run_app(model=args.model, theme=args.theme)


if __name__ == "__main__":
    sys.exit(main())
