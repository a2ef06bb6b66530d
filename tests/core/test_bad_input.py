"""Every bad input gives one clear line naming the file/value and the fix, and writes nothing."""
from __future__ import annotations

import errno
import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import core.methods.base as methods_base
import core.output as output
from core.cli import main
from core.config import FourBitConfig, QuantJob, RTNConfig
from core.engine import run_quantization
from core.model_io import open_model


@pytest.fixture
def model_copy(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, dst)
    return dst


def _assert_nothing_written(work: Path, out: Path) -> None:
    assert not out.exists()
    assert not any(p.name.endswith(".partial-quantscope") for p in work.iterdir())


def _quantize_fails(model: Path, tmp_path: Path, match: str, method: object | None = None, **job: object) -> str:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match) as info:
        run_quantization(QuantJob(model, out, method or RTNConfig(), **job))
    _assert_nothing_written(tmp_path, out)
    message = str(info.value)
    assert "\n" not in message
    return message


def _cli_fails(args: list[str], capsys: pytest.CaptureFixture[str], match: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("quantscope quantize: error:")
    assert match in err[0], err[0]


def test_missing_config_names_the_folder(model_copy: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    (model_copy / "config.json").unlink()
    msg = _quantize_fails(model_copy, tmp_path, "missing config.json")
    assert str(model_copy) in msg
    _cli_fails(["quantize", "--model", str(model_copy), "--method", "rtn", "--out", str(tmp_path / "out")],
               capsys, "missing config.json")
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_corrupt_safetensors_header_is_refused(model_copy: Path, tmp_path: Path) -> None:
    f = model_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"{not json!!!"
    f.write_bytes(bytes(data))
    msg = _quantize_fails(model_copy, tmp_path, "corrupt safetensors header")
    assert str(f) in msg and "re-download" in msg


def test_header_length_beyond_file_is_refused(model_copy: Path) -> None:
    f = model_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    with pytest.raises(ValueError, match="corrupt safetensors header.*does not fit"):
        open_model(model_copy)


def test_truncated_tensor_data_is_refused(model_copy: Path, tmp_path: Path) -> None:
    f = model_copy / "model.safetensors"
    with open(f, "r+b") as h:
        h.truncate(f.stat().st_size - 1000)
    msg = _quantize_fails(model_copy, tmp_path, "truncated safetensors file")
    assert str(f) in msg and "fetch the file again" in msg


class _Trap:
    """Unpickling this creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_pickle_only_checkpoint_is_refused_without_unpickling(model_copy: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "unpickled"
    (model_copy / "model.safetensors").unlink()
    (model_copy / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))

    def never(*a: object, **k: object) -> None:
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", never)
    msg = _quantize_fails(model_copy, tmp_path, "holds only pickle weights")
    assert "pytorch_model.bin" in msg and "safetensors" in msg
    with pytest.raises(ValueError, match="is a pickle checkpoint"):
        open_model(model_copy / "pytorch_model.bin")
    assert not marker.exists()


@pytest.mark.parametrize("tensor,value", [("model.layers.1.mlp.up_proj.weight", float("nan")),
                                          ("model.layers.0.input_layernorm.weight", float("inf")),
                                          ("model.embed_tokens.weight", float("-inf"))])
def test_non_finite_weight_names_the_tensor(model_copy: Path, tmp_path: Path, tensor: str, value: float) -> None:
    f = model_copy / "model.safetensors"
    tensors = load_file(str(f))
    tensors[tensor].view(-1)[7] = value
    save_file(tensors, str(f), metadata={"format": "pt"})
    msg = _quantize_fails(model_copy, tmp_path, "NaN/Inf")
    assert tensor in msg and "1 NaN/Inf value" in msg


def test_existing_output_is_refused_unless_overwrite(tiny_llama_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        run_quantization(QuantJob(tiny_llama_dir, out, RTNConfig()))
    _cli_fails(["quantize", "--model", str(tiny_llama_dir), "--method", "rtn", "--out", str(out)],
               capsys, "already exists; pass --overwrite")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # --overwrite replaces only what Quantscope wrote (issue 13 item 2; tests/core/test_output_safety.py)
    with pytest.raises(ValueError, match=r"holds 1 file that Quantscope did not write \(mine.txt\)"):
        run_quantization(QuantJob(tiny_llama_dir, out, RTNConfig(), overwrite=True))
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    (out / "mine.txt").unlink()
    run_quantization(QuantJob(tiny_llama_dir, out, RTNConfig(), overwrite=True))
    assert (out / "config.json").is_file()


def test_ragged_group_size_is_refused_by_compressed_tensors_with_the_fix(tiny_llama_dir: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    # 128 % 48 = 32: the last group would be ragged, which compressed-tensors cannot store (the
    # default layout moves to gptq; naming compressed-tensors explicitly is refused up front).
    msg = _quantize_fails(tiny_llama_dir, tmp_path, "compressed-tensors needs group_size to divide in_features",
                          RTNConfig(group_size=48), export="compressed-tensors")
    assert "% 48 ≠ 0 in model.layers.0." in msg and "use --export gptq, or --group-size 16/32/64" in msg
    _cli_fails(["quantize", "--model", str(tiny_llama_dir), "--method", "rtn", "--group-size", "48",
                "--export", "compressed-tensors", "--out", str(tmp_path / "out")], capsys,
               "needs group_size to divide in_features")


def test_bits_out_of_range_are_refused(tiny_llama_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="bits must be one of 2, 3, 4, 5, 6, 7, 8, got 9"):
        RTNConfig(bits=9)
    for bits in ("1", "9"):
        _cli_fails(["quantize", "--model", str(tiny_llama_dir), "--method", "rtn", "--bits", bits,
                    "--out", str(tmp_path / "out")], capsys, f"got {bits}")
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_unsupported_architecture_lists_supported_ones(model_copy: Path, tmp_path: Path) -> None:
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    msg = _quantize_fails(model_copy, tmp_path, "unsupported architecture: GPTNeoXForCausalLM")
    assert "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM" in msg


def test_config_only_folder_cannot_be_quantized(tiny_llama_dir: Path, tmp_path: Path) -> None:
    cfg_only = tmp_path / "cfg"
    cfg_only.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", cfg_only)
    _quantize_fails(cfg_only, tmp_path, "no \\*.safetensors weights")


def test_missing_shard_is_named(tiny_model_factory, tmp_path: Path) -> None:
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_factory(shards=3, layers=3), dst)
    victim = sorted(dst.glob("model-*.safetensors"))[-1]
    victim.unlink()
    _quantize_fails(dst, tmp_path, f"shard {victim.name} listed in .* is missing")


def test_disk_full_mid_run_leaves_nothing(tiny_llama_dir: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real = output.write_safetensors
    calls = []

    def filling(tensors: dict, path: str, metadata: dict | None = None) -> None:
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(output, "write_safetensors", filling)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full while writing") as info:
        run_quantization(QuantJob(tiny_llama_dir, out, RTNConfig()))
    assert info.value.errno == errno.ENOSPC
    _assert_nothing_written(tmp_path, out)


def test_export_that_cannot_store_the_method_names_ones_that_can(tiny_llama_dir: Path, tmp_path: Path) -> None:
    msg = _quantize_fails(tiny_llama_dir, tmp_path, "cannot store method 'rtn'", RTNConfig(sym=False),
                          export="compressed-tensors")
    assert "--export awq or gptq" in msg


def test_method_missing_from_the_build_is_a_clear_error(tiny_llama_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(methods_base._MODULES, "FourBitConfig", "core.methods.not_built_here")
    monkeypatch.delitem(methods_base._REGISTRY, FourBitConfig, raising=False)
    _quantize_fails(tiny_llama_dir, tmp_path, "method 'nf4' is not available in this build", FourBitConfig())


def test_missing_model_folder(tmp_path: Path) -> None:
    _quantize_fails(tmp_path / "nowhere", tmp_path, "model folder not found")
