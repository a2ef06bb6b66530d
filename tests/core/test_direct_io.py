"""Output shards written past the page cache (core.direct_io): the same bytes a reader expects,
whatever the alignment of the memory they come from, and the buffered path when O_DIRECT is not
to be had."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from core import buffers, direct_io, output

needs_o_direct = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    pooled = buffers.BufferPool().empty((2048, 1024), torch.int32)  # page-aligned: written without a copy
    pooled.copy_(torch.randint(-2**31, 2**31 - 1, (2048, 1024), generator=g, dtype=torch.int32))
    odd = torch.randint(0, 255, (3 * 4096 + 1,), generator=g, dtype=torch.uint8)[1:]  # unaligned memory
    return {
        "w.weight_packed": pooled,
        "w.weight_scale": torch.randn(2048, 8, generator=g).to(torch.bfloat16),
        "w.weight_shape": torch.tensor([2048, 8192]),
        "odd": odd,
        "embed": torch.randn(1000, 333, generator=g).to(torch.bfloat16),  # not a multiple of 4 KiB
        "empty": torch.zeros(0, 5),
        "scalar": torch.tensor(1.5),
    }


def _check(path: Path, tensors: dict[str, torch.Tensor], crc: str) -> None:
    assert crc == output.file_crc32(path)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(tensors)
        for k, t in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and got.shape == t.shape, k
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k
    data_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    head = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size == 8 + head + data_bytes  # truncated to its real size


@needs_o_direct
def test_large_shard_goes_past_the_page_cache_and_reads_back_exactly(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[Path] = []
    real_open = direct_io.open_direct

    def spy(path: Path) -> direct_io.DirectWriter | None:
        writer = real_open(path)
        if writer is not None:
            opened.append(path)
        return writer

    monkeypatch.setattr(output, "open_direct", spy)
    tensors = _tensors()
    path = tmp_path / "shard.safetensors"
    crc = output.write_safetensors(path, tensors, metadata={"format": "pt"})
    _check(path, tensors, crc)
    if opened:  # the file system took O_DIRECT: the header was padded to a 4 KiB boundary
        head = int.from_bytes(path.read_bytes()[:8], "little")
        assert (8 + head) % 4096 == 0
        with safe_open(str(path), "pt") as f:
            packed = f.get_tensor("w.weight_packed")
        assert torch.equal(packed, tensors["w.weight_packed"])


def test_small_shard_is_written_through_the_cache_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output, "open_direct", lambda path: pytest.fail("a small shard took the O_DIRECT path"))
    tensors = {"norm": torch.ones(64, dtype=torch.bfloat16), "b": torch.arange(3)}
    path = tmp_path / "small.safetensors"
    crc = output.write_safetensors(path, tensors, metadata={"format": "pt"})
    _check(path, tensors, crc)
    assert int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0


@needs_o_direct
def test_refused_o_direct_writes_fall_back_to_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    direct_fds: set[int] = set()
    real_open = os.open

    def tracking_open(path: object, flags: int, *a: object) -> int:
        fd = real_open(path, flags, *a)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def refusing_write(fd: int, data: object) -> int:
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", tracking_open)
    monkeypatch.setattr(os, "write", refusing_write)
    tensors = _tensors()
    path = tmp_path / "fallback.safetensors"
    crc = output.write_safetensors(path, tensors, metadata={"format": "pt"})
    assert direct_fds  # it was tried
    _check(path, tensors, crc)


def test_no_o_direct_on_the_platform_means_buffered_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    assert direct_io.open_direct(tmp_path / "x") is None
    tensors = _tensors()
    path = tmp_path / "plain.safetensors"
    _check(path, tensors, output.write_safetensors(path, tensors, metadata={"format": "pt"}))


@needs_o_direct
def test_disk_full_during_a_direct_write_is_reported_and_closes_the_file(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[int] = []
    real_close = os.close
    monkeypatch.setattr(os, "close", lambda fd: (closed.append(fd), real_close(fd))[1])
    writer = direct_io.open_direct(tmp_path / "full.bin")
    if writer is None:
        pytest.skip("this file system refuses O_DIRECT")

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError) as info:
        output._write_blocks_direct(tmp_path / "full2.bin", [np.zeros(1 << 20, dtype=np.uint8)])
    assert info.value.errno == errno.ENOSPC
    assert closed  # the descriptor of the failed write was closed
    writer.abort()


@needs_o_direct
def test_direct_writer_stages_unaligned_pieces_in_order(tmp_path: Path) -> None:
    writer = direct_io.open_direct(tmp_path / "pieces.bin")
    if writer is None:
        pytest.skip("this file system refuses O_DIRECT")
    rng = np.random.default_rng(0)
    pieces = [rng.integers(0, 255, n, dtype=np.uint8) for n in (5, 4096, 12289, 3, (9 << 20) + 7, 8192)]
    pieces.append(np.frombuffer(bytes(1 << 16), dtype=np.uint8)[1:])  # odd address
    for p in pieces:
        writer.write(p)
    writer.close()
    assert (tmp_path / "pieces.bin").read_bytes() == b"".join(p.tobytes() for p in pieces)
