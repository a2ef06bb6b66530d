"""The run report: one JSON document (job, settings, per-layer metrics, evaluation) plus a PNG
of the per-layer plot and a self-contained HTML page. No Qt here except the caller's PNG."""
from __future__ import annotations

import html
import json
import math
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import core


def _clean(value: Any) -> Any:
    """JSON-safe: paths to strings, non-finite floats to None, dataclasses to dicts."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "value") and type(value).__module__ == "core.config":
        return value.value  # Enums such as Granularity
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def build_report(job: Any, result: Any, layers: list[dict], evaluation: dict | None,
                 verification: dict | None = None) -> dict[str, Any]:
    """`verification`: the export check's outcome ({"status": "ok" | "mismatch" | "error", …});
    None when the output was not verified (the report says so rather than leaving it out)."""
    doc: dict[str, Any] = {
        "quantscope_version": core.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": str(getattr(job, "model", "")) if job is not None else None,
        "output": str(getattr(result, "output", "")) if result is not None else None,
        "method": getattr(result, "method", None) or (getattr(job.method, "method", None) if job else None),
        "settings": _clean(getattr(job, "method", None)) if job is not None else None,
        "calibration": _clean(getattr(job, "calib", None)) if job is not None else None,
        "export": getattr(result, "export", None) or (getattr(job, "export", None) if job else None),
        "seconds": getattr(result, "seconds", None),
        "peak_rss_gib": getattr(result, "peak_rss_gib", None),
        "source_gib": getattr(result, "source_gib", None),
        "output_gib": getattr(result, "output_gib", None),
        "layers": _clean(layers),
        "evaluation": _clean(evaluation) if evaluation else None,
        "verification": _clean(verification) if verification else {"status": "not verified"},
    }
    return doc


def write_report(folder: Path, doc: dict[str, Any], png: Path | None = None) -> dict[str, Path]:
    """Write report.json and report.html into `folder` (created); returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / "report.json"
    json_path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    html_path = folder / "report.html"
    html_path.write_text(render_html(doc, png.name if png is not None else None), encoding="utf-8")
    out = {"json": json_path, "html": html_path}
    if png is not None:
        out["png"] = png
    return out


def render_html(doc: dict[str, Any], png_name: str | None) -> str:
    esc = html.escape

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return esc("" if v is None else str(v))

    rows = "".join(
        f"<tr><th>{esc(k)}</th><td>{fmt(doc.get(k))}</td></tr>"
        for k in ("model", "output", "method", "export", "seconds", "peak_rss_gib", "source_gib", "output_gib")
    )
    settings = esc(json.dumps(doc.get("settings"), indent=1))
    ev = doc.get("evaluation") or {}
    ev_rows = "".join(f"<tr><th>{esc(str(k))}</th><td>{fmt(v)}</td></tr>" for k, v in ev.items()
                      if not isinstance(v, dict))
    ver = doc.get("verification") or {"status": "not verified"}
    ver_rows = "".join(f"<tr><th>{esc(str(k))}</th><td>{fmt(v)}</td></tr>" for k, v in ver.items()
                       if not isinstance(v, dict))
    layer_rows = "".join(
        "<tr>" + "".join(f"<td>{fmt(layer.get(k))}</td>" for k in ("name", "rel_error", "sqnr_db", "mse", "seconds"))
        + "</tr>"
        for layer in doc.get("layers") or []
    )
    img = f'<img src="{esc(png_name)}" alt="per-layer error" style="max-width:100%">' if png_name else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Quantscope report</title>
<style>body{{font-family:sans-serif;margin:2em;color:#1f2328}}table{{border-collapse:collapse;margin:1em 0}}
th,td{{border:1px solid #d0d7de;padding:3px 8px;text-align:left}}th{{background:#f6f8fa}}</style></head>
<body><h1>Quantscope report</h1><p>Quantscope {esc(str(doc.get('quantscope_version')))}, {esc(str(doc.get('created')))}</p>
<table>{rows}</table><h2>Settings</h2><pre>{settings}</pre>
<h2>Evaluation</h2><table>{ev_rows or '<tr><td>not evaluated</td></tr>'}</table>
<h2>Export verification</h2><table>{ver_rows}</table>
<h2>Per-layer error</h2>{img}
<table><tr><th>linear</th><th>rel. error</th><th>SQNR dB</th><th>MSE</th><th>seconds</th></tr>{layer_rows}</table>
</body></html>
"""
