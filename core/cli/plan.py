"""`quantscope plan`: VRAM, offload split and decode speed per format for a model on a GPU."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from core.cli import UserError, emit_json


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan", help="VRAM estimate per format, offload split and decode speed",
        description="Estimate GPU memory (weights, KV cache, activations, engine overhead) for each weight "
                    "format, how many decoder layers fit on the GPU(s), and the memory-bound decode speed. "
                    "Needs no weights: --model may be a catalog id (see `quantscope catalog models`).",
    )
    p.add_argument("--model", required=True,
                   help="model folder, config.json, GGUF file, or catalog id (e.g. llama-3.1-8b)")
    p.add_argument("--gpu", default="auto",
                   help="'auto' (first detected GPU), a catalog GPU (e.g. rtx-4090), 'custom', or one GPU per card "
                        "for unequal cards (e.g. rtx-4090,rtx-3090: llama.cpp splits layers by memory)")
    p.add_argument("--gpu-memory", type=float, default=None, help="GiB per card, for --gpu custom")
    p.add_argument("--gpu-bandwidth", type=float, default=None, help="GB/s per card, for --gpu custom")
    p.add_argument("--num-gpus", type=int, default=1, help="identical cards per machine (1-8)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (vllm; default: the cards of one machine)")
    p.add_argument("--pp", type=int, default=None, help="pipeline-parallel stages (default: one per machine)")
    p.add_argument("--nodes", type=int, default=1, help="machines of --num-gpus cards each (1)")
    p.add_argument("--interconnect", default=None, choices=["nvlink", "pcie", "network"],
                   help="link of the tensor-parallel all-reduces (default: from the catalog card and --nodes)")
    p.add_argument("--experts-on-cpu", action="store_true",
                   help="MoE: routed experts of every layer in CPU RAM (llama.cpp -ot exps=CPU), the rest on the GPU")
    p.add_argument("--n-cpu-moe", type=int, default=None, metavar="N",
                   help="MoE: routed experts of the first N layers in CPU RAM (llama.cpp --n-cpu-moe N)")
    p.add_argument("--llama-cpp-mla", default="current", choices=["current", "2025", "pre-mla"],
                   help="llama.cpp MLA cache: current (latent 576, since PR #19067), 2025 (K 576 + V 512, "
                        "PR #12801 builds), pre-mla (full per-head K/V: old GGUFs/builds)")
    p.add_argument("--no-flash-attn", action="store_true",
                   help="llama.cpp without flash attention: its compute buffer holds ubatch × context scores")
    p.add_argument("--context", type=int, default=4096, help="tokens of context per sequence (4096)")
    p.add_argument("--batch", type=int, default=1, help="concurrent sequences (1)")
    p.add_argument("--kv-dtype", default="fp16", choices=["fp16", "bf16", "fp8", "int8"], help="KV-cache dtype")
    p.add_argument("--engine", default="transformers", choices=["transformers", "vllm", "llama.cpp"],
                   help="runtime whose overhead profile to use")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM's share of each card (0.9)")
    p.add_argument("--formats", default=None, help="comma-separated formats (default: a common set; see the table)")
    p.add_argument("--cpu-ram", type=float, default=None, help="GiB of RAM free for offloaded layers (default: detected)")
    p.add_argument("--cpu-bandwidth", type=float, default=None, help="CPU memory bandwidth GB/s (default 50)")
    p.add_argument("--gpu-layers", type=int, default=None,
                   help="force this many decoder layers on the GPU (one format: the first of --formats)")
    p.add_argument("--quantize-memory", action="store_true", help="also show the memory each method needs to quantize")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.set_defaults(func=run)


def _gpu(args: argparse.Namespace) -> Any:
    from core import catalog

    if "," in args.gpu:
        return [catalog.get_gpu(x.strip()) for x in args.gpu.split(",") if x.strip()]
    if args.gpu.lower() == "custom" or args.gpu_memory is not None:
        if args.gpu_memory is None or args.gpu_bandwidth is None:
            raise UserError("--gpu custom needs --gpu-memory GIB and --gpu-bandwidth GB/S")
        return catalog.custom_gpu(args.gpu_memory, args.gpu_bandwidth)
    if args.gpu.lower() == "auto":
        from core.hardware import detect

        hw = detect()
        if not hw.gpus:
            raise UserError("no GPU detected; choose one with --gpu NAME (see `quantscope catalog gpus`) "
                            "or --gpu custom --gpu-memory GIB --gpu-bandwidth GB/S")
        return hw.gpus[0].spec()
    return catalog.get_gpu(args.gpu)


def _check(args: argparse.Namespace) -> None:
    if args.context <= 0:
        raise UserError(f"--context must be a positive number of tokens, got {args.context}")
    if args.batch <= 0:
        raise UserError(f"--batch must be a positive integer, got {args.batch}")
    if not 1 <= args.num_gpus <= 8:
        raise UserError(f"--num-gpus must be between 1 and 8 per machine, got {args.num_gpus} (add machines with --nodes)")
    for flag, v in (("--tp", args.tp), ("--pp", args.pp), ("--nodes", args.nodes)):
        if v is not None and v < 1:
            raise UserError(f"{flag} must be a positive integer, got {v}")
    if args.n_cpu_moe is not None and args.n_cpu_moe < 0:
        raise UserError(f"--n-cpu-moe must be zero or a positive number of layers, got {args.n_cpu_moe}")


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = [("format", "format"), ("bpw", "bits_per_weight"), ("weights", "weights_gib"), ("KV", "kv_cache_gib"),
            ("act", "activations_gib"), ("overhead", "overhead_gib"), ("total GiB", "total_gib"), ("fits", "fits"),
            ("GPU/CPU layers", None), ("tok/s", "decode_tokens_per_s"), ("native", "native")]
    table = [[h for h, _ in cols]]
    for r in rows:
        line = []
        for h, key in cols:
            if key is None:
                line.append(f"{r['gpu_layers']}/{r['cpu_layers']}" + ("" if r["fits_with_offload"] else " (no)"))
            elif key == "bits_per_weight":
                line.append(f"{r[key]:.3f}")
            else:
                line.append(_cell(r[key]))
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    out = []
    for j, row in enumerate(table):
        out.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    from core import planner

    _check(args)
    gpu = _gpu(args)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()] if args.formats else None
    common = dict(context=args.context, batch=args.batch, kv_dtype=args.kv_dtype, engine=args.engine,
                  num_gpus=args.num_gpus, gpu_memory_utilization=args.gpu_memory_utilization,
                  cpu_ram_gib=args.cpu_ram, cpu_bandwidth_gb_s=args.cpu_bandwidth, tp=args.tp, pp=args.pp,
                  nodes=args.nodes, interconnect=args.interconnect, expert_offload=args.experts_on_cpu,
                  cpu_moe_layers=args.n_cpu_moe, llama_cpp_mla=args.llama_cpp_mla,
                  flash_attention=not args.no_flash_attn)
    result = planner.plan(args.model, gpu, formats=formats, **common)
    doc = result.to_json()
    if args.gpu_layers is not None:
        fmt = formats[0] if formats else "int4_g128"
        row = planner.plan_offload(args.model, gpu, format=fmt, gpu_layers=args.gpu_layers, **common)
        doc["formats"] = [row.to_json()]
    if args.quantize_memory:
        doc["quantize_memory"] = planner.quantize_memory_all(args.model)
    if args.json:
        emit_json(doc)
        return 0
    m, g = doc["model"], doc["gpu"]
    active = f", {m['active_params'] / 1e9:.2f} B active" if m["routed_experts"] else ""
    w = sys.stdout.write
    w(f"model: {m['name']} ({m['source']}), {m['total_params'] / 1e9:.3f} B parameters{active}, "
      f"{m['num_layers']} layers\n")
    lay = doc["layout"]
    cards = f"{lay['num_cards']} × {g['name']}" if len(set(lay["gpus"])) == 1 else " + ".join(lay["gpus"])
    par = f" (TP {lay['tp']} × PP {lay['pp']}, {lay['nodes']} machine(s), {lay['interconnect']})" if lay["num_cards"] > 1 else ""
    w(f"GPU: {cards}{par} ({g['usable_gib']:g} GiB usable, {g['bandwidth_gb_s']:g} GB/s); engine {args.engine}; "
      f"context {args.context} × batch {args.batch}, KV {args.kv_dtype}; CPU RAM {doc['cpu_ram_gib']:.1f} GiB\n\n")
    w(format_table(doc["formats"]) + "\n\n")
    first = doc["formats"][0]
    if len(first["cards"]) > 1:
        w(f"per card ({first['format']}):\n")
        for c in first["cards"]:
            w(f"  card {c['index']} {c['gpu']} stage {c['stage']} layers {c['layers'][0]}-{c['layers'][1]}: "
              f"weights {c['weights_gib']:.2f} + KV {c['kv_cache_gib']:.2f} + act {c['activations_gib']:.2f} + "
              f"overhead {c['overhead_gib']:.2f} = {c['total_gib']:.2f} of {c['capacity_gib']:.2f} GiB"
              f"{'' if c['fits'] else '  (does not fit)'}\n")
        w("\n")
    if first["expert_offload"]:
        w(f"experts on CPU ({first['format']}): {first['experts_cpu_gib']:.2f} GiB of routed experts "
          f"({first['cpu_moe_layers']} layers) in CPU RAM\n\n")
    w(f"how {first['format']} is computed:\n")
    for k, v in first["formulas"].items():
        w(f"  {k}: {v}\n")
    notes = list(doc["notes"])
    for r in doc["formats"]:
        notes += [f"{r['format']}: {n}" for n in r["notes"]]
    if notes:
        w("notes:\n" + "".join(f"  - {n}\n" for n in notes))
    if args.quantize_memory:
        w("\nmemory to quantize (CPU engine, 128 × 512 calibration):\n")
        for name, q in doc["quantize_memory"].items():
            w(f"  {name:12s} peak CPU {q['peak_cpu_gib']:.2f} GiB\n")
    return 0
