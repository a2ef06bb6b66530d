"""The streaming reader's page-in and read-ahead hints: they only make pages resident, never change
what a tensor holds, and fall back quietly where the kernel lacks them."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import core.engine as E
from core.model_io import open_model


def _mapped(tmp_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.randn(1024, 1024).to(torch.bfloat16)
    save_file({"w": t}, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        return t, f.get_tensor("w")


def _resident_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_page_in_maps_the_whole_tensor_without_changing_it(tmp_path: Path) -> None:
    ref, mapped = _mapped(tmp_path)
    with open(tmp_path / "w.safetensors", "rb") as h:
        os.posix_fadvise(h.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    before = _resident_kib()
    E._page_in(mapped)
    assert _resident_kib() - before >= 2048 * 0.9  # the 2 MiB tensor is now mapped
    assert torch.equal(mapped, ref)


def test_page_in_falls_back_to_touching_pages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def refusing(start: int, length: int, advice: int) -> int:
        calls.append(advice)
        return -1  # e.g. EINVAL from a kernel older than 5.14

    monkeypatch.setattr(E, "_madvise", refusing)
    ref, mapped = _mapped(tmp_path)
    E._page_in(mapped)
    assert torch.equal(mapped, ref)
    if os.uname().sysname == "Linux":
        assert calls == [E._MADV_POPULATE_READ]


def test_read_ahead_hints_never_raise(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = open_model(tiny_llama_dir)
    names = src.layer_tensor_names(0)
    E._will_need(src, names)  # a real hint
    gone = tmp_path / "gone"

    class _Info:
        file, data_start, nbytes = gone, 0, 10

    monkeypatch.setitem(src.tensors, names[0], _Info())
    E._will_need(src, names[:1])  # a missing file: ignored
