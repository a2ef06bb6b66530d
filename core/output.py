"""Write a quantized model folder atomically.

Everything goes into a temporary folder beside the target (`.<name>.partial-quantscope`), one
safetensors shard per finished decoder layer plus one for the tensors outside the layers, with a
small JSON journal of finished layers (so a later resume can skip them). `finish()` adds the shard
index, config.json, tokenizer files and `quantscope_report.json`, then renames the folder into
place. `abort()` (or leaving the `with` block by an exception) removes the temporary folder.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
REPORT_FILE = "quantscope_report.json"
JOURNAL_FILE = "quantscope_journal.json"

# Files copied from the source folder as they are.
_COPIED = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


def partial_dir(target: Path) -> Path:
    return target.parent / f".{target.name}.partial-quantscope"


def shard_name(index: int, total: int) -> str:
    """Hugging Face shard naming, 0-based index: model-00001-of-00003.safetensors."""
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file streaming each tensor's bytes straight from its memory.
    (safetensors.torch.save_file first copies every tensor into a bytes object, which doubles the
    memory of a 1 GB embedding shard.) Same format: little-endian u64 header length, JSON header
    padded with spaces to 8 bytes, then the tensors' data in header order."""
    from core.model_io import header_dtype

    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": header_dtype(t.dtype), "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))


def _disk_full(path: Path, exc: OSError) -> OSError:
    return OSError(
        errno.ENOSPC,
        f"disk full while writing {path}; free space on that drive or choose another --out "
        f"(nothing was kept) [{exc.strerror or exc}]",
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class OutputWriter:
    """Temporary folder, shards, journal and the final atomic rename of one quantization output.

    Use as a context manager: an exception inside the block removes the temporary folder and
    propagates. Nothing is created before `__enter__`; an existing target is refused there
    unless `overwrite`.
    """

    def __init__(self, target: str | os.PathLike, *, num_shards: int, overwrite: bool = False,
                 resume: bool = False) -> None:
        self.target = Path(target).expanduser().absolute()
        self.tmp = partial_dir(self.target)
        self.num_shards = num_shards
        self.overwrite = overwrite
        self.resume = resume
        self.weight_map: dict[str, str] = {}
        self._journal: dict[str, Any] = {"layers": {}}
        self._done = False

    # -- lifecycle -------------------------------------------------------------------------
    def check_target(self) -> None:
        """Refuse an existing output folder unless overwriting (before any work is done)."""
        if self.target.exists() and not self.overwrite:
            raise ValueError(f"output folder {self.target} already exists; pass --overwrite to replace it "
                             "or choose another --out")
        if self.target.exists() and not self.target.is_dir():
            raise ValueError(f"output path {self.target} is a file; choose a folder path for --out")
        if not self.target.parent.is_dir():
            raise ValueError(f"parent folder {self.target.parent} of --out does not exist; create it first")

    def __enter__(self) -> OutputWriter:
        self.check_target()
        if self.tmp.exists() and not self.resume:
            shutil.rmtree(self.tmp)  # a stale leftover of a crashed run
        self.tmp.mkdir(exist_ok=True)
        journal = self.tmp / JOURNAL_FILE
        if self.resume and journal.is_file():
            self._journal = json.loads(journal.read_text())
            self.weight_map = dict(self._journal.get("weight_map", {}))
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None or not self._done:
            self.abort()

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- writing ---------------------------------------------------------------------------
    def write_shard(self, index: int, tensors: dict[str, torch.Tensor]) -> str:
        """Write one shard (contiguous CPU tensors) and record its tensors in the index."""
        name = shard_name(index, self.num_shards)
        path = self.tmp / name
        clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        try:
            write_safetensors(path, clean, metadata={"format": "pt"})
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise _disk_full(path, exc) from exc
            raise
        except Exception as exc:  # safetensors reports I/O failures from Rust as its own error type
            if "No space left" in str(exc):
                raise _disk_full(path, OSError(errno.ENOSPC, str(exc))) from exc
            raise
        for k in clean:
            self.weight_map[k] = name
        return name

    def record_layer(self, index: int, metrics: list[dict[str, Any]], shard: str) -> None:
        """Journal a finished decoder layer (rewritten atomically) so a resume can skip it."""
        self._journal["layers"][str(index)] = {"shard": shard, "metrics": metrics}
        self._journal["weight_map"] = self.weight_map
        self._write_json(self.tmp / JOURNAL_FILE, self._journal)

    def set_journal_info(self, **info: Any) -> None:
        self._journal.update(info)

    def finished_layers(self) -> dict[int, dict[str, Any]]:
        """Layers a previous run finished (from the journal), index -> {shard, metrics}."""
        return {int(k): v for k, v in self._journal.get("layers", {}).items()
                if (self.tmp / v["shard"]).is_file()}

    def _write_json(self, path: Path, doc: Any) -> None:
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(json_safe(doc), indent=2, default=_json_default, allow_nan=False) + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise _disk_full(path, exc) from exc
            raise

    def finish(self, *, config: dict, report: dict, source: Path) -> Path:
        """Write index, config, tokenizer files and report, then move the folder into place."""
        total = 0
        for f in {self.tmp / n for n in self.weight_map.values()}:
            total += f.stat().st_size
        self._write_json(self.tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map":
                                                 dict(sorted(self.weight_map.items()))})
        self._write_json(self.tmp / "config.json", config)
        for name in _COPIED:
            if (source / name).is_file():
                try:
                    shutil.copy2(source / name, self.tmp / name)
                except OSError as exc:
                    if exc.errno == errno.ENOSPC:
                        raise _disk_full(self.tmp / name, exc) from exc
                    raise
        self._write_json(self.tmp / REPORT_FILE, report)
        (self.tmp / JOURNAL_FILE).unlink(missing_ok=True)
        self._move_into_place()
        self._done = True
        return self.target

    def _move_into_place(self) -> None:
        if not self.target.exists():
            os.rename(self.tmp, self.target)
            return
        # Replacing: park the old folder, rename the new one in, then delete the old one; if the
        # second rename fails the old output is put back.
        old = self.target.parent / f".{self.target.name}.old-quantscope"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(self.target, old)
        try:
            os.rename(self.tmp, self.target)
        except OSError:
            os.rename(old, self.target)
            raise
        shutil.rmtree(old, ignore_errors=True)


def output_config(source_config: dict, quantization_config: dict, dtype: torch.dtype) -> dict:
    """The source config.json with the exporter's `quantization_config` and a consistent dtype."""
    config = dict(source_config)
    config["quantization_config"] = quantization_config
    config["torch_dtype"] = dtype_name(dtype)
    config["dtype"] = dtype_name(dtype)
    return config


def package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for pkg in ("quantscope", "torch", "transformers", "safetensors", "compressed-tensors", "bitsandbytes", "gguf"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return dtype_name(obj)
    if hasattr(obj, "value"):  # Enums
        return obj.value
    if isinstance(obj, float):
        return obj
    return str(obj)


def json_safe(obj: Any) -> Any:
    """Copy of `obj` with non-finite floats (an exact layer's SQNR is inf) turned into None, so
    the documents stay strict JSON."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
