"""Reusable large buffers for the streaming loop.

A streaming job allocates the same few buffer sizes layer after layer (each linear's codes, its
packed form). Fresh large allocations come from the OS as untouched pages, and every 4 KiB page
then costs a fault and a zeroing when first written: for an 8B model about 2.6 million faults,
seconds of system time on two cores. Buffers from this pool were faulted in by an earlier layer.

A buffer goes back to the pool when the last tensor using its memory is freed, whichever thread
frees it (the writer thread frees the packed shard tensors): the tensor owns a numpy view of the
buffer, and a finalizer on that view returns the buffer. So nothing is reused while any tensor,
view or slice still points into it.
"""
from __future__ import annotations

import math
import weakref

import numpy as np
import torch

_PAGE = 4096
# Below this a fresh allocation is cheap (and glibc reuses its own heap for it).
_MIN_BYTES = 1 << 20
# Free buffers kept per size: a decoder layer holds up to three linears of one shape (gate, up and
# down of a Llama MLP have the same element count).
_KEEP_PER_SIZE = 4


class BufferPool:
    """torch.empty for large CPU buffers, with memory reused across layers."""

    def __init__(self) -> None:
        # size in bytes -> free buffers (list append/pop are atomic under the GIL, and the
        # finalizer may run on any thread, even inside `empty` when a collection frees a view).
        self._free: dict[int, list[np.ndarray]] = {}

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < _MIN_BYTES:
            return torch.empty(shape, dtype=dtype, device="cpu")  # a host pool, whatever the default device
        try:
            buf = self._free.get(nbytes, []).pop()
        except IndexError:
            # Page-aligned, so that a shard writer can hand it to the disk as it is (O_DIRECT).
            raw = np.empty(nbytes + _PAGE, dtype=np.uint8)
            start = -raw.ctypes.data % _PAGE
            buf = raw[start:start + nbytes]
        view = buf[:]  # a new array object over the same memory: the tensor keeps it alive
        weakref.finalize(view, self._give_back, buf)
        return torch.from_numpy(view).view(dtype).view(shape)

    def _give_back(self, buf: np.ndarray) -> None:
        free = self._free.setdefault(buf.nbytes, [])
        if len(free) < _KEEP_PER_SIZE:
            free.append(buf)

    def clear(self) -> None:
        """Drop the free buffers (those still in use come back to the pool when freed)."""
        self._free = {}

    @property
    def free_bytes(self) -> int:
        return sum(b.nbytes for free in list(self._free.values()) for b in list(free))


# The pool of the streaming primitives; `core.engine` clears it when a job ends.
pool = BufferPool()
