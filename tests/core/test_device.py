"""Where a job runs and on how many threads, proven on the CPU.

The device plumbing: every method runs with the job's device set explicitly, and again with
torch's default device switched to `meta` around the method, so that any tensor a method (or the
layer forward it drives) allocates without taking its inputs' device lands on `meta` and fails
when it meets the real tensors; both runs must write exactly the same output. The GPU side of
the same checks is tests/core/test_gpu.py (marked `gpu`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from core import devices
from core.config import (
    AWQConfig,
    CalibConfig,
    FourBitConfig,
    FP8Config,
    GPTQConfig,
    LLMInt8Config,
    QuantJob,
    RTNConfig,
    SmoothQuantConfig,
)
from core.engine import DeviceOutOfMemory, run_quantization
from core.events import LayerDone, Log
from core.output import JOURNAL_FILE, REPORT_FILE, partial_dir
from core.qtensors import ActQuant, IntWeight
from tests.core.test_resume import assert_same_output

CALIB = CalibConfig(samples=4, seq_len=32)

METHODS: dict[str, Any] = {
    "rtn": RTNConfig(bits=4, group_size=32),
    "rtn_asym_clip": RTNConfig(bits=3, group_size=64, sym=False, clip_search=True),
    "nf4_dq": FourBitConfig("nf4", double_quant=True),
    "fp4": FourBitConfig("fp4"),
    "fp8": FP8Config("e4m3"),
    "gptq": GPTQConfig(bits=4, group_size=32),
    "gptq_act_order": GPTQConfig(bits=4, group_size=32, act_order=True, static_groups=False),
    "awq": AWQConfig(bits=4, group_size=32),
    "smoothquant": SmoothQuantConfig(alpha="auto", act_scheme="static"),
    "llm_int8": LLMInt8Config(),
}


def _job(model: Path, out: Path, method: Any, **kw: Any) -> QuantJob:
    return QuantJob(model, out, method, calib=CALIB if method.method in ("gptq", "awq", "smoothquant", "llm_int8")
                    else None, **kw)


def _meta_default_methods(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Run every quantizer's quantize_layer with torch's default device set to meta; returns a
    list that counts the calls."""
    import core.engine as engine

    calls: list[int] = []
    real = engine._load_quantizer

    class MetaDefault:
        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        def quantize_layer(self, ctx: Any) -> Any:
            calls.append(ctx.index)
            with torch.device("meta"):
                return self._inner.quantize_layer(ctx)

    monkeypatch.setattr(engine, "_load_quantizer", lambda cfg: MetaDefault(real(cfg)))
    return calls


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_allocates_on_its_inputs_device(name: str, tiny_llama_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    method = METHODS[name]
    plain = run_quantization(_job(tiny_llama_dir, tmp_path / "plain", method))
    explicit = run_quantization(_job(tiny_llama_dir, tmp_path / "cpu", method, device="cpu"))
    assert explicit.device == "cpu" and plain.device == "cpu"
    calls = _meta_default_methods(monkeypatch)
    meta = run_quantization(_job(tiny_llama_dir, tmp_path / "meta", method, device="cpu"))
    assert calls, "the methods did not run under the meta default device"
    for other in (explicit, meta):
        assert_same_output(plain.output, other.output)
        assert [r["mse"] for r in other.layers] == [r["mse"] for r in plain.layers]


def test_a_forgotten_device_fails_under_the_meta_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above has teeth: an allocation without a device is caught."""
    w = torch.randn(8, 16)
    with torch.device("meta"), pytest.raises((RuntimeError, NotImplementedError)):
        float((w - torch.zeros(8, 16)).sum())


def test_streamed_calibration_gives_gptq_the_same_solution(tiny_llama_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Calibration states that do not fit the device stream batch by batch (the GPU's pinned
    host path; here forced on the CPU with a zero budget): GPTQ takes its capture-pass route and
    lands within float rounding of the resident run."""
    import core.engine as engine
    from tests.core.test_resume import read_output

    method = GPTQConfig(bits=4, group_size=32)
    resident = run_quantization(_job(tiny_llama_dir, tmp_path / "resident", method))
    logs: list[str] = []
    monkeypatch.setattr(engine, "_choose_device",
                        lambda job, src, calibrated: (devices.resolve_device("cpu"), 0))
    streamed = run_quantization(_job(tiny_llama_dir, tmp_path / "streamed", method),
                                sink=lambda e: logs.append(e.message) if isinstance(e, Log) else None)
    assert any("streamed to cpu per batch" in m for m in logs)
    a, b = read_output(resident.output), read_output(streamed.output)
    assert sorted(a) == sorted(b)
    codes = [k for k in a if not a[k].dtype.is_floating_point and a[k].dim() == 2 and a[k].numel() > 64]
    assert codes
    for k in a:
        if a[k].dtype.is_floating_point:
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
    # Packed 4-bit codes: nearly all equal (a code may flip where float rounding decides a tie).
    same = sum(int((a[k] == b[k]).sum()) for k in codes)
    total = sum(a[k].numel() for k in codes)
    assert same / total > 0.99
    for ra, rb in zip(resident.layers, streamed.layers):
        assert rb["rel_error"] == pytest.approx(ra["rel_error"], rel=1e-2)


# -- device choice ---------------------------------------------------------------------------

def _fake_gpu(monkeypatch: pytest.MonkeyPatch, free_gib: float) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake H200")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (int(free_gib * 2**30), 141 * 2**30))


def test_auto_takes_the_gpu_only_when_the_estimate_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        choice = devices.resolve_device("auto", 1.0)
        assert choice.device == torch.device("cpu") and "no CUDA GPU" in choice.reason
    _fake_gpu(monkeypatch, free_gib=20.0)
    fits = devices.resolve_device("auto", 10 * 2**30)
    assert fits.device == torch.device("cuda", 0)
    assert "Fake H200" in fits.reason and "20.0 GiB free" in fits.reason and "10.0 GiB" in fits.reason
    too_big = devices.resolve_device("auto", 30 * 2**30)
    assert too_big.device == torch.device("cpu")
    assert "needs about 30.0 GiB" in too_big.reason and "--samples" in too_big.reason
    assert devices.resolve_device("cuda:0").device == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="only 1 CUDA device"):
        devices.resolve_device("cuda:3")


def test_bad_device_and_thread_settings_are_refused(tiny_llama_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(ValueError, match="auto, cpu, cuda, cuda:N"):
            QuantJob(tiny_llama_dir, tmp_path / "x", RTNConfig(), device=bad)
    with pytest.raises(ValueError, match="threads must be a positive"):
        QuantJob(tiny_llama_dir, tmp_path / "x", RTNConfig(), threads=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU is available"):
        run_quantization(QuantJob(tiny_llama_dir, tmp_path / "x", RTNConfig(), device="cuda"))
    assert not (tmp_path / "x").exists() and not partial_dir(tmp_path / "x").exists()


def test_auto_job_on_a_machine_without_gpu_runs_on_cpu_and_says_why(tiny_llama_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    logs: list[str] = []
    result = run_quantization(QuantJob(tiny_llama_dir, tmp_path / "q", RTNConfig(group_size=32), device="auto"),
                              sink=lambda e: logs.append(e.message) if isinstance(e, Log) else None)
    assert result.device == "cpu" and result.to_json()["device"] == "cpu"
    assert any(m.startswith("device cpu (auto: no CUDA GPU available") for m in logs)
    report = json.loads((result.output / REPORT_FILE).read_text())
    assert report["device"] == "cpu" and report["threads"] == devices.available_threads()
    if devices.rss_breakdown():  # Linux: anonymous and file-backed peaks reported apart
        assert 0 < result.peak_rss_anon_gib <= result.peak_rss_gib
        assert report["peak_rss_anon_gib"] == pytest.approx(result.peak_rss_anon_gib, rel=0.2)
        assert result.to_json()["peak_rss_file_gib"] is not None


def test_cli_device_and_threads_options(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from core.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = ["quantize", "--model", str(tiny_llama_dir), "--method", "rtn", "--group-size", "32"]
    assert main(base + ["--out", str(tmp_path / "a"), "--device", "cuda"]) == 2
    assert "no CUDA GPU is available" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "a"), "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "a"), "--device", "gpu0"]) == 2
    assert main(base + ["--out", str(tmp_path / "a"), "--device", "cpu", "--threads", "1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["device"] == "cpu" and doc["threads"] == 1
    assert main(["eval", "--model", str(tmp_path / "a"), "--seq-len", "32", "--windows", "1", "--device", "auto",
                 "--threads", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["device"] == "cpu"
    assert main(["eval", "--model", str(tmp_path / "a"), "--device", "cuda:0"]) == 2
    capsys.readouterr()


# -- threads ---------------------------------------------------------------------------------

def test_threads_set_the_row_workers_and_torch_threads_and_are_restored(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from core import primitives as P

    before = torch.get_num_threads()
    seen: list[tuple[int, int]] = []

    def sink(e: Any) -> None:
        if isinstance(e, LayerDone):
            seen.append((torch.get_num_threads(), P._row_workers()))

    one = run_quantization(QuantJob(tiny_llama_dir, tmp_path / "one", RTNConfig(group_size=32), threads=1), sink=sink)
    assert seen and all(s == (1, 1) for s in seen) and one.threads == 1
    seen.clear()
    run_quantization(QuantJob(tiny_llama_dir, tmp_path / "gptq", GPTQConfig(group_size=32), calib=CALIB, threads=1),
                     sink=sink)
    assert seen and all(s == (1, 1) for s in seen)  # the calibrated methods' torch threads
    assert torch.get_num_threads() == before
    seen.clear()
    two = run_quantization(QuantJob(tiny_llama_dir, tmp_path / "two", RTNConfig(group_size=32), threads=2), sink=sink)
    assert all(s == (1, 2) for s in seen)  # streaming: torch single-threaded beside two row workers
    assert_same_output(one.output, two.output)
    default = run_quantization(QuantJob(tiny_llama_dir, tmp_path / "d", RTNConfig(group_size=32)))
    assert default.threads == devices.available_threads()


def test_row_split_over_many_workers_is_bit_identical() -> None:
    from core import primitives as P
    from core.config import Granularity

    torch.manual_seed(0)
    w = torch.randn(1024, 512).to(torch.bfloat16)
    results = []
    for n in (1, 2, 3, 5):
        with devices.thread_scope(n), P.single_threaded_torch():
            assert P._row_workers() == n
            q = P.quantize_to_intweight(w, 4, False, Granularity.GROUP, 64, measure=True)
            codes = P.quantize_affine(w.float(), q.scale, q.zero, 4, 64)
            sums = P.affine_error_sums(w.float(), q.codes, q.scale, q.zero, 64)
        results.append((q, codes, sums))
    for q, codes, sums in results[1:]:
        assert torch.equal(q.codes, results[0][0].codes) and torch.equal(q.scale, results[0][0].scale)
        assert torch.equal(codes, results[0][1])
        assert sums == pytest.approx(results[0][2], rel=1e-9)


# -- out of memory ---------------------------------------------------------------------------

def _oom_at_layer(monkeypatch: pytest.MonkeyPatch, method_cls: type, layer: int) -> None:
    real = method_cls.quantize_layer

    def quantize_layer(self: Any, ctx: Any) -> Any:
        if ctx.index == layer:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.50 GiB. GPU 0 has a total "
                                         "capacity of 139.81 GiB of which 1.20 GiB is free.")
        return real(self, ctx)

    monkeypatch.setattr(method_cls, "quantize_layer", quantize_layer)


def test_out_of_memory_names_the_layer_and_the_fix_and_resume_continues(
        tiny_model_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.methods.gptq import GPTQQuantizer

    model = tiny_model_factory(layers=3)
    method = GPTQConfig(bits=4, group_size=32)
    reference = run_quantization(_job(model, tmp_path / "ref", method))
    out = tmp_path / "q"
    with monkeypatch.context() as m:
        _oom_at_layer(m, GPTQQuantizer, layer=2)
        with pytest.raises(DeviceOutOfMemory) as info:
            run_quantization(_job(model, out, method))
    msg = str(info.value)
    assert msg == ("out of memory on cpu in layer 3/3 (model.layers.2): it asked for 3.50 GiB more; layers 1-2 are "
                   "kept; rerun with --resume and fewer --samples (now 4) or a shorter --seq-len (now 32)")
    journal = json.loads((partial_dir(out) / JOURNAL_FILE).read_text())
    assert sorted(journal["layers"]) == ["0", "1"]
    assert not out.exists()
    resumed_logs: list[str] = []
    resumed = run_quantization(_job(model, out, method, resume=True),
                               sink=lambda e: resumed_logs.append(e.message) if isinstance(e, Log) else None)
    assert any("resuming: 2/3 layers reused" in m for m in resumed_logs)
    assert_same_output(reference.output, resumed.output)


def test_out_of_memory_in_the_cli_is_one_line_and_keeps_the_journal(
        tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from core.cli import main
    from core.methods.rtn import RTNQuantizer

    out = tmp_path / "q"
    args = ["quantize", "--model", str(tiny_llama_dir), "--method", "rtn", "--group-size", "32", "--out", str(out),
            "--device", "cpu"]
    with monkeypatch.context() as m:
        _oom_at_layer(m, RTNQuantizer, layer=1)
        assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    line = [ln for ln in err if "error:" in ln]
    assert line == ["quantscope quantize: error: out of memory on cpu in layer 2/2 (model.layers.1): it asked for "
                    "3.50 GiB more; layer 1 is kept; rerun with --resume once more memory is free"]
    assert (partial_dir(out) / JOURNAL_FILE).is_file()
    assert main(args + ["--resume"]) == 0
    assert (out / "config.json").is_file()


# -- moving results --------------------------------------------------------------------------

def test_to_device_moves_every_tensor_of_a_quantized_weight() -> None:
    q = IntWeight(codes=torch.zeros(4, 8, dtype=torch.uint8), scale=torch.ones(4, 1), zero=torch.zeros(4, 1,
                  dtype=torch.int32), bits=4, group_size=8, sym=False,
                  act=ActQuant(scheme="static", scale=torch.tensor(0.5)), error_sums=(1.0, 2.0))
    moved = devices.to_device(q, "meta")
    assert moved.codes.is_meta and moved.scale.is_meta and moved.act.scale.is_meta
    assert moved.error_sums == (1.0, 2.0) and moved.bits == 4 and not q.codes.is_meta
    back = devices.to_device(q, "cpu")
    assert back.codes is q.codes  # already there: no copy


def test_rss_breakdown_reads_anonymous_and_file_backed_memory() -> None:
    rss = devices.rss_breakdown()
    if not rss:
        pytest.skip("no /proc/self/status here")
    assert rss["RssAnon"] > 0 and rss["RssFile"] >= 0
