"""Sequential file writes that bypass the page cache (O_DIRECT), for the output shards.

A streaming job writes gigabytes of output while it reads the source. Through the page cache,
every byte written is copied into cache pages, sits there dirty and is flushed later; on the test
VM that bookkeeping made the concurrent source reads 2-3x slower and cost a fifth of the job's
CPU (measured with `dd` beside the layer reader: 2.45 GB/s alone, 1.36 GB/s beside a buffered
writer, 1.88 GB/s beside an O_DIRECT one). With O_DIRECT the disk reads the buffers themselves.

O_DIRECT needs block-aligned buffers, file offsets and lengths, so data goes straight from the
caller's memory when it is page-aligned and starts at an aligned file offset (the engine's pooled
buffers are), and through an aligned staging buffer otherwise. The last partial block is written
padded and the file truncated to its real size. Where O_DIRECT is unavailable (macOS, Windows,
some network file systems, tmpfs before Linux 6.6) `open_direct` returns None, or the first write
is refused, and callers write as usual.
"""
from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import numpy as np

ALIGN = 4096
_STAGE_BYTES = 8 << 20
# Linux writes at most 0x7FFFF000 bytes per call; stay well below, on an aligned size.
_MAX_WRITE = 1 << 30


class DirectUnsupported(OSError):
    """The file system refused an O_DIRECT write; the caller writes the file again buffered."""


def open_direct(path: Path) -> DirectWriter | None:
    """A DirectWriter creating `path` (truncated), or None where O_DIRECT cannot be used."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o666)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            return None
        raise
    return DirectWriter(fd)


class DirectWriter:
    """Appends byte arrays to an O_DIRECT file descriptor; `close()` writes the tail."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._stage = mmap.mmap(-1, _STAGE_BYTES)  # anonymous mappings are page-aligned
        self._view = memoryview(self._stage)
        self._fill = 0  # bytes waiting in the stage
        self._written = 0  # bytes in the file (a multiple of ALIGN until close)

    def write(self, data: np.ndarray) -> None:
        """Append `data` (a contiguous uint8 array)."""
        data = data.reshape(-1)
        if self._fill % ALIGN == 0 and data.ctypes.data % ALIGN == 0 and data.nbytes >= ALIGN:
            self._flush_stage()
            bulk = data.nbytes - data.nbytes % ALIGN
            self._write_aligned(data[:bulk])
            data = data[bulk:]
        pos = 0
        while pos < data.nbytes:
            n = min(data.nbytes - pos, _STAGE_BYTES - self._fill)
            self._view[self._fill:self._fill + n] = data[pos:pos + n]
            self._fill += n
            pos += n
            if self._fill == _STAGE_BYTES:
                self._flush_stage()

    def close(self, fsync: bool = True) -> None:
        """Write what is left (padded to a block, then truncated), fsync (unless told not to:
        the caller syncs later) and close the file."""
        try:
            size = self._written + self._fill
            if self._fill:
                padded = -(-self._fill // ALIGN) * ALIGN
                self._view[self._fill:padded] = bytes(padded - self._fill)
                self._fill = padded
                self._flush_stage()
            os.ftruncate(self._fd, size)
            if fsync:
                os.fsync(self._fd)  # the size, the file's metadata and the drive's write cache
        finally:
            self.abort()

    def abort(self) -> None:
        """Close without writing the rest (after an error)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            try:
                self._view.release()
                self._stage.close()
            except BufferError:
                pass  # a traceback still holds a view of the stage: it is unmapped when that goes

    def _flush_stage(self) -> None:
        if self._fill:
            self._write_aligned(np.frombuffer(self._view[:self._fill], dtype=np.uint8))
            self._fill = 0

    def _write_aligned(self, data: np.ndarray) -> None:
        pos = 0
        while pos < data.nbytes:
            try:
                n = os.write(self._fd, data[pos:pos + _MAX_WRITE])
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    raise DirectUnsupported(exc.errno, f"O_DIRECT write refused: {exc.strerror}") from exc
                raise
            if n <= 0 or n % ALIGN:
                raise DirectUnsupported(errno.EIO, f"short O_DIRECT write ({n} bytes)")
            pos += n
        self._written += data.nbytes
