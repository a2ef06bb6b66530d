"""Write a quantized model folder atomically.

Everything goes into a temporary folder beside the target (`.<name>.partial-quantscope`), one
safetensors shard per finished decoder layer plus one for the tensors outside the layers, with a
small JSON journal of finished layers (so a later resume can skip them). `finish()` adds the shard
index, config.json, tokenizer files and `quantscope_report.json`, then renames the folder into
place. `abort()` (or leaving the `with` block by an exception) removes the temporary folder.

Safety rules (issue 13): the whole job holds an exclusive lock on the target (core.outlock), so
a second run to the same --out fails at once naming the holder; `--overwrite` replaces only what
Quantscope wrote (an empty folder, or one whose every entry is listed in its
`quantscope_manifest.json`; `foreign_entries`), never a symbolic link, the model being read or a
folder around it; every file is fsync'd before the rename and the parent folder after it; the
manifest records each file's size and CRC-32, which `check_output` compares before `eval` and
`--verify` use an output. A resume journal names files inside the temporary folder only.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
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
from core.outlock import OutputBusy, OutputLock, holder_of

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
REPORT_FILE = "quantscope_report.json"
JOURNAL_FILE = "quantscope_journal.json"
MANIFEST_FILE = "quantscope_manifest.json"
CALIB_PREFIX = "calib-after-layer-"
PARTIAL_SUFFIX = ".partial-quantscope"

_SHARD_RE = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
_CALIB_RE = re.compile(re.escape(CALIB_PREFIX) + r"\d{5}\.safetensors")

# The journal's layout version: a journal written by another layout is never trusted.
_JOURNAL_VERSION = 2

# Files copied from the source folder as they are.
_COPIED = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


# Names an output folder written before manifests existed can hold (besides its shards): such a
# folder, with its quantscope_report.json, still counts as Quantscope's for --overwrite.
_LEGACY_NAMES = frozenset(_COPIED) | {INDEX_FILE, REPORT_FILE, "config.json", "quantize_config.json",
                                      "quant_config.json"}


def partial_dir(target: Path) -> Path:
    return target.parent / f".{target.name}{PARTIAL_SUFFIX}"


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


class DamagedOutput(ValueError):
    """An output folder or file whose bytes differ from what Quantscope recorded writing."""


def fsync_file(path: Path) -> None:
    """Flush a written file's data and size to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename, a new file) to the disk; a no-op where folders cannot
    be opened or synced (Windows, some network file systems)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def remove_path(path: Path) -> None:
    """Remove a folder tree, a file or a symbolic link — the link itself, never what it points to."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path)
    except FileNotFoundError:
        pass


def _check_out_path(target: Path, source: Path | None, overwrite: bool) -> None:
    """Refuse output paths that would destroy the model being read or a system/home folder, and
    symbolic links (a replaced link would leave what it pointed to, or write through it)."""
    target = Path(target)
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
    if target.is_symlink():
        raise ValueError(f"--out {target} is a symbolic link (to {os.readlink(target)}); Quantscope does not "
                         f"write through or replace links: give the real path ({resolved}) or a new one")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ValueError(f"{parent} (on the path of --out {target}) is a file, not a folder; "
                         "choose an --out whose parent is a folder")


def _plain_name(name: Any) -> bool:
    """A bare file name: no folder part, no way out of the folder it is looked up in."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not os.path.isabs(name))


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The `files` map of an output folder's manifest ({name: {size, crc32}}), or None when it
    has no manifest; ValueError when the manifest is unreadable."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        files = doc["files"]
        if not isinstance(files, dict) or not all(_plain_name(n) and isinstance(e, dict) for n, e in files.items()):
            raise ValueError("bad files map")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DamagedOutput(f"{path} is damaged ({exc}); write the output again") from None
    return files


def foreign_entries(folder: Path) -> list[str]:
    """Entries of an existing output folder that Quantscope did not write, sorted: everything but
    the files its manifest lists (and the manifest), or — in a folder written before manifests,
    which holds quantscope_report.json — everything but the names such an output has."""
    names = sorted(os.listdir(folder))
    try:
        manifest = read_manifest(folder)
    except DamagedOutput:
        manifest = {}
    if manifest is not None:
        ours = set(manifest) | {MANIFEST_FILE}
    elif REPORT_FILE in names:
        ours = {n for n in names if n in _LEGACY_NAMES or _SHARD_RE.fullmatch(n)}
    else:
        ours = set()
    foreign = []
    for n in names:
        try:
            regular = stat.S_ISREG(os.lstat(folder / n).st_mode)
        except OSError:
            regular = False
        if n not in ours or not regular:
            foreign.append(n)
    return foreign


def _entries_phrase(folder: Path, names: list[str]) -> str:
    files = all((folder / n).is_file() and not (folder / n).is_symlink() for n in names)
    noun = ("file" if files else "entry") if len(names) == 1 else ("files" if files else "entries")
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} {noun} that Quantscope did not write ({shown})"


def check_replaceable(target: Path, overwrite: bool, *, is_ours: Callable[[Path], bool] | None = None,
                      kind: str = "folder") -> None:
    """Refuse an existing output unless `overwrite` and it is Quantscope's own: for a folder
    (`kind="folder"`) an empty one or one without `foreign_entries`; for a file, one for which
    `is_ours(path)` is true. Nothing is changed."""
    if not os.path.lexists(target):
        return
    if not overwrite:
        raise ValueError(f"output {kind} {target} already exists; pass --overwrite to replace it "
                         "or choose another --out")
    if kind == "folder":
        if not target.is_dir():
            raise ValueError(f"output path {target} is a file; choose a folder path for --out")
        foreign = foreign_entries(target)
        if foreign:
            raise ValueError(f"--out {target} holds {_entries_phrase(target, foreign)}; --overwrite replaces only "
                             "an empty folder or a Quantscope output: choose another --out or move those away")
        return
    if target.is_dir():
        raise ValueError(f"output path {target} is a folder; give a file path for --out")
    if is_ours is None or not is_ours(target):
        raise ValueError(f"--out {target} is a file that Quantscope did not write; --overwrite replaces only a "
                         f"{target.suffix or 'file'} Quantscope wrote: choose another --out or move it away")


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
    """The job a crash left behind for output folder `out`, or None (no journal, nothing done, or
    the run that owns the temporary folder is still going: it holds the output's lock)."""
    target = Path(out).expanduser().absolute()
    if holder_of(target) is not None:
        return None
    return _interrupted(target)


def _interrupted(target: Path) -> InterruptedJob | None:
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


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, *,
                      fsync: bool = False) -> str:
    """Write a safetensors file streaming each tensor's bytes straight from its memory, and return
    the file's CRC-32 (`file_crc32`, taken from the same buffers, so the journal need not read it back).
    (safetensors.torch.save_file first copies every tensor into a bytes object, which doubles the
    memory of a 1 GB embedding shard.) Same format: little-endian u64 header length, JSON header
    padded with spaces, then the tensors' data in header order.

    Shards of DIRECT_MIN_BYTES or more bypass the page cache (core.direct_io): the header is padded
    to a 4 KiB boundary and tensors whose size is a multiple of 4 KiB come first, so that they
    start at aligned offsets and the engine's page-aligned buffers go to the disk without a copy.
    With `fsync=True` the file is on the disk when this returns (OutputWriter instead syncs every
    file once, before the final rename)."""
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
            return _write_blocks_direct(path, blocks, fsync)
        except DirectUnsupported:
            pass  # this file system takes no O_DIRECT writes after all: write it through the cache
    crc = 0
    with open(path, "wb") as f:
        for block in blocks:
            f.write(memoryview(block))
            crc = zlib.crc32(block, crc)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return f"{crc:08x}"


def _write_blocks_direct(path: Path, blocks: list[np.ndarray], fsync: bool = True) -> str:
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
    writer.close(fsync=fsync)
    return f"{crc:08x}"


def _disk_full(path: Path, exc: OSError) -> OSError:
    return OSError(
        errno.ENOSPC,
        f"disk full while writing {path}; free space on that drive or choose another --out "
        f"(nothing was kept) [{exc.strerror or exc}]",
    )


def _write_file_atomic(path: Path, data: bytes, fsync: bool = True) -> None:
    """Write `data` to `path` through a temporary name: written, fsync'd, then renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise _disk_full(path, exc) from exc
        raise


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _refuse_busy(target: Path) -> None:
    """OutputBusy, naming the holder, when another run holds `target`'s lock."""
    holder = holder_of(target)
    if holder is not None:
        raise OutputBusy(f"--out {target} is in use by another Quantscope run ({holder}); "
                         "wait for it to finish or choose another --out")


class OutputWriter:
    """Temporary folder, shards, journal and the final atomic rename of one quantization output.

    Use as a context manager: an exception inside the block removes the temporary folder and
    propagates. Nothing is created before `__enter__`, which takes the output's lock (held until
    the block is left) and refuses an existing target unless `overwrite` and Quantscope wrote it.
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
        self._digests: dict[str, str] = {}  # shard name -> CRC-32 of the bytes written, until journaled
        self._crc: dict[str, str] = {}  # file name -> CRC-32, for the manifest (files written or verified)
        self._synced: set[str] = set()  # files of the temporary folder already fsync'd
        self._lock = OutputLock(self.target)
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
    def _check_paths(self) -> None:
        _check_out_path(self.target, self.source, self.overwrite)
        check_replaceable(self.target, self.overwrite, kind="folder")
        if not self.target.parent.is_dir():
            raise ValueError(f"parent folder {self.target.parent} of --out does not exist; create it first")

    def check_target(self) -> None:
        """Refuse, before any work is done, an output path that is not safe to write (see
        `_check_out_path`), an existing output that is not Quantscope's own or that is not to be
        overwritten, and an output another run is writing. Nothing is created or taken."""
        self._check_paths()
        _refuse_busy(self.target)

    def __enter__(self) -> OutputWriter:
        self._check_paths()
        self._lock.acquire()
        try:
            self._check_paths()  # again, now that no other run can change the target
            if os.path.lexists(self.tmp):
                if self.tmp.is_symlink() or not self.tmp.is_dir():
                    if self.resume:
                        self.fresh_reason = f"{self.tmp} is not a folder Quantscope made"
                elif self.resume:
                    self.fresh_reason = self._load_journal()
                else:
                    self.replaced_partial = _interrupted(self.target)
                if not self.resume or self.fresh_reason:
                    remove_path(self.tmp)  # a stale leftover of a crashed run (a link: the link only)
            elif self.resume:
                self.fresh_reason = f"no interrupted job in {self.tmp}"
            self.tmp.mkdir(exist_ok=True)
        except BaseException:
            self._lock.release()
            raise
        return self

    def _load_journal(self) -> str | None:
        """Take over a crashed run's journal; the reason it cannot be trusted, or None."""
        doc = read_journal(self.target)
        if doc is None or doc.get("version") != _JOURNAL_VERSION:
            return f"the journal in {self.tmp} is missing or unreadable"
        if doc.get("fingerprint") != self.fingerprint:
            return ("the model, its files, the settings, the calibration or the Quantscope version changed "
                    "since the interrupted run")
        problem = self._journal_problem(doc)
        if problem:
            return f"the journal in {self.tmp} is corrupted ({problem})"
        for entry in list(doc["layers"].values()) + ([doc["calib"]] if doc.get("calib") else []):
            problem = self._file_problem(entry)
            if problem:
                return problem
            self._crc[entry["file"]] = entry["crc32"]
        self._journal = doc
        self.weight_map = dict(doc.get("weight_map", {}))
        return None

    def _journal_problem(self, doc: dict[str, Any]) -> str | None:
        """Why the journal's file names cannot be trusted, or None. A resume reads, keeps and
        deletes files by these names, so each must be one this writer makes, inside its folder."""
        def shard_ok(name: Any) -> bool:
            m = _SHARD_RE.fullmatch(name) if isinstance(name, str) else None
            return m is not None and int(m.group(2)) == self.num_shards and 1 <= int(m.group(1)) <= self.num_shards

        for key, entry in doc["layers"].items():
            if not (isinstance(key, str) and key.isdigit() and isinstance(entry, dict)):
                return f"layer entry {key!r}"
            if not shard_ok(entry.get("file")) or entry.get("shard") != entry.get("file"):
                return f"layer {key} names {entry.get('file')!r}, not a shard of this output"
        calib = doc.get("calib")
        if calib is not None:
            name = calib.get("file") if isinstance(calib, dict) else None
            if not (isinstance(name, str) and _CALIB_RE.fullmatch(name) and isinstance(calib.get("layer"), int)):
                return f"calibration file {name!r}"
        weight_map = doc.get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and shard_ok(v)
                                                       for k, v in weight_map.items()):
            return "its tensor index names files that are not shards of this output"
        return None

    def _file_problem(self, entry: Any) -> str | None:
        try:
            path = self.tmp / entry["file"]
            size, digest = int(entry["size"]), entry["crc32"]
        except (KeyError, TypeError, ValueError):
            return f"the journal in {self.tmp} is corrupted"
        if path.is_symlink():
            return f"checkpoint {path.name} is a symbolic link, not a file Quantscope wrote"
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
        try:
            if exc_type is not None and self.keep_partial:
                # A failure the user can fix and continue from (the engine's out-of-memory): the
                # queued layers are written and journaled, and the folder stays for --resume.
                self._wait(raise_errors=False)
                return
            if exc_type is not None or not self._done:
                self.abort()
        finally:
            self._lock.release()

    def abort(self) -> None:
        """Stop the background writers, remove the temporary folder and release the lock."""
        try:
            self._wait(raise_errors=False)
            shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            self._lock.release()

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
            # Not fsync'd here (that would hold the next shard and the journal back): finish()
            # syncs every file before the rename. An O_DIRECT shard is on the disk already.
            self._digests[name] = self._crc[name] = write_safetensors(path, clean, metadata={"format": "pt"})
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
        # The journal itself is not fsync'd: after a power loss a resume checks the size and CRC
        # of every file it names and starts fresh when one is damaged or missing.
        self._write_json(self.tmp / JOURNAL_FILE, self._journal, durable=False)
        if calib is not None and old and old.get("file") != self._journal["calib"]["file"]:
            (self.tmp / old["file"]).unlink(missing_ok=True)

    def _sync(self, name: str) -> None:
        if name not in self._synced:
            fsync_file(self.tmp / name)
            self._synced.add(name)

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
            return write_safetensors(path, tensors, metadata={"format": "pt"})  # for a resume only: no fsync
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise _disk_full(path, exc) from exc
            raise

    def _write_json(self, path: Path, doc: Any, durable: bool = True) -> None:
        data = (json.dumps(json_safe(doc), indent=2, default=_json_default, allow_nan=False) + "\n").encode()
        _write_file_atomic(path, data, fsync=durable)
        self._crc[path.name] = f"{zlib.crc32(data):08x}"
        if durable:
            self._synced.add(path.name)

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
                self._crc.pop(name, None)
                self._synced.discard(name)
        self._write_json(self.tmp / REPORT_FILE, report)
        (self.tmp / JOURNAL_FILE).unlink(missing_ok=True)
        for f in self.tmp.glob(f"{CALIB_PREFIX}*.safetensors"):
            f.unlink()
        self._write_manifest()
        fsync_dir(self.tmp)
        self._move_into_place()
        self._done = True
        self._lock.release()
        return self.target

    def _write_manifest(self) -> None:
        """`quantscope_manifest.json`: every file of the output with its size and CRC-32 (the
        shards' from the bytes written, the rest read back), and Quantscope's mark on the folder
        for a later --overwrite. Every file not fsync'd yet (shards not journaled, copies, an
        exporter's sidecar) is fsync'd here, before the rename."""
        files: dict[str, dict[str, Any]] = {}
        for path in sorted(self.tmp.iterdir()):
            name = path.name
            if name == MANIFEST_FILE:
                continue
            self._sync(name)
            digest = self._crc.get(name)
            if digest is None:
                digest = file_crc32(path)
            files[name] = {"size": path.stat().st_size, "crc32": digest}
        doc = {"quantscope_manifest": 1, "quantscope_version": package_versions().get("quantscope"),
               "files": files}
        _write_file_atomic(self.tmp / MANIFEST_FILE, (json.dumps(doc, indent=1) + "\n").encode())

    def _move_into_place(self) -> None:
        parent = self.target.parent
        if not os.path.lexists(self.target):
            os.rename(self.tmp, self.target)
            fsync_dir(parent)
            return
        # Replacing: look again (a file may have been put there while the job ran), park the old
        # folder, rename the new one in, then delete the old one; if the second rename fails the
        # old output is put back.
        self._check_paths()
        old = parent / f".{self.target.name}.old-quantscope"
        remove_path(old)
        os.rename(self.target, old)
        try:
            os.rename(self.tmp, self.target)
        except OSError:
            os.rename(old, self.target)
            raise
        fsync_dir(parent)
        remove_path(old)


class OutputFile:
    """A single-file output (a GGUF): written as `.<name>.partial-quantscope` beside the target
    under the output's lock, then fsync'd and renamed over it (`commit`). Leaving the `with`
    block without `commit` removes the temporary file. An existing target is replaced only with
    `overwrite` and when `is_ours(path)` says Quantscope wrote it."""

    def __init__(self, target: str | os.PathLike, *, overwrite: bool = False, source: Path | None = None,
                 is_ours: Callable[[Path], bool] | None = None) -> None:
        self.target = Path(target).expanduser().absolute()
        self.tmp = self.target.parent / f".{self.target.name}{PARTIAL_SUFFIX}"
        self.overwrite = overwrite
        self.source = source
        self.is_ours = is_ours
        self._lock = OutputLock(self.target)
        self._done = False

    def _check_paths(self) -> None:
        _check_out_path(self.target, self.source, self.overwrite)
        check_replaceable(self.target, self.overwrite, is_ours=self.is_ours, kind="file")
        if not self.target.parent.is_dir():
            raise ValueError(f"folder {self.target.parent} does not exist; create it first")

    def check_target(self) -> None:
        """As OutputWriter.check_target: refuse before any work; nothing is created or taken."""
        self._check_paths()
        _refuse_busy(self.target)

    def __enter__(self) -> OutputFile:
        self._check_paths()
        self._lock.acquire()
        try:
            self._check_paths()
            remove_path(self.tmp)  # a leftover of a killed run (nothing resumes a single file)
        except BaseException:
            self._lock.release()
            raise
        return self

    def commit(self) -> Path:
        """fsync the temporary file, rename it over the target, fsync the folder."""
        fsync_file(self.tmp)
        self._check_paths()  # again: something may have been put at the target meanwhile
        os.replace(self.tmp, self.target)
        fsync_dir(self.target.parent)
        self._done = True
        return self.target

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if not self._done:
                remove_path(self.tmp)
        finally:
            self._lock.release()


def check_output(path: str | os.PathLike) -> None:
    """Raise DamagedOutput, one line naming the file, when an output Quantscope wrote no longer
    holds the bytes it recorded: a folder's files against its manifest, a GGUF file against the
    checksum in its header. Folders without a manifest (not Quantscope's, or older) pass."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        from core.export.gguf import gguf_damage

        problem = gguf_damage(path)
        if problem:
            raise DamagedOutput(problem)
        return
    if not path.is_dir():
        return
    files = read_manifest(path)
    if files is None:
        return
    again = "quantize or export it again"
    for name, entry in files.items():
        f = path / name
        try:
            size, digest = int(entry["size"]), str(entry["crc32"])
        except (KeyError, TypeError, ValueError):
            raise DamagedOutput(f"{path / MANIFEST_FILE} is damaged (entry {name!r}); {again}") from None
        if not f.is_file():
            raise DamagedOutput(f"{f} is missing: the output is incomplete (its manifest lists the file); {again}")
        actual = f.stat().st_size
        if actual != size:
            raise DamagedOutput(f"{f} is damaged: {actual} bytes, {size} were written; {again}")
        if file_crc32(f) != digest:
            raise DamagedOutput(f"{f} is damaged: its CRC-32 differs from the one recorded when it was written; "
                                f"{again}")


def remove_partial(out: str | os.PathLike) -> bool:
    """Remove the temporary folder a killed job left for `out` (and its lock file), unless a
    running job holds the output's lock; whether it was removed."""
    target = Path(out).expanduser().absolute()
    lock = OutputLock(target)
    try:
        lock.acquire()
    except OutputBusy:
        return False
    try:
        remove_path(partial_dir(target))
    finally:
        lock.release()
    return True


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
