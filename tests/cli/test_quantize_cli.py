from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from core.cli import build_parser, main
from core.cli.quantize import ProgressPrinter, calib_config, method_config
from core.config import (
    AWQConfig,
    FourBitConfig,
    FP8Config,
    GPTQConfig,
    Granularity,
    LLMInt8Config,
    RTNConfig,
    SmoothQuantConfig,
)
from core.events import Progress, StageStarted


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["quantize", "--model", "m", "--out", "o", *argv])


def test_quantize_json_has_the_documented_shape(tiny_llama_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q"
    rc = main(["quantize", "--model", str(tiny_llama_dir), "--method", "rtn", "--bits", "4", "--group-size", "64",
               "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert rc == 0
    doc = json.loads(captured.out)  # stdout holds exactly one JSON document
    assert doc["output"] == str(out.absolute()) and doc["method"] == "rtn"
    assert doc["export"] == "compressed-tensors"
    assert doc["settings"]["group_size"] == 64 and doc["settings"]["granularity"] == "group"
    assert doc["seconds"] > 0 and 0 < doc["peak_rss_gib"] < 64
    assert len(doc["layers"]) == 14
    for layer in doc["layers"]:
        assert {"name", "mse", "rel_error", "sqnr_db", "seconds"} <= set(layer)
        assert math.isfinite(layer["mse"]) and 0 < layer["rel_error"] < 0.2 and layer["sqnr_db"] > 15
    assert "quantize [" in captured.err and "14/14" in captured.err  # progress bar on stderr
    assert (out / "quantscope_report.json").is_file()


def test_quantize_without_json_prints_a_summary(tiny_llama_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["quantize", "--model", str(tiny_llama_dir), "--method", "fp8", "--out", str(tmp_path / "q")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "wrote" in out and "14 linears quantized" in out


def test_options_build_the_right_method_configs() -> None:
    assert method_config(_parse("--method", "rtn")) == RTNConfig()
    assert method_config(_parse("--method", "rtn", "--group-size", "-1", "--bits", "8", "--asym")) == RTNConfig(
        bits=8, sym=False, granularity=Granularity.CHANNEL)
    assert method_config(_parse("--method", "rtn", "--granularity", "tensor", "--clip-search")) == RTNConfig(
        granularity=Granularity.TENSOR, clip_search=True)
    assert method_config(_parse("--method", "fp4", "--blocksize", "128", "--double-quant")) == FourBitConfig(
        quant_type="fp4", blocksize=128, double_quant=True)
    assert method_config(_parse("--method", "fp8", "--fp8-format", "e5m2", "--granularity", "tensor")) == FP8Config(
        fmt="e5m2", granularity=Granularity.TENSOR)
    assert method_config(_parse("--method", "gptq", "--damp", "0.05", "--act-order", "--blocksize", "64")) == \
        GPTQConfig(damp=0.05, act_order=True, block_size=64)
    assert method_config(_parse("--method", "awq")) == AWQConfig()  # AWQ keeps its asymmetric default
    assert method_config(_parse("--method", "llm_int8", "--threshold", "4")) == LLMInt8Config(threshold=4.0)
    assert method_config(_parse("--method", "smoothquant")) == SmoothQuantConfig()
    assert method_config(_parse("--method", "smoothquant", "--alpha", "0.8", "--act-scheme", "static")) == \
        SmoothQuantConfig(alpha=0.8, act_scheme="static")
    assert method_config(_parse("--method", "smoothquant", "--alpha", "auto")) == SmoothQuantConfig(alpha="auto")
    calib = calib_config(_parse("--method", "gptq", "--samples", "16", "--seq-len", "64", "--seed", "3"))
    assert (calib.samples, calib.seq_len, calib.seed, calib.source) == (16, 64, 3, "builtin")
    assert calib_config(_parse("--method", "rtn")) is None


@pytest.mark.parametrize("argv,message", [
    (["--method", "rtn", "--double-quant"], "--double-quant does not apply to --method rtn"),
    (["--method", "nf4", "--bits", "4"], "--bits does not apply to --method nf4"),
    (["--method", "rtn", "--samples", "8"], "--samples does not apply to --method rtn"),
    (["--method", "rtn", "--group-size", "64", "--granularity", "channel"], "needs --granularity group"),
    (["--method", "rtn", "--group-size", "-1", "--granularity", "group"], "means per channel"),
    (["--method", "nf4", "--blocksize", "100"], "blocksize must be a power of two"),
    (["--method", "gptq", "--calib", "/no/such/file.txt"], "calibration file not found"),
    (["--method", "smoothquant", "--alpha", "high"], "--alpha must be a number between 0 and 1 or 'auto'"),
    (["--method", "smoothquant", "--alpha", "1.5"], "alpha must be a number between 0 and 1"),
    (["--method", "rtn", "--alpha", "auto"], "--alpha does not apply to --method rtn"),
])
def test_bad_options_exit_2_with_one_line(argv: list[str], message: str, tiny_llama_dir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["quantize", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "q"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_progress_printer_draws_a_line_based_bar() -> None:
    import io

    buf = io.StringIO()
    p = ProgressPrinter(buf, width=10, interval=1e9)
    p(StageStarted("quantize", total=4, message="2 decoder layers"))
    p(Progress("quantize", 1, 4, "a"))  # first one passes
    p(Progress("quantize", 2, 4, "b"))  # throttled
    p(Progress("quantize", 4, 4, "d"))  # the last always passes
    assert buf.getvalue().splitlines() == [
        "quantize (2 decoder layers)", "quantize [##--------] 1/4 a", "quantize [##########] 4/4 d"]


def test_smoothquant_alpha_auto_end_to_end(tiny_llama_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sq"
    rc = main(["quantize", "--model", str(tiny_llama_dir), "--method", "smoothquant", "--alpha", "auto",
               "--act-scheme", "static", "--samples", "2", "--seq-len", "32", "--out", str(out), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert doc["settings"] == {"alpha": "auto", "act_scheme": "static"}
    assert len(doc["layers"]) == 14 and all(0.0 <= layer["sq_alpha"] <= 1.0 for layer in doc["layers"])
    report = json.loads((out / "quantscope_report.json").read_text())
    assert report["settings"]["alpha"] == "auto"
