"""Bounded validation of a GGUF file before anything parses it for real.

gguf-py's `GGUFReader` (and transformers' loader built on it) trusts the header: a corrupt tensor
or metadata count makes it loop for hours or allocate without bound, a truncated file surfaces as
an IndexError deep inside numpy. `check_gguf` walks the header itself with every count and length
checked against the bytes that are actually left, so its cost is bounded by the file's size, and
raises one ValueError that names the file and what is wrong. `open_gguf` runs it and then opens
the file with gguf-py.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
VERSIONS = (2, 3)
# ggml's tensors have at most four dimensions (GGML_MAX_DIMS).
MAX_DIMS = 4
_HEADER = 24  # magic, version u32, tensor count u64, metadata count u64
# Scalar value types by GGUF type id: byte size.
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MIN_KV = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR = 8 + 4 + 4 + 8  # name length, n_dims, type, offset


class _Corrupt(Exception):
    """Internal: the header walk found what it says (turned into one ValueError)."""


@dataclass
class _Cursor:
    buf: Any
    size: int
    order: str
    pos: int = _HEADER

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise _Corrupt(f"{what} at byte {self.pos} runs past the end of the file ({self.size} bytes): truncated")
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from(self.order + "I", self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from(self.order + "Q", self.buf, self.take(8, what))[0]

    def string(self, what: str) -> bytes:
        n = self.u64(f"{what} length")
        start = self.take(n, f"{what} ({n} bytes)")
        return bytes(self.buf[start:start + n])

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALAR:
            start = self.take(_SCALAR[vtype], what)
            return self.buf[start:start + _SCALAR[vtype]]
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            if depth > 2:
                raise _Corrupt(f"{what} nests arrays deeper than GGUF files do")
            item = self.u32(f"{what} item type")
            count = self.u64(f"{what} item count")
            smallest = _SCALAR.get(item, 8 if item == _STRING else 12 if item == _ARRAY else 0)
            if not smallest:
                raise _Corrupt(f"{what} has unknown item type {item}")
            if count * smallest > self.size - self.pos:
                raise _Corrupt(f"{what} claims {count} items, more than the {self.size - self.pos} bytes left hold")
            if item in _SCALAR:
                self.take(count * smallest, what)
            else:
                for _ in range(count):
                    self.value(item, what, depth + 1)
            return None
        raise _Corrupt(f"{what} has unknown value type {vtype}")


def _type_sizes() -> dict[int, tuple[int, int]]:
    import gguf

    return {int(t): sizes for t, sizes in gguf.GGML_QUANT_SIZES.items()}


def _walk(buf: Any, size: int) -> None:
    if size < _HEADER:
        raise _Corrupt(f"only {size} bytes, shorter than a GGUF header")
    if bytes(buf[:4]) != MAGIC:
        raise _Corrupt(f"starts with {bytes(buf[:4])!r}, not the GGUF magic {MAGIC!r}")
    order = "<"
    version = struct.unpack_from("<I", buf, 4)[0]
    if version not in VERSIONS and struct.unpack_from(">I", buf, 4)[0] in VERSIONS:
        order, version = ">", struct.unpack_from(">I", buf, 4)[0]
    if version not in VERSIONS:
        raise _Corrupt(f"GGUF version {version}; Quantscope reads versions {' and '.join(map(str, VERSIONS))}")
    n_tensors, n_kv = struct.unpack_from(order + "QQ", buf, 8)
    if n_tensors * _MIN_TENSOR + n_kv * _MIN_KV > size - _HEADER:
        raise _Corrupt(f"header claims {n_tensors} tensors and {n_kv} metadata entries, more than a file of "
                       f"{size} bytes can hold")
    cur = _Cursor(buf, size, order)
    alignment = 32
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}")
        vtype = cur.u32(f"type of metadata {key!r}")
        value = cur.value(vtype, f"metadata {key.decode('utf-8', 'replace')!r}")
        if key == b"general.alignment" and vtype == _UINT32:
            alignment = struct.unpack_from(order + "I", value)[0]
            if alignment == 0 or alignment & (alignment - 1):
                raise _Corrupt(f"general.alignment {alignment} is not a power of two")
    sizes = _type_sizes()
    tensors: list[tuple[str, int, int]] = []
    for i in range(n_tensors):
        name = cur.string(f"tensor {i} name").decode("utf-8", "replace")
        n_dims = cur.u32(f"tensor {name!r} dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions (ggml allows 1 to {MAX_DIMS})")
        dims = [cur.u64(f"tensor {name!r} shape") for _ in range(n_dims)]
        ttype = cur.u32(f"tensor {name!r} type")
        offset = cur.u64(f"tensor {name!r} offset")
        if ttype not in sizes:
            raise _Corrupt(f"tensor {name!r} has unknown ggml type {ttype}")
        block, type_size = sizes[ttype]
        count = 1
        for d in dims:
            count *= d
        if count == 0 or dims[0] % block:
            raise _Corrupt(f"tensor {name!r} has shape {dims}, which type {ttype} (blocks of {block}) cannot hold")
        tensors.append((name, offset, count // block * type_size))
    data_start = -(-cur.pos // alignment) * alignment
    for name, offset, nbytes in tensors:
        if offset % alignment or data_start + offset + nbytes > size:
            raise _Corrupt(f"tensor {name!r} needs bytes {data_start + offset}..{data_start + offset + nbytes} "
                           f"but the file has {size}: truncated")


def check_gguf(path: str | Path) -> None:
    """Raise ValueError (one line, naming `path`) unless `path` is a structurally sound GGUF file:
    magic, a known version, every metadata entry and tensor description inside the file, every
    tensor's data inside the file. Never allocates more than the header's own strings."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such GGUF file")
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            if size == 0:
                raise _Corrupt("the file is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                _walk(buf, size)
    except _Corrupt as exc:
        raise ValueError(f"{path}: {exc}; not a readable GGUF file (damaged, truncated or not GGUF): "
                         "download or export it again") from None


def open_gguf(path: str | Path) -> Any:
    """`gguf.GGUFReader` for `path` after `check_gguf`; any error gguf-py still raises becomes one
    ValueError naming the file."""
    import gguf

    check_gguf(path)
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, struct.error) as exc:
        raise ValueError(f"{path}: gguf-py cannot read it ({exc.__class__.__name__}: {exc}); the GGUF file is "
                         "damaged, download or export it again") from None
