"""A model folder is checked as a whole before anything is computed or written: safetensors
headers as strictly as the safetensors library checks them, the shard index confined to the
folder and followed, and the tensors against config.json (issue 13, items 6-8)."""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import malformed as bad
from core import planner
from core.model_io import InvalidModelError, open_model, read_safetensors_header
from core.validate import ConfigMismatchError


@pytest.fixture
def model(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, dst)
    return dst


HEADER_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "overlap": (bad.overlapping_offsets, "'model.layers.0.self_attn.k_proj.weight' and "
                                         "'model.layers.0.self_attn.v_proj.weight' overlap (bytes 951296-984064)"),
    "gap": (bad.gapped_offsets, "bytes 1574912-1574916 between tensors 'model.layers.1.self_attn.v_proj.weight' and "
                                "'model.norm.weight' belong to no tensor"),
    "negative offset": (bad.negative_offset, "has data_offsets [-8, 951296]"),
    "uncovered": (bad.uncovered_bytes, "bytes 1378304-1411072 between tensors"),
    "trailing": (bad.trailing_bytes, "64 trailing bytes after the last tensor"),
    "negative dim": (bad.negative_dim, "'model.norm.weight' has shape [-128]"),
    "span": (bad.shape_span_mismatch, "has 65536 bytes but shape [64, 128] F32 needs 32768"),
}


@pytest.mark.parametrize("case", list(HEADER_DAMAGE))
def test_header_damage_the_safetensors_library_refuses_is_refused_in_one_line(model: Path, case: str) -> None:
    damage, detail = HEADER_DAMAGE[case]
    damage(model)
    f = model / bad.WEIGHTS
    with pytest.raises(SafetensorError):  # the library itself would not read this file
        with safe_open(str(f), framework="pt") as h:
            h.keys()
    with pytest.raises(InvalidModelError) as info:
        read_safetensors_header(f)
    msg = str(info.value)
    assert "\n" not in msg and str(f) in msg and detail in msg and msg.endswith("re-download or re-save it")


def test_integer_dtype_for_a_float_weight_is_refused(model: Path) -> None:
    bad.integer_weight(model)
    with pytest.raises(ConfigMismatchError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight in .*model\.safetensors"
                                                  r" is stored as I32.*re-save it in float16/bfloat16/float32"):
        open_model(model)


def test_a_valid_header_still_opens_with_every_tensor(tiny_llama_dir: Path) -> None:
    infos = read_safetensors_header(tiny_llama_dir / bad.WEIGHTS)
    assert len(infos) == 21 and sum(t.nbytes for t in infos.values()) == 1575424


@pytest.mark.parametrize("damage", [bad.index_pointing_outside, bad.index_with_absolute_path])
def test_index_pointing_outside_the_folder_is_refused(model: Path, damage: Callable[[Path], None]) -> None:
    damage(model)
    with pytest.raises(InvalidModelError, match="outside the model folder .*fix the weight_map"):
        open_model(model)


def test_hugging_face_cache_snapshot_symlinks_stay_allowed(tiny_llama_dir: Path, tmp_path: Path) -> None:
    # models--org--name/snapshots/<rev>/<file> -> ../../blobs/<hash>, as huggingface_hub lays it out
    repo = tmp_path / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(tiny_llama_dir.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snap / f.name)
    names = [n for n in bad.read_header(tiny_llama_dir / bad.WEIGHTS)[0] if n != "__metadata__"]
    (blobs / "index").write_text(json.dumps({"weight_map": {n: bad.WEIGHTS for n in names}}))
    os.symlink("../../blobs/index", snap / "model.safetensors.index.json")
    src = open_model(snap)
    assert len(src.tensors) == 21
    assert torch.equal(src.load_tensors(["model.norm.weight"])["model.norm.weight"],
                       load_file(str(tiny_llama_dir / bad.WEIGHTS))["model.norm.weight"])


def test_index_assignment_wins_over_a_stray_copy_in_another_shard(model: Path) -> None:
    tensors = load_file(str(model / bad.WEIGHTS))
    names = list(tensors)
    # A shard (sorting after the real one) with a tensor of its own and a stale copy of model.norm.
    stray = {"model.norm.weight": torch.full((128,), 7.0), "stale.marker": torch.zeros(1)}
    save_file(stray, str(model / "z-stale.safetensors"), metadata={"format": "pt"})
    bad.write_index(model, {n: bad.WEIGHTS for n in names} | {"stale.marker": "z-stale.safetensors"})
    src = open_model(model)
    assert src.tensors["model.norm.weight"].file == model / bad.WEIGHTS
    assert torch.equal(src.load_tensors(["model.norm.weight"])["model.norm.weight"], tensors["model.norm.weight"])


def test_a_tensor_in_two_files_without_an_index_is_refused_naming_both(model: Path) -> None:
    bad.duplicate_tensor_without_index(model)
    with pytest.raises(InvalidModelError) as info:
        open_model(model)
    msg = str(info.value)
    assert "'model.norm.weight' is stored twice" in msg
    assert str(model / "extra.safetensors") in msg and str(model / bad.WEIGHTS) in msg


def test_wrong_q_proj_shape_names_tensor_expected_and_stored_shape(model: Path) -> None:
    bad.q_proj_wrong_shape(model)
    with pytest.raises(ConfigMismatchError) as info:
        open_model(model)
    msg = str(info.value)
    assert msg.startswith("tensor model.layers.1.self_attn.q_proj.weight in ")
    assert "is stored as [64, 256]" in msg and "implies [128, 128]" in msg and str(model / "config.json") in msg


@pytest.mark.parametrize(("layers", "message"), [
    (3, "has no tensor model.layers.2.input_layernorm.weight, which .*config.json \\(num_hidden_layers 3\\) implies; "
        "set num_hidden_layers to 2"),
    (1, "config.json says num_hidden_layers = 1 but .*model.safetensors stores decoder layers up to 1"),
])
def test_layer_count_must_match_the_stored_layers(model: Path, layers: int, message: str) -> None:
    bad.edit_config(model, num_hidden_layers=layers)
    with pytest.raises(ConfigMismatchError, match=message):
        open_model(model)


def test_a_quantized_output_is_checked_for_its_layer_count(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from core.config import QuantJob, RTNConfig
    from core.engine import run_quantization

    out = tmp_path / "q"
    run_quantization(QuantJob(tiny_llama_dir, out, RTNConfig()))
    assert open_model(out, check_architecture=False).num_layers == 2  # packed tensors are not shape-checked
    bad.edit_config(out, num_hidden_layers=3)
    with pytest.raises(ConfigMismatchError, match="stores no tensors of decoder layer 2; set num_hidden_layers to 2"):
        open_model(out, check_architecture=False)


def test_planning_a_catalog_entry_or_a_config_only_folder_still_works(tiny_llama_dir: Path, tmp_path: Path) -> None:
    assert planner.plan("llama-3.1-8b", "rtx-4090", formats=["int4_g128"], cpu_ram_gib=64).model["num_layers"] == 32
    cfg_only = tmp_path / "cfg"
    cfg_only.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", cfg_only)
    assert planner.plan(cfg_only, "rtx-4090", formats=["bf16"], cpu_ram_gib=64).model["num_layers"] == 2
    bad.edit_config(cfg_only, hidden_size=10**9)
    with pytest.raises(ValueError, match="hidden_size = 1000000000 is outside any real model"):
        planner.plan(cfg_only, "rtx-4090", formats=["bf16"], cpu_ram_gib=64)
