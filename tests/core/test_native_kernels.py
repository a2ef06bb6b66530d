"""The numba kernels of core.native against the torch path they replace: bit-identical scales,
zeros and codes, the same NaN/Inf refusals, the same packing, and a clean fallback when numba is
unavailable or turned off."""
from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import core.primitives as P
from core import buffers, native
from core.metrics import weight_error


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch):
    """A context in which the primitives run their torch path (no native kernels)."""
    class _Off:
        def __enter__(self) -> None:
            monkeypatch.setattr(native, "kernels", lambda: None)

        def __exit__(self, *exc: object) -> None:
            monkeypatch.undo()

    return _Off()


def test_kernels_are_available() -> None:
    # numba is a dependency: without it every streaming run silently takes the slow path.
    assert native.kernels() is not None


def _weights(out: int, n_in: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g) * torch.rand(out, 1, generator=g) * 3
    w[1, :] = 0.0  # an all-zero row: scale 1
    w[2, :] = w[2, :].abs()  # all ≥ 0: the range is [0, max]
    w[3, :] = -w[3, :].abs()  # all ≤ 0
    w[4, ::3] = -0.0
    w[5, 5] = 1e-42 if dtype == torch.float32 else 0.0  # a subnormal
    w[6, 7] = 40.0  # an outlier
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", range(2, 9))
def test_native_rtn_is_bit_identical_to_torch_path(dtype: torch.dtype, bits: int, torch_path) -> None:
    # (out, in, gs): whole groups, a ragged last group (200 = 3 × 64 + 8), per-channel
    for (out, n_in, gs), sym in itertools.product([(37, 256, 64), (150, 200, 64), (9, 96, -1)], (True, False)):
        w = _weights(out, n_in, dtype, seed=bits * 7 + out)
        fast = P.quantize_to_intweight(w, bits, sym, "group", gs, measure=True)
        with torch_path:
            ref = P.quantize_to_intweight(w, bits, sym, "group", gs, measure=True)
        what = (dtype, bits, out, n_in, gs, sym)
        assert torch.equal(fast.codes, ref.codes), what
        assert torch.equal(fast.scale, ref.scale), what
        assert torch.equal(fast.zero, ref.zero), what
        assert fast.error_sums == pytest.approx(ref.error_sums, rel=1e-5), what
        exact = weight_error(w.float(), ref.dequantize().float())
        assert fast.error_sums[0] / w.numel() == pytest.approx(exact["mse"], rel=1e-5), what


def test_native_rtn_rows_split_across_workers_equals_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    w = _weights(1000, 384, torch.bfloat16, seed=3)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    one = P.quantize_to_intweight(w, 4, False, "group", 128, measure=True)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    two = P.quantize_to_intweight(w, 4, False, "group", 128, measure=True)
    assert torch.equal(one.codes, two.codes) and torch.equal(one.scale, two.scale)
    assert one.error_sums == pytest.approx(two.error_sums, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("where", [(0, 0), (4, 63), (4, 199)])  # first element, mid group, ragged tail
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_native_rtn_refuses_nan_and_inf(dtype: torch.dtype, where: tuple[int, int], value: float) -> None:
    w = _weights(8, 200, dtype, seed=1)
    w[where] = value
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj contains 1 NaN/Inf"):
        P.quantize_to_intweight(w, 4, True, "group", 64, name="model.layers.0.mlp.up_proj")


def test_fp16_table_decodes_every_bit_pattern() -> None:
    table = torch.from_numpy(native.fp16_table())
    ref = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(table), nan)
    assert torch.equal(table[~nan].view(torch.int32), ref[~nan].view(torch.int32))  # -0.0 included


def test_native_pack4_matches_torch_packing(torch_path) -> None:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (512, 2048), generator=g, dtype=torch.uint8)  # large: the row-chunk path
    fast = P.pack_codes(codes, 4)
    with torch_path:
        ref = P.pack_codes(codes, 4)
    assert torch.equal(fast, ref)
    assert torch.equal(fast[:, :1], codes[:, :1] | (codes[:, 1:2] << 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_count_non_finite_matches_torch(dtype: torch.dtype) -> None:
    t = torch.randn(100_003).to(dtype)
    assert native.count_non_finite(t) == 0
    t[5], t[77], t[100_002] = float("nan"), float("inf"), float("-inf")
    t[6] = torch.finfo(dtype).max  # large but finite
    assert native.count_non_finite(t) == int((~torch.isfinite(t)).sum()) == 3
    assert native.count_non_finite(t[::2]) is None  # not contiguous: the caller's torch path


def test_quantscope_native_0_turns_the_kernels_off(monkeypatch: pytest.MonkeyPatch) -> None:
    w = _weights(40, 128, torch.bfloat16, seed=2)
    fast = P.quantize_to_intweight(w, 4, True, "group", 64)
    monkeypatch.setenv("QUANTSCOPE_NATIVE", "0")
    assert native.kernels() is None
    slow = P.quantize_to_intweight(w, 4, True, "group", 64)
    assert torch.equal(fast.codes, slow.codes) and torch.equal(fast.scale, slow.scale)


def test_a_numba_failure_falls_back_to_torch_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise ImportError("No module named 'numba'")

    monkeypatch.setattr(native, "_build", broken)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_kernels", None)
    with caplog.at_level(logging.WARNING, logger="core.native"):
        assert native.kernels() is None
    assert "using the slower torch path" in caplog.text
    w = _weights(40, 128, torch.float32, seed=4)
    q = P.quantize_to_intweight(w, 3, False, "group", 32, measure=True)
    assert q.error_sums is not None and q.codes.max() <= 7


def test_warm_up_accepts_every_source_dtype() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn):
        native.warm_up(dtype)


def test_pool_reuses_a_buffer_only_after_every_view_is_gone() -> None:
    pool = buffers.BufferPool()
    a = pool.empty((1024, 2048), torch.uint8)
    ptr = a.data_ptr()
    row = a[3]  # a view keeps the memory in use
    del a
    b = pool.empty((1024, 2048), torch.uint8)
    assert b.data_ptr() != ptr
    del row
    c = pool.empty((2048, 1024), torch.uint8)  # same size, another shape
    assert c.data_ptr() == ptr
    c.fill_(7)
    assert int(c.sum()) == 7 * c.numel()
    assert pool.free_bytes == 0
    del b, c
    assert pool.free_bytes == 2 * 1024 * 2048
    pool.clear()
    assert pool.free_bytes == 0


def test_pool_returns_typed_tensors_and_small_ones_untouched() -> None:
    pool = buffers.BufferPool()
    t = pool.empty((512, 1024), torch.int32)
    assert t.dtype == torch.int32 and t.shape == (512, 1024) and t.is_contiguous()
    small = pool.empty((4, 4), torch.float32)
    del t, small
    assert pool.free_bytes == 512 * 1024 * 4  # only the large one is kept


def test_pool_buffer_freed_on_another_thread_comes_back() -> None:
    import threading

    pool = buffers.BufferPool()
    t = pool.empty((1 << 20,), torch.uint8)
    ptr = t.data_ptr()
    holder = [t]
    del t
    th = threading.Thread(target=holder.clear)
    th.start()
    th.join()
    assert pool.empty((1 << 20,), torch.uint8).data_ptr() == ptr


def test_views_handed_out_stay_valid_numpy_memory() -> None:
    pool = buffers.BufferPool()
    t = pool.empty((1 << 21,), torch.uint8)
    arr = t.numpy()
    arr[:] = 3
    assert np.all(t.numpy() == 3)


def test_streaming_job_runs_torch_single_threaded_and_restores_it(tiny_llama_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from core.config import QuantJob, RTNConfig
    from core.devices import available_threads
    from core.engine import run_quantization
    from core.events import LayerDone

    if torch.get_num_threads() < 2:
        pytest.skip("needs two torch threads")
    monkeypatch.setattr(buffers, "_MIN_BYTES", 0)  # the tiny model's buffers go through the pool too
    before = torch.get_num_threads()
    seen: list[tuple[int, int]] = []

    def sink(event: object) -> None:
        if isinstance(event, LayerDone):
            seen.append((torch.get_num_threads(), P._row_workers()))

    run_quantization(QuantJob(tiny_llama_dir, tmp_path / "q", RTNConfig(bits=4, group_size=32)), sink=sink)
    # torch single-threaded, one row worker per core of the process's affinity
    assert seen and all(s == (1, available_threads()) for s in seen)
    assert torch.get_num_threads() == before
    assert buffers.pool.free_bytes == 0  # the job's reusable buffers are dropped with it


def test_single_threaded_torch_nests_and_restores() -> None:
    if torch.get_num_threads() < 2:
        pytest.skip("needs two torch threads")
    before = torch.get_num_threads()
    with P.single_threaded_torch():
        with P.single_threaded_torch():
            assert torch.get_num_threads() == 1 and P._row_workers() == before
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before and P._row_workers() == before
    with pytest.raises(RuntimeError), P.single_threaded_torch():
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_pool_buffers_are_page_aligned() -> None:
    pool = buffers.BufferPool()
    for n in (1 << 20, (1 << 20) + 1, 3 << 20):
        assert pool.empty((n,), torch.uint8).data_ptr() % 4096 == 0


def test_job_log_says_whether_the_kernels_are_used(tiny_llama_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from core.config import QuantJob, RTNConfig
    from core.engine import run_quantization
    from core.events import Log

    def lines(out: str) -> list[Log]:
        events: list[object] = []
        run_quantization(QuantJob(tiny_llama_dir, tmp_path / out, RTNConfig(bits=4, group_size=32)),
                         sink=events.append)
        return [e for e in events if isinstance(e, Log) and "native kernels" in e.message]

    used = lines("a")
    assert len(used) == 1 and used[0].level == "info" and "numba" in used[0].message
    monkeypatch.setattr(native, "_build", lambda: (_ for _ in ()).throw(ImportError("no numba here")))
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_kernels", None)
    broken = lines("b")
    assert len(broken) == 1 and broken[0].level == "warning"
    assert "ImportError: no numba here" in broken[0].message and "torch path" in broken[0].message


def test_numba_that_imports_but_cannot_compile_means_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compiler(k: object, dtype: torch.dtype) -> None:
        raise RuntimeError("LLVM ERROR: cannot select")

    monkeypatch.setattr(native, "_exercise", no_compiler)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_kernels", None)
    assert native.kernels() is None
    level, line = native.status()
    assert level == "warning" and "LLVM ERROR" in line
    w = _weights(40, 128, torch.bfloat16, seed=5)
    assert P.quantize_to_intweight(w, 4, True, "group", 64).codes.shape == (40, 128)


def test_kernels_interpreted_without_jit_give_the_same_codes() -> None:
    # NUMBA_DISABLE_JIT=1 runs the kernels as plain Python (the way to debug them): the
    # interpreted group decoder must agree with the compiled one.
    import subprocess
    import sys

    code = (
        "import numpy as np, torch\n"
        "import core.native_kernels as K, core.primitives as P\n"
        "from core import native\n"
        "for dt in (torch.bfloat16, torch.float16, torch.float32):\n"
        "    w = (torch.randn(6, 40, generator=torch.Generator().manual_seed(1)) * 3).to(dt)\n"
        "    lut = native.fp16_table() if dt == torch.float16 else np.empty(0, np.float32)\n"
        "    s, z = np.empty((6, 3), np.float32), np.empty((6, 3), np.int32)\n"
        "    c = np.empty((6, 40), np.uint8)\n"
        "    K.rtn_rows(native.as_numpy(w), lut, 0, 6, 16, 4, False, s, z, c, True)\n"
        "    ref = P._rtn_rows(w, 4, False, 16, None)\n"
        "    assert np.array_equal(c, ref[2].numpy()) and np.array_equal(s, ref[0].numpy()), dt\n"
        "print('same')\n"
    )
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1", "QUANTSCOPE_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "same"
