"""The GPU and model catalogs shipped in `resources/` (data, not code): load, look up, search.

GPU entries give memory (GiB), the memory CUDA reports as usable (GiB), peak bandwidth (decimal
GB/s), generation, compute capability, the datatypes the card runs natively, whether its cards talk
over NVLink, and which engines run on it (Apple silicon and AMD Instinct entries say what works). Model entries hold only config.json facts, so the planner
works for models that are not downloaded.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from core.resources import load_json_resource

GIB = 2**30


@dataclass(frozen=True)
class GPUSpec:
    id: str
    name: str
    memory_gib: float
    bandwidth_gb_s: float
    generation: str
    compute_capability: float
    native_formats: tuple[str, ...]
    match: tuple[str, ...] = ()
    note: str = ""
    # What torch.cuda / the driver reports as total memory: the marketing figure less ECC and
    # firmware reservations (H100 80GB: 79.1 GiB, H200: 139.8 GiB). None: same as memory_gib.
    usable_gib: float | None = None
    nvlink: bool = False  # multi-card systems of this card link over NVLink/NVSwitch (else PCIe)
    engines: tuple[str, ...] = ("transformers", "vllm", "llama.cpp")
    unified_memory: bool = False  # Apple silicon: GPU memory is the machine's RAM

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    @property
    def usable_memory_gib(self) -> float:
        """GiB an engine can plan with on one card."""
        return float(self.usable_gib if self.usable_gib else self.memory_gib)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "memory_gib": self.memory_gib,
            "bandwidth_gb_s": self.bandwidth_gb_s, "generation": self.generation,
            "compute_capability": self.compute_capability, "native_formats": list(self.native_formats),
            "usable_gib": self.usable_memory_gib, "nvlink": self.nvlink, "engines": list(self.engines),
            "unified_memory": self.unified_memory,
            **({"note": self.note} if self.note else {}),
        }


@dataclass(frozen=True)
class ModelEntry:
    id: str
    name: str
    hf_repo: str
    config: dict[str, Any]
    params_b: float | None = None
    active_params_b: float | None = None
    notes: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "hf_repo": self.hf_repo, "params_b": self.params_b,
            "active_params_b": self.active_params_b, "notes": self.notes,
            "model_type": self.config.get("model_type"),
        }


def _gpu_from(d: dict[str, Any]) -> GPUSpec:
    return GPUSpec(
        id=d["id"], name=d["name"], memory_gib=d["memory_gib"] or 0.0, bandwidth_gb_s=d["bandwidth_gb_s"] or 0.0,
        generation=d["generation"], compute_capability=float(d["compute_capability"]),
        native_formats=tuple(d["native_formats"]), match=tuple(d.get("match", ())), note=d.get("note", ""),
        usable_gib=d.get("usable_gib"), nvlink=bool(d.get("nvlink", False)),
        engines=tuple(d.get("engines", ("transformers", "vllm", "llama.cpp"))),
        unified_memory=bool(d.get("unified_memory", False)),
    )


def gpus() -> list[GPUSpec]:
    """Every GPU in the catalog, the "custom" template last."""
    return [_gpu_from(d) for d in load_json_resource("gpus.json")["gpus"]]


def models() -> list[ModelEntry]:
    out = []
    for d in load_json_resource("models.json")["models"]:
        out.append(ModelEntry(
            id=d["id"], name=d["name"], hf_repo=d.get("hf_repo", ""), config=dict(d["config"]),
            params_b=d.get("params_b"), active_params_b=d.get("active_params_b"), notes=d.get("notes", ""),
        ))
    return out


def _key(s: str) -> str:
    return "".join(ch for ch in s.lower() if ch.isalnum())


def _suggest(query: str, names: list[str]) -> str:
    close = difflib.get_close_matches(query.lower(), names, n=3, cutoff=0.4)
    if not close:
        contains = [n for n in names if _key(query) and _key(query) in _key(n)]
        close = contains[:3]
    return f"; did you mean {', '.join(close)}?" if close else ""


def find_gpu(name: str) -> GPUSpec | None:
    """Catalog GPU by id, name or a detected device name ("NVIDIA GeForce RTX 4090"), else None.
    Longest matching pattern wins, so "L40S" beats "L40" and "A100-SXM4-80GB" beats "A100"."""
    key = _key(name)
    entries = [g for g in gpus() if g.id != "custom"]
    for g in entries:
        if key in (_key(g.id), _key(g.name)):
            return g
    best: tuple[int, GPUSpec] | None = None
    for g in entries:
        for pat in g.match:
            pk = _key(pat)
            if pk and pk in key and (best is None or len(pk) > best[0]):
                best = (len(pk), g)
    return best[1] if best else None


def get_gpu(name: str) -> GPUSpec:
    """Catalog GPU by id or name; ValueError suggesting close names when unknown."""
    g = find_gpu(name)
    if g is None:
        ids = [x.id for x in gpus() if x.id != "custom"]
        raise ValueError(
            f"GPU {name!r} is not in the catalog{_suggest(name, ids)} "
            "(see `quantscope catalog gpus`, or plan with a custom GPU: custom_gpu(memory_gib, bandwidth_gb_s))"
        )
    return g


def custom_gpu(memory_gib: float, bandwidth_gb_s: float, *, name: str = "Custom GPU",
               compute_capability: float | None = None, native_formats: tuple[str, ...] | None = None) -> GPUSpec:
    """A GPU typed in by the user; defaults (Ampere-class datatypes) come from the catalog's
    "custom" entry."""
    if not memory_gib or memory_gib <= 0:
        raise ValueError(f"custom GPU memory must be a positive number of GiB, got {memory_gib}")
    if not bandwidth_gb_s or bandwidth_gb_s <= 0:
        raise ValueError(f"custom GPU bandwidth must be a positive number of GB/s, got {bandwidth_gb_s}")
    template = next(g for g in gpus() if g.id == "custom")
    return GPUSpec(
        id="custom", name=name, memory_gib=float(memory_gib), bandwidth_gb_s=float(bandwidth_gb_s),
        generation=template.generation,
        compute_capability=template.compute_capability if compute_capability is None else float(compute_capability),
        native_formats=template.native_formats if native_formats is None else tuple(native_formats),
        note=template.note,
    )


def find_model(model_id: str) -> ModelEntry | None:
    key = _key(model_id)
    for m in models():
        if key in (_key(m.id), _key(m.name), _key(m.hf_repo), _key(m.hf_repo.split("/")[-1])):
            return m
    return None


def get_model(model_id: str) -> ModelEntry:
    """Catalog model by id, name or Hugging Face repo; ValueError suggesting close ids."""
    m = find_model(model_id)
    if m is None:
        ids = [x.id for x in models()]
        raise ValueError(
            f"model {model_id!r} is neither a folder nor a catalog id{_suggest(model_id, ids)} "
            "(see `quantscope catalog models`)"
        )
    return m


def search_models(query: str) -> list[ModelEntry]:
    """Models whose id, name or repo contains every word of the query (case-insensitive)."""
    words = [_key(w) for w in query.split() if _key(w)]
    out = []
    for m in models():
        hay = _key(m.id) + _key(m.name) + _key(m.hf_repo) + _key(str(m.config.get("model_type", "")))
        if all(w in hay for w in words):
            out.append(m)
    return out
