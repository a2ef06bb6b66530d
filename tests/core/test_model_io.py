from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.model_io import open_model


def test_headers_match_saved_tensors_without_loading(tiny_llama_dir: Path) -> None:
    src = open_model(tiny_llama_dir)
    assert src.architecture == "LlamaForCausalLM"
    assert src.has_weights and src.num_layers == 2
    assert src.quantization_config is None
    ref = load_file(str(tiny_llama_dir / "model.safetensors"))
    assert set(src.tensors) == set(ref)
    for name, t in ref.items():
        info = src.tensors[name]
        assert info.shape == tuple(t.shape)
        assert info.dtype == "F32"
        assert info.nbytes == t.numel() * 4
    assert src.total_bytes == sum(t.numel() * 4 for t in ref.values())
    assert src.tensors["model.layers.0.self_attn.q_proj.weight"].shape == (128, 128)
    assert src.tensors["model.layers.0.self_attn.k_proj.weight"].shape == (64, 128)


def test_layer_tensor_names_cover_one_layer_only(tiny_llama_dir: Path) -> None:
    src = open_model(tiny_llama_dir)
    names = src.layer_tensor_names(1)
    assert src.layer_prefix(1) == "model.layers.1."
    assert len(names) == 9  # 7 linears + 2 norms
    assert all(n.startswith("model.layers.1.") for n in names)
    assert set(src.non_layer_tensor_names()) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}


def test_load_tensors_is_bit_exact_and_only_what_is_asked(tiny_llama_dir: Path) -> None:
    src = open_model(tiny_llama_dir)
    ref = load_file(str(tiny_llama_dir / "model.safetensors"))
    names = ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"]
    got = src.load_tensors(names)
    assert list(got) == names
    for n in names:
        assert torch.equal(got[n], ref[n])


@pytest.mark.parametrize("dtype,code", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
def test_half_precision_sources_keep_their_dtype(tiny_model_factory, dtype: torch.dtype, code: str) -> None:
    src = open_model(tiny_model_factory(dtype=dtype))
    info = src.tensors["model.layers.0.mlp.down_proj.weight"]
    assert info.dtype == code and info.torch_dtype == dtype
    assert src.source_dtype == dtype
    t = src.load_tensors([info.name])[info.name]
    assert t.dtype == dtype and tuple(t.shape) == info.shape


def test_sharded_folder_reads_every_shard(tiny_model_factory) -> None:
    path = tiny_model_factory(shards=3, layers=3)
    assert (path / "model.safetensors.index.json").is_file()
    src = open_model(path)
    assert len(src.files) >= 2
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(src.tensors) == set(index)
    for name, file in index.items():
        assert src.tensors[name].file.name == file
    names = [src.layer_tensor_names(0)[0], src.layer_tensor_names(2)[0]]
    ref = {}
    for f in src.files:
        ref.update(load_file(str(f)))
    for n, t in src.load_tensors(names).items():
        assert torch.equal(t, ref[n])


def test_tied_embeddings_are_detected(tiny_model_factory, tiny_llama_dir: Path) -> None:
    assert open_model(tiny_model_factory(tied=True)).tied_embeddings
    assert not open_model(tiny_llama_dir).tied_embeddings


@pytest.mark.parametrize("arch,name", [("mistral", "MistralForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
                                       ("qwen3", "Qwen3ForCausalLM")])
def test_other_supported_families_open(tiny_model_factory, arch: str, name: str) -> None:
    src = open_model(tiny_model_factory(arch=arch))
    assert src.architecture == name and src.supported


def test_config_only_folder_opens_for_planning(tmp_path: Path, tiny_llama_dir: Path) -> None:
    shutil.copy(tiny_llama_dir / "config.json", tmp_path / "config.json")
    src = open_model(tmp_path)
    assert src.tensors == {} and not src.has_weights
    assert src.num_layers == 2
    with pytest.raises(ValueError, match="no \\*.safetensors weights"):
        src.require_weights()


def test_unsupported_architecture_opens_when_planning_asks(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_layer": 2}))
    with pytest.raises(ValueError, match="unsupported architecture: GPT2LMHeadModel"):
        open_model(tmp_path)
    assert open_model(tmp_path, check_architecture=False).architecture == "GPT2LMHeadModel"
