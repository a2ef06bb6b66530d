"""An exclusive lock on an output path for the whole of a job.

Two runs writing the same `--out` would otherwise share (and delete) each other's temporary
folder. A job takes `flock(LOCK_EX)` on `.<name>.lock-quantscope` beside the target before it
touches the temporary folder and keeps it until after the final rename (or the clean-up of a
failure). The lock file holds who took it (pid, command line, start time), so a second run can
say who is in the way. The kernel drops the lock when its holder dies, so a crashed or killed
run never blocks the next one; the file itself is removed by the holder, while it still holds
the lock (a waiter that locked the removed file notices and retries on the new one).
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_SUFFIX = ".lock-quantscope"

# How long `acquire` retries a busy lock before giving up: long enough for a probe
# (`holder_of`) that holds it for microseconds, short enough to count as "at once".
_RETRY_S = 0.1


class OutputBusy(ValueError):
    """Another run holds the output's lock (a one-line user error)."""


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def _command() -> str:
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    text = " ".join(str(a) for a in argv)
    return text if len(text) <= 300 else text[:297] + "..."


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["started"])))
        host = f" on {info['host']}" if info.get("host") and info["host"] != socket.gethostname() else ""
        return f"pid {int(info['pid'])}{host}, `{info['command']}`, started {stamp}"
    except (ValueError, KeyError, TypeError, OverflowError):
        return "a Quantscope run that is just starting"


def _try_lock(fd: int, shared: bool = False) -> bool:
    if fcntl is None:
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def _unlock(fd: int) -> None:
    if fcntl is None:
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _open(path: Path, flags: int) -> int:
    flags |= getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError(f"{path} is a symbolic link; Quantscope uses this name for its own lock file "
                             "(remove the link)") from None
        raise


def holder_of(target: Path) -> str | None:
    """Who holds `target`'s lock (a description), or None when nobody does. Takes nothing: a
    shared lock held for an instant, never the file's creation or removal."""
    path = lock_path(Path(target))
    try:
        fd = _open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        if _try_lock(fd, shared=True):
            _unlock(fd)
            return None
        return _describe(os.read(fd, 4096))
    finally:
        os.close(fd)


class OutputLock:
    """The exclusive lock of one output path; `acquire` raises OutputBusy naming the holder."""

    def __init__(self, target: Path) -> None:
        self.target = Path(target)
        self.path = lock_path(self.target)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        deadline = time.monotonic() + _RETRY_S
        while True:
            fd = _open(self.path, os.O_RDWR | os.O_CREAT)
            if not _try_lock(fd):
                raw = os.read(fd, 4096)
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                raise OutputBusy(f"--out {self.target} is in use by another Quantscope run ({_describe(raw)}); "
                                 "wait for it to finish or choose another --out")
            # The holder we waited for may have removed the file just before we locked it: only
            # the file still at the path counts.
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        info: dict[str, Any] = {"pid": os.getpid(), "command": _command(), "started": time.time(),
                                "host": socket.gethostname()}
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
        except OSError:
            pass  # who holds it is a courtesy; the lock is what counts

    def release(self) -> None:
        """Remove the lock file (while still holding the lock) and drop the lock. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if fcntl is not None:
                self.path.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            try:
                _unlock(fd)
            finally:
                os.close(fd)
        if fcntl is None:  # Windows cannot remove an open file
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
