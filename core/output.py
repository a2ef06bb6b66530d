"""Write a quantized model folder atomically.

Everything goes into a temporary folder beside the target (`.<name>.partial-quantscope`), one
safetensors shard per finished decoder layer plus one for the tensors outside the layers, with a
small JSON journal of finished layers (so a later resume can skip them). `finish()` adds the shard
index, config.json, tokenizer files and `quantscope_report.json`, then renames the folder into
place. `abort()` (or leaving the `with` block by an exception) removes the temporary folder.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import struct
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from core.direct_io import ALIGN, DirectUnsupported, open_direct

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
REPORT_FILE = "quantscope_report.json"
JOURNAL_FILE = "quantscope_journal.json"
CALIB_PREFIX = "calib-after-layer-"

# The journal's layout version: a journal written by another layout is never trusted.
_JOURNAL_VERSION = 2

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


def file_crc32(path: Path) -> str:
    """CRC-32 of a file as 8 hex digits: the shard checksum of the journal (damage from a crash or
    a bad disk, not tampering, is what a resume has to detect; CRC-32 costs half of sha256)."""
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file (header parses, data fills the file), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "shorter than a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return "header length beyond the end of the file"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        return f"unreadable header ({exc})"
    if 8 + n + end != size:
        return f"{size} bytes, the header describes {8 + n + end}"
    return None


def _check_out_path(target: Path, source: Path | None, overwrite: bool) -> None:
    """Refuse output paths that would destroy the model being quantized or a system/home folder."""
    resolved = target.resolve()
    home = Path.home().resolve()
    top_level = len(resolved.parts) <= 2 and resolved.exists()  # /usr, /tmp, /mnt ...
    if resolved == Path(resolved.anchor) or resolved == home or resolved in home.parents or top_level:
        raise ValueError(f"--out {target} is a system or home folder that Quantscope will never replace; "
                         "choose a new folder such as ./model-quantized")
    if source is not None:
        src = source.expanduser().resolve()
        src = src if src.is_dir() or not src.exists() else src.parent
        if resolved == src or src in resolved.parents or resolved in src.parents:
            where = "is" if resolved == src else ("is inside" if src in resolved.parents else "contains")
            raise ValueError(f"--out {target} {where} the model folder {src}; choose an output folder outside "
                             "the model folder (--overwrite never replaces the source model)")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"{parent} (on the path of --out {target}) is a file, not a folder; "
                         "choose an --out whose parent is a folder")


@dataclass(frozen=True)
class InterruptedJob:
    """A quantization that a crash left in `out`'s temporary folder (read from its journal)."""

    out: Path
    partial: Path
    layers_done: int
    total_layers: int
    method: str
    model: str
    export: str
    when: float  # time of the last journal write (seconds since the epoch)

    def describe(self) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.when))
        return (f"an interrupted job was found for {self.out} ({self.method} of {self.model}, "
                f"{self.layers_done}/{self.total_layers} layers done, {stamp})")


def read_journal(target: Path) -> dict[str, Any] | None:
    """The journal of `target`'s temporary folder, or None when there is none or it is unreadable."""
    path = partial_dir(Path(target).expanduser().absolute()) / JOURNAL_FILE
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("layers"), dict) else None


def find_interrupted(out: str | os.PathLike) -> InterruptedJob | None:
    """The job a crash left behind for output folder `out`, or None (no journal, or nothing done)."""
    target = Path(out).expanduser().absolute()
    doc = read_journal(target)
    if doc is None or doc.get("version") != _JOURNAL_VERSION:
        return None
    path = partial_dir(target) / JOURNAL_FILE
    try:
        when = path.stat().st_mtime
    except OSError:
        return None
    return InterruptedJob(out=target, partial=partial_dir(target), layers_done=len(doc["layers"]),
                          total_layers=int(doc.get("num_layers", 0)), method=str(doc.get("method", "?")),
                          model=str(doc.get("model", "?")), export=str(doc.get("export", "?")), when=when)


# Shards with at least this much data are written with O_DIRECT (core.direct_io) where possible.
DIRECT_MIN_BYTES = 1 << 20


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file streaming each tensor's bytes straight from its memory, and return
    the file's CRC-32 (`file_crc32`, taken from the same buffers, so the journal need not read it back).
    (safetensors.torch.save_file first copies every tensor into a bytes object, which doubles the
    memory of a 1 GB embedding shard.) Same format: little-endian u64 header length, JSON header
    padded with spaces, then the tensors' data in header order.

    Shards of DIRECT_MIN_BYTES or more bypass the page cache (core.direct_io): the header is padded
    to a 4 KiB boundary and tensors whose size is a multiple of 4 KiB come first, so that they
    start at aligned offsets and the engine's page-aligned buffers go to the disk without a copy."""
    from core.model_io import header_dtype

    arrays = {name: t.contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else None
              for name, t in tensors.items()}
    total = sum(a.nbytes for a in arrays.values() if a is not None)
    direct = total >= DIRECT_MIN_BYTES and getattr(os, "O_DIRECT", 0)
    names = list(tensors)
    if direct:
        names.sort(key=lambda n: arrays[n] is None or arrays[n].nbytes % ALIGN != 0)  # stable
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": header_dtype(t.dtype), "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-(8 + len(raw)) % ALIGN) if direct else (-len(raw) % 8))
    blocks = [np.frombuffer(struct.pack("<Q", len(raw)) + raw, dtype=np.uint8)]
    blocks += [arrays[n] for n in names if arrays[n] is not None]
    if direct:
        try:
            return _write_blocks_direct(path, blocks)
        except DirectUnsupported:
            pass  # this file system takes no O_DIRECT writes after all: write it through the cache
    crc = 0
    with open(path, "wb") as f:
        for block in blocks:
            f.write(memoryview(block))
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def _write_blocks_direct(path: Path, blocks: list[np.ndarray]) -> str:
    writer = open_direct(path)
    if writer is None:
        raise DirectUnsupported(errno.EINVAL, "O_DIRECT not available here")
    crc = 0
    try:
        for block in blocks:
            writer.write(block)
            crc = zlib.crc32(block, crc)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return f"{crc:08x}"


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
                 resume: bool = False, source: Path | None = None, fingerprint: str | None = None) -> None:
        self.target = Path(target).expanduser().absolute()
        self.tmp = partial_dir(self.target)
        self.num_shards = num_shards
        self.overwrite = overwrite
        self.resume = resume
        self.source = source
        self.fingerprint = fingerprint
        self.weight_map: dict[str, str] = {}
        self._journal: dict[str, Any] = {"version": _JOURNAL_VERSION, "fingerprint": fingerprint, "layers": {}}
        self._done = False
        self._digests: dict[str, str] = {}  # shard name -> CRC-32 of the bytes written
        # One background writer: a layer's shard is written (and journaled) while the next layers
        # are quantized. At most two writes are queued, so at most two layers of output are held
        # (the queue absorbs the page cache's bursts instead of stalling the quantizer).
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        # Copies of tensors outside the decoder layers (embedding, lm_head) run on a thread of
        # their own and are not counted in that bound: they hold nothing until they run, and in the
        # layers' queue a 0.5-1 GB embedding copy stalled the quantizer behind it (1B: 0.4 s).
        self._side_pool: ThreadPoolExecutor | None = None
        self._side: list[Future] = []
        # Set by __enter__: why a resume started fresh, and whether a crashed run's folder was replaced.
        self.fresh_reason: str | None = None
        self.replaced_partial: InterruptedJob | None = None
        # Set by the engine before it raises an error after which `--resume` should continue:
        # the temporary folder and its journal are then kept instead of removed.
        self.keep_partial = False

    # -- lifecycle -------------------------------------------------------------------------
    def check_target(self) -> None:
        """Refuse an existing output folder unless overwriting (before any work is done)."""
        _check_out_path(self.target, self.source, self.overwrite)
        if self.target.exists() and not self.overwrite:
            raise ValueError(f"output folder {self.target} already exists; pass --overwrite to replace it "
                             "or choose another --out")
        if self.target.exists() and not self.target.is_dir():
            raise ValueError(f"output path {self.target} is a file; choose a folder path for --out")
        if not self.target.parent.is_dir():
            raise ValueError(f"parent folder {self.target.parent} of --out does not exist; create it first")

    def __enter__(self) -> OutputWriter:
        self.check_target()
        if self.tmp.exists():
            if self.resume:
                self.fresh_reason = self._load_journal()
            else:
                self.replaced_partial = find_interrupted(self.target)
            if not self.resume or self.fresh_reason:
                shutil.rmtree(self.tmp)  # a stale leftover of a crashed run
        elif self.resume:
            self.fresh_reason = f"no interrupted job in {self.tmp}"
        self.tmp.mkdir(exist_ok=True)
        return self

    def _load_journal(self) -> str | None:
        """Take over a crashed run's journal; the reason it cannot be trusted, or None."""
        doc = read_journal(self.target)
        if doc is None or doc.get("version") != _JOURNAL_VERSION:
            return f"the journal in {self.tmp} is missing or unreadable"
        if doc.get("fingerprint") != self.fingerprint:
            return ("the model, its files, the settings, the calibration or the Quantscope version changed "
                    "since the interrupted run")
        for entry in list(doc["layers"].values()) + ([doc["calib"]] if doc.get("calib") else []):
            problem = self._file_problem(entry)
            if problem:
                return problem
        self._journal = doc
        self.weight_map = dict(doc.get("weight_map", {}))
        return None

    def _file_problem(self, entry: Any) -> str | None:
        try:
            path = self.tmp / entry["file"]
            size, digest = int(entry["size"]), entry["crc32"]
        except (KeyError, TypeError, ValueError):
            return f"the journal in {self.tmp} is corrupted"
        if not path.is_file():
            return f"checkpoint {path.name} is missing"
        if path.stat().st_size != size:
            return f"checkpoint {path.name} is damaged ({path.stat().st_size} bytes, {size} expected)"
        problem = safetensors_problem(path)
        if problem:
            return f"checkpoint {path.name} is damaged ({problem})"
        if file_crc32(path) != digest:
            return f"checkpoint {path.name} is damaged (its checksum differs from the journal's)"
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and self.keep_partial:
            # A failure the user can fix and continue from (the engine's out-of-memory): the
            # queued layers are written and journaled, and the folder stays for --resume.
            self._wait(raise_errors=False)
            return
        if exc_type is not None or not self._done:
            self.abort()

    def abort(self) -> None:
        self._wait(raise_errors=False)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def submit(self, fn: Callable[..., Any], *args: Any, bounded: bool = True) -> None:
        """Run fn(*args) on the background writer, in submission order; waits while two are
        queued. An error of an earlier submission is raised here (or by `flush`). With
        bounded=False fn runs on a second thread, neither counted nor waited for here (for work
        that holds no memory until it runs)."""
        if not bounded:
            self._collect_finished(raise_errors=True)
            if self._side_pool is None:
                self._side_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantscope-copier")
            self._side.append(self._side_pool.submit(fn, *args))
            return
        self._wait(raise_errors=True, keep=1)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantscope-writer")
        self._pending.append(self._pool.submit(fn, *args))

    def flush(self) -> None:
        """Wait for the background writer; raise its error, if any."""
        self._wait(raise_errors=True)

    def _wait(self, *, raise_errors: bool, keep: int = 0) -> None:
        """Wait until at most `keep` bounded submissions are pending, and for the unbounded ones
        too when keep is 0 (a failed one is raised at once)."""
        self._collect_finished(raise_errors)
        while len(self._pending) > keep:
            self._result(self._pending.pop(0), raise_errors)
        while keep == 0 and self._side:
            self._result(self._side.pop(0), raise_errors)
        if not raise_errors and not self._pending and not self._side:
            for pool in (self._pool, self._side_pool):
                if pool is not None:
                    pool.shutdown(wait=True)
            self._pool = self._side_pool = None

    def _collect_finished(self, raise_errors: bool) -> None:
        for queue in (self._side, self._pending):
            for future in [f for f in queue if f.done()]:
                queue.remove(future)
                self._result(future, raise_errors)

    def _result(self, future: Future, raise_errors: bool) -> None:
        try:
            future.result()
        except BaseException:
            if raise_errors:
                self._cancel_pending()
                raise

    def _cancel_pending(self) -> None:
        for queue in (self._pending, self._side):
            for future in queue:
                future.cancel()
            for future in queue:
                try:
                    future.result()
                except BaseException:  # noqa: BLE001 - the first error is the one reported
                    pass
            queue.clear()

    # -- writing ---------------------------------------------------------------------------
    def write_shard(self, index: int, tensors: dict[str, torch.Tensor]) -> str:
        """Write one shard (contiguous CPU tensors) and record its tensors in the index."""
        name = shard_name(index, self.num_shards)
        path = self.tmp / name
        clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        try:
            self._digests[name] = write_safetensors(path, clean, metadata={"format": "pt"})
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

    def record_layer(self, index: int, metrics: list[dict[str, Any]], shard: str,
                     calib: dict[str, torch.Tensor] | None = None) -> None:
        """Journal a finished decoder layer (rewritten atomically) so a resume can skip it. For
        calibrated methods `calib` holds the hidden states entering the next layer: they are saved
        first, the journal then points at them and only then the previous ones are deleted, so a
        crash at any moment leaves a journal whose files all exist."""
        path = self.tmp / shard
        digest = self._digests.pop(shard, None) or file_crc32(path)
        entry = {"shard": shard, "file": shard, "size": path.stat().st_size, "crc32": digest, "metrics": metrics}
        old = self._journal.get("calib")
        if calib is not None:
            name = f"{CALIB_PREFIX}{index:05d}.safetensors"
            cpath = self.tmp / name
            cdigest = self._write_tensors(cpath, calib)
            self._journal["calib"] = {"layer": index, "file": name, "size": cpath.stat().st_size,
                                      "crc32": cdigest}
        self._journal["layers"][str(index)] = entry
        self._journal["weight_map"] = self.weight_map
        self._write_json(self.tmp / JOURNAL_FILE, self._journal)
        if calib is not None and old and old.get("file") != self._journal["calib"]["file"]:
            (self.tmp / old["file"]).unlink(missing_ok=True)

    def set_journal_info(self, **info: Any) -> None:
        self._journal.update(info)

    def finished_layers(self) -> dict[int, dict[str, Any]]:
        """Layers a previous run finished (from the journal), index -> {shard, metrics}."""
        return {int(k): v for k, v in self._journal.get("layers", {}).items()
                if (self.tmp / v["shard"]).is_file()}

    def saved_calibration(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """(layer index, hidden states entering the layer after it) saved by a previous run, or None."""
        entry = self._journal.get("calib")
        if not entry:
            return None
        from safetensors.torch import load_file

        return int(entry["layer"]), load_file(str(self.tmp / entry["file"]))

    def _write_tensors(self, path: Path, tensors: dict[str, torch.Tensor]) -> str:
        try:
            return write_safetensors(path, tensors, metadata={"format": "pt"})
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise _disk_full(path, exc) from exc
            raise

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
        self.flush()
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
        for f in self.tmp.glob(f"{CALIB_PREFIX}*.safetensors"):
            f.unlink()
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
