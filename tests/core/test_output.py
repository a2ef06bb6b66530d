from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import core.output as output
from core.output import OutputWriter, json_safe, output_config, partial_dir, shard_name


def _fill(w: OutputWriter) -> None:
    w.write_shard(0, {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)})
    w.write_shard(1, {"b.weight": torch.ones(4, dtype=torch.bfloat16)})


def test_nothing_appears_at_target_until_finish(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "generation_config.json").write_text('{"do_sample": false}')
    target = tmp_path / "out"
    with OutputWriter(target, num_shards=2) as w:
        _fill(w)
        assert partial_dir(target).is_dir() and not target.exists()
        w.record_layer(0, [{"name": "a", "mse": 0.1}], shard_name(0, 2))
        w.finish(config={"architectures": ["LlamaForCausalLM"]}, report={"sqnr": math.inf}, source=src)
    assert not partial_dir(target).exists()
    names = sorted(p.name for p in target.iterdir())
    assert names == ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                     "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                     "quantscope_manifest.json", "quantscope_report.json", "tokenizer.json"]
    manifest = json.loads((target / "quantscope_manifest.json").read_text())["files"]
    assert sorted(manifest) == [n for n in names if n != "quantscope_manifest.json"]
    assert all(manifest[n]["size"] == (target / n).stat().st_size for n in manifest)
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"a.weight": "model-00001-of-00002.safetensors",
                                   "b.weight": "model-00002-of-00002.safetensors"}
    assert index["metadata"]["total_size"] == sum(p.stat().st_size for p in target.glob("*.safetensors"))
    assert torch.equal(load_file(str(target / "model-00001-of-00002.safetensors"))["a.weight"],
                       torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert json.loads((target / "quantscope_report.json").read_text()) == {"sqnr": None}  # strict JSON


def test_existing_output_is_refused_without_overwrite_and_left_untouched(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        with OutputWriter(target, num_shards=1):
            pass
    assert (target / "keep.txt").read_text() == "old"
    assert not partial_dir(target).exists()


def test_overwrite_replaces_the_whole_of_an_earlier_output(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with OutputWriter(target, num_shards=3) as w:  # an earlier output with three shards
        for i in range(3):
            w.write_shard(i, {f"t{i}": torch.zeros(2)})
        w.finish(config={}, report={}, source=tmp_path)
    stale = target / "model-00003-of-00003.safetensors"
    with OutputWriter(target, num_shards=2, overwrite=True) as w:
        _fill(w)
        assert stale.exists()  # old output intact while writing
        w.finish(config={}, report={}, source=tmp_path)
    assert not stale.exists()
    assert (target / "model-00001-of-00002.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_exception_inside_removes_the_temporary_folder(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(KeyError):
        with OutputWriter(target, num_shards=2) as w:
            _fill(w)
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_gives_a_clear_message_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output, "write_safetensors", full)
    target = tmp_path / "out"
    with pytest.raises(OSError, match="disk full while writing .*choose another --out") as info:
        with OutputWriter(target, num_shards=2) as w:
            _fill(w)
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_journal_lets_a_resume_find_finished_layers(tmp_path: Path) -> None:
    target = tmp_path / "out"
    w = OutputWriter(target, num_shards=3)
    w.__enter__()
    name = w.write_shard(1, {"model.layers.0.x": torch.zeros(2)})
    w.record_layer(0, [{"name": "model.layers.0.q", "mse": 1e-3}], name)
    # simulate a crash: the temporary folder stays (the kernel drops a dead process's lock), a
    # resuming writer picks it up
    w._lock.release()
    resumed = OutputWriter(target, num_shards=3, resume=True)
    with resumed:
        done = resumed.finished_layers()
        assert list(done) == [0] and done[0]["metrics"][0]["mse"] == 1e-3
        assert resumed.weight_map == {"model.layers.0.x": name}
    assert list(tmp_path.iterdir()) == []  # left without finish: cleaned up


def test_output_config_sets_quantization_and_consistent_dtype() -> None:
    src = {"architectures": ["LlamaForCausalLM"], "torch_dtype": "float32", "hidden_size": 8}
    cfg = output_config(src, {"quant_method": "compressed-tensors"}, torch.bfloat16)
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    assert cfg["quantization_config"] == {"quant_method": "compressed-tensors"}
    assert src["torch_dtype"] == "float32" and "quantization_config" not in src


def test_json_safe_turns_non_finite_numbers_into_null() -> None:
    doc = {"a": [1.0, math.inf, -math.inf, math.nan], "b": {"c": 2}, "d": (3,)}
    assert json_safe(doc) == {"a": [1.0, None, None, None], "b": {"c": 2}, "d": [3]}


def test_streamed_shards_read_back_bit_exact_with_safetensors(tmp_path: Path) -> None:
    from safetensors import safe_open

    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f8": torch.randn(4, 4).to(torch.float8_e4m3fn),
        "i32": torch.arange(-5, 7, dtype=torch.int32).reshape(3, 4),
        "u8": torch.arange(7, dtype=torch.uint8),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "strided": torch.arange(12.0).reshape(3, 4).t(),
    }
    path = tmp_path / "x.safetensors"
    output.write_safetensors(path, tensors, metadata={"format": "pt"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for k, t in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8))


def test_unbounded_copy_runs_beside_the_layer_queue_and_its_error_is_raised(tmp_path: Path) -> None:
    import threading

    release = threading.Event()
    order: list[str] = []

    def slow_copy() -> None:
        release.wait(10)
        order.append("copy")

    def layer(i: int) -> None:
        order.append(f"layer {i}")

    with OutputWriter(tmp_path / "out", num_shards=1) as w:
        w.submit(slow_copy, bounded=False)
        for i in range(4):  # would block on the two-deep bound if the copy counted
            w.submit(layer, i)
        while len(order) < 4:
            threading.Event().wait(0.01)
        assert order == ["layer 0", "layer 1", "layer 2", "layer 3"]  # not stuck behind the copy
        release.set()
        w.flush()  # waits for the copy too
        assert order[-1] == "copy"

        def failing() -> None:
            raise OSError(errno.EIO, "read error in the embedding")

        w.submit(failing, bounded=False)
        with pytest.raises(OSError, match="read error in the embedding"):
            w.flush()
        w.abort()
    assert not partial_dir(tmp_path / "out").exists()
