"""`quantscope export`: re-layout and GGUF from the command line, --verify, JSON and errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.cli import main


@pytest.fixture(scope="module")
def quantized_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The engine's own output: `quantscope quantize --method rtn` (compressed-tensors layout)."""
    out = tmp_path_factory.mktemp("q") / "rtn"
    rc = main(["quantize", "--model", str(tiny_llama_dir), "--method", "rtn", "--bits", "4", "--group-size", "32",
               "--out", str(out)])
    assert rc == 0
    return out


def test_export_quantized_folder_to_gptq_with_verify_json(quantized_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "gptq"
    rc = main(["export", "--model", str(quantized_dir), "--format", "gptq", "--out", str(out), "--verify", "--json",
               "--tokens", "48"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    doc = json.loads(captured.out)
    assert doc["format"] == "gptq" and doc["output"] == str(out.absolute()) and doc["size_gib"] > 0
    v = doc["verify"]
    assert v["ok"] is True and v["tokens"] == 48 and v["rel_logit_diff"] <= 2e-3
    assert v["ppl_loader"] == pytest.approx(v["ppl_quantscope"], rel=2e-3)
    assert "verified gptq" in captured.err
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    assert (out / "quantize_config.json").is_file()


def test_export_gguf_plain_output(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.gguf"
    rc = main(["export", "--model", str(tiny_llama_dir), "--format", "gguf", "--preset", "Q4_0", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.count("\n") == 1 and "gguf (Q4_0)" in captured.out
    import gguf

    reader = gguf.GGUFReader(str(out))
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q4_0


def test_export_gguf_verify(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("accelerate")
    out = tmp_path / "m.gguf"
    rc = main(["export", "--model", str(tiny_llama_dir), "--format", "gguf", "--out", str(out), "--verify", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    doc = json.loads(captured.out)
    assert doc["preset"] == "Q8_0" and doc["verify"]["ok"] and "gguf_file" in doc["verify"]["loader"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--format", "gptq", "--preset", "Q4_K_M"], "--preset applies to --format gguf only"),
        (["--format", "gguf"], "give a path ending in .gguf"),
        (["--format", "gptq", "--tokens", "16"], "apply with --verify only"),
    ],
)
def test_bad_options_are_one_line_errors(quantized_dir: Path, tmp_path: Path, capsys, extra, message) -> None:
    rc = main(["export", "--model", str(quantized_dir), "--out", str(tmp_path / "x"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err
    assert err.startswith("quantscope export: error:") and err.strip().count("\n") == 0


def test_existing_output_needs_overwrite(quantized_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "awq"
    out.mkdir()
    rc = main(["export", "--model", str(quantized_dir), "--format", "awq", "--out", str(out)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    assert main(["export", "--model", str(quantized_dir), "--format", "awq", "--out", str(out), "--overwrite"]) == 0
    assert (out / "quant_config.json").is_file()


def test_unrepresentable_format_fails_before_work_listing_alternatives(quantized_dir, tmp_path, capsys) -> None:
    out = tmp_path / "bnb"
    rc = main(["export", "--model", str(quantized_dir), "--format", "bitsandbytes", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot export rtn to bitsandbytes" in err and "formats that can: " in err
    assert "gptq" in err and not out.exists()


def test_float_folder_to_gptq_points_to_quantize(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    rc = main(["export", "--model", str(tiny_llama_dir), "--format", "gptq", "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err
    assert rc == 2 and "quantscope quantize" in err
