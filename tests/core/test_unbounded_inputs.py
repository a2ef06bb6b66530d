"""Inputs whose size is the user's choice stay bounded (issue 13, item 10): absurd configs are
refused at once, the offload split is found without an O(L²) scan, and a large calibration file
is sampled window by window instead of being tokenized whole."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from core import calibration, catalog, planner
from core.calibration import calibration_batches, tokenize
from core.config import CalibConfig

LLAMA_8B = catalog.get_model("llama-3.1-8b").config


def test_absurd_layer_count_is_refused_at_once() -> None:
    t = time.perf_counter()
    with pytest.raises(ValueError, match="num_hidden_layers = 1000000000 is outside any real model \\(0 to 1024\\); "
                                         "fix the value in config.json"):
        planner.plan({**LLAMA_8B, "num_hidden_layers": 10**9}, "rtx-4090", cpu_ram_gib=64)
    assert time.perf_counter() - t < 1.0


@pytest.mark.parametrize("fit_up_to", [0, 1, 37, 511, 1023, 1024])
def test_offload_search_bisects_to_the_count_down_answer_in_log_steps(fit_up_to: int) -> None:
    calls: list[int] = []

    def fits(n: int) -> bool:
        calls.append(n)
        return n <= fit_up_to

    assert planner.most_layers_that_fit(1024, fits) == fit_up_to
    assert len(calls) <= 11  # log2(1024) + 1; counting down from 1024 asked up to 1025 times


def test_a_deep_model_plans_with_the_offload_split_counting_down_finds() -> None:
    # 1024 layers (the ceiling) of Llama-3.1-8B on one 24 GB card, every default format: most layers
    # are offloaded. Counting down re-summed every layer per step (O(L²): 8.1 s measured here, the
    # bisection 1.6 s, the rest being per-tensor work). The count-down's answer is the largest
    # split that fits: n layers fit the card and n + 1 do not, for every format.
    deep = {**LLAMA_8B, "num_hidden_layers": 1024}
    p = planner.plan(deep, "rtx-4090", context=2048, cpu_ram_gib=4096)
    splits = [r.gpu_layers for r in p.formats]
    assert all(0 < n < 1024 for n in splits) and len(set(splits)) > 5
    for row in p.formats[::3]:
        at = planner.plan_offload(deep, "rtx-4090", format=row.format, gpu_layers=row.gpu_layers, context=2048,
                                  cpu_ram_gib=4096)
        above = planner.plan_offload(deep, "rtx-4090", format=row.format, gpu_layers=row.gpu_layers + 1,
                                     context=2048, cpu_ram_gib=4096)
        assert at.gpu_used_gib <= row.capacity_gib < above.gpu_used_gib, row.format


def _big_text(path: Path, size: int) -> str:
    """`size` bytes of prose built from the built-in corpus, each copy numbered."""
    base = calibration.builtin_text()
    parts, n, i = [], 0, 0
    while n < size:
        part = f"== copy {i} ==\n{base}"
        parts.append(part)
        n += len(part.encode())
        i += 1
    text = "".join(parts)
    path.write_text(text, encoding="utf-8")
    return text


class _CountingTokenizer:
    """Wraps a tokenizer and records how many characters each call encodes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[int] = []

    def __call__(self, text: str, **kw: Any) -> Any:
        self.calls.append(len(text))
        return self.inner(text, **kw)


def test_large_calibration_file_is_tokenized_only_window_by_window(tmp_path: Path, tiny_tokenizer: Any) -> None:
    f = tmp_path / "big.txt"
    text = _big_text(f, 3 * 1024 * 1024)
    assert f.stat().st_size > calibration.LARGE_FILE_BYTES
    counting = _CountingTokenizer(tiny_tokenizer)
    cfg = CalibConfig(source=str(f), samples=8, seq_len=128, seed=0)
    ids = calibration_batches(counting, cfg)
    assert ids.shape == (8, 128) and ids.dtype == torch.long
    # Never the whole 3 MB at once: each call sees a few kilobytes around one window.
    assert max(counting.calls) <= 4 * (8 * 128 + 256) and sum(counting.calls) < 100_000
    assert torch.equal(ids, calibration_batches(tiny_tokenizer, cfg))  # deterministic per seed
    assert not torch.equal(ids, calibration_batches(tiny_tokenizer, CalibConfig(source=str(f), samples=8,
                                                                                seq_len=128, seed=1)))
    for row in ids:  # every window is real text of the file
        assert tiny_tokenizer.decode(row[:100].tolist()) in text


def test_large_jsonl_file_is_sampled_by_record(tmp_path: Path, tiny_tokenizer: Any) -> None:
    import json

    base = calibration.builtin_text().split("\n\n")
    f = tmp_path / "big.jsonl"
    with open(f, "w", encoding="utf-8") as h:
        i = 0
        while h.tell() < 3 * 1024 * 1024:
            h.write(json.dumps({"text": f"{i}: " + base[i % len(base)]}) + "\n")
            i += 1
    ids = calibration_batches(tiny_tokenizer, CalibConfig(source=str(f), samples=4, seq_len=64, seed=0))
    assert ids.shape == (4, 64)
    assert "{\"text\"" not in tiny_tokenizer.decode(ids.flatten().tolist())  # the text fields, not the JSON


def test_small_files_keep_exactly_the_windows_of_the_whole_text(tmp_path: Path, tiny_tokenizer: Any) -> None:
    f = tmp_path / "small.txt"
    text = calibration.builtin_text()[:100_000]
    f.write_text(text, encoding="utf-8")
    cfg = CalibConfig(source=str(f), samples=16, seq_len=64, seed=5)
    whole = tokenize(tiny_tokenizer, text)
    gen = torch.Generator().manual_seed(5)
    starts = torch.randint(0, whole.numel() - 64 + 1, (16,), generator=gen)
    expected = whole[starts[:, None] + torch.arange(64)[None, :]]
    assert torch.equal(calibration_batches(tiny_tokenizer, cfg), expected)
