"""`quantscope catalog {models,gpus}`: the shipped model and GPU catalogs."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from core.cli import emit_json


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("catalog", help="list the model or GPU catalog",
                              description="The models (config facts only) and GPUs the planner knows without downloads.")
    p.add_argument("kind", choices=["models", "gpus"], help="which catalog")
    p.add_argument("--search", default=None, help="only entries matching these words")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.set_defaults(func=run)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from core import catalog
    from core.param_count import count_parameters

    if args.kind == "models":
        entries = catalog.search_models(args.search) if args.search else catalog.models()
        docs = []
        for m in entries:
            d = m.to_json()
            counts = count_parameters(m.config)
            d["total_params"], d["active_params"] = counts["total"], counts["active"]
            docs.append(d)
        if args.json:
            emit_json({"models": docs})
            return 0
        rows = [[d["id"], d["name"], f"{d['total_params'] / 1e9:.2f}",
                 f"{d['active_params'] / 1e9:.2f}" if d["active_params"] != d["total_params"] else "",
                 str(d["model_type"]), d["hf_repo"]] for d in docs]
        sys.stdout.write(_table(["id", "name", "params (B)", "active (B)", "type", "Hugging Face repo"], rows))
        return 0
    gpus = catalog.gpus()
    if args.search:
        words = args.search.lower().split()
        gpus = [g for g in gpus if all(w in f"{g.id} {g.name} {g.generation}".lower() for w in words)]
    if args.json:
        emit_json({"gpus": [g.to_json() for g in gpus]})
        return 0
    rows = [[g.id, g.name, f"{g.memory_gib:g}" if g.memory_gib else "(typed in)",
             f"{g.bandwidth_gb_s:g}" if g.bandwidth_gb_s else "(typed in)", g.generation,
             f"{g.compute_capability:g}", ",".join(g.native_formats)] for g in gpus]
    sys.stdout.write(_table(["id", "name", "GiB", "GB/s", "generation", "cc", "native formats"], rows))
    return 0
