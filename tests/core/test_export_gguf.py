"""GGUF export: bytes identical to gguf-py's quantizers, K-quant encoders at reference quality,
the Q4_K_M mixture, llama metadata + tokenizer, and loading with transformers' gguf_file."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.config import RTNConfig
from core.export import kquants
from core.export.convert import rtn_quantizer, write_quantized
from core.export.gguf import export_gguf, permute_rope, read_gguf, resolve_type, tensor_type_name, unpermute_rope
from core.export.verify import VerifyError, verify_export

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def k_model_dir(tiny_model_factory):
    """Rows of 256 so every K-quant applies without fallback."""
    return tiny_model_factory(hidden_size=256, intermediate_size=512)


def _source(model_dir, name):
    from safetensors.torch import load_file

    return load_file(str(next(model_dir.glob("*.safetensors"))))[name].float().numpy()


def _tensors(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("preset", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_legacy_types_are_byte_identical_to_gguf_py_quantize(tiny_llama_dir, tmp_path, preset):
    out = export_gguf(tiny_llama_dir, tmp_path / "m.gguf", preset)
    _, tensors = _tensors(out)
    up = tensors["blk.0.ffn_up.weight"]
    assert up.tensor_type == getattr(T, preset)
    expect = gguf.quants.quantize(_source(tiny_llama_dir, "model.layers.0.mlp.up_proj.weight"), getattr(T, preset))
    assert np.array_equal(np.asarray(up.data).reshape(-1), expect.reshape(-1))
    # q_proj bytes are those of the RoPE-permuted rows
    q = _source(tiny_llama_dir, "model.layers.1.self_attn.q_proj.weight")
    expect_q = gguf.quants.quantize(permute_rope(q, 4), getattr(T, preset))
    assert np.array_equal(np.asarray(tensors["blk.1.attn_q.weight"].data).reshape(-1), expect_q.reshape(-1))
    assert tensors["blk.0.attn_norm.weight"].tensor_type == T.F32


def _rel_error(x, qtype, data):
    d = gguf.quants.dequantize(data, qtype).reshape(x.shape)
    return float(np.linalg.norm(d - x) / np.linalg.norm(x))


def test_k_quant_encoders_reach_reference_quality():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((32, 1024)) * rng.uniform(0.5, 2.0, (32, 1))).astype(np.float32)
    x[:, ::97] *= 6.0  # a few outliers per row, as real weights have
    err = {name: _rel_error(x, getattr(T, name), gguf.quants.quantize(x, getattr(T, name)))
           for name in ("Q4_1", "Q5_1", "Q8_0")}
    q4k = _rel_error(x, T.Q4_K, kquants.quantize_q4_k(x))
    q5k = _rel_error(x, T.Q5_K, kquants.quantize_q5_k(x))
    q6k = _rel_error(x, T.Q6_K, kquants.quantize_q6_k(x))
    assert q4k < err["Q4_1"] and q5k < err["Q5_1"]
    assert err["Q8_0"] < q6k < q5k < q4k < 0.1
    # block sizes: 144 / 176 / 210 bytes per 256 weights
    assert kquants.quantize_q4_k(x).shape == (32, 4 * 144) and kquants.quantize_q6_k(x).shape == (32, 4 * 210)


def test_k_quants_handle_zero_constant_and_negative_blocks():
    x = np.zeros((3, 256), dtype=np.float32)
    x[1] = 0.5
    x[2] = -np.linspace(0.1, 2.0, 256, dtype=np.float32)
    for name, f in (("Q4_K", kquants.quantize_q4_k), ("Q5_K", kquants.quantize_q5_k), ("Q6_K", kquants.quantize_q6_k)):
        d = gguf.quants.dequantize(f(x), getattr(T, name)).reshape(x.shape)
        assert np.all(np.isfinite(d)) and np.all(d[0] == 0)
        assert np.abs(d[1:] - x[1:]).max() < 0.07, name


def test_q4_k_m_mixture_follows_llama_cpp():
    n = 8  # use_more_bits layers: 0, 3, 6, 7
    types = [tensor_type_name("Q4_K_M", f"blk.{i}.attn_v.weight", n) for i in range(n)]
    assert types == ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert tensor_type_name("Q4_K_M", "blk.3.ffn_down.weight", n) == "Q6_K"
    assert tensor_type_name("Q4_K_M", "blk.3.ffn_up.weight", n) == "Q4_K"
    assert tensor_type_name("Q4_K_M", "output.weight", n) == "Q6_K"
    assert tensor_type_name("Q4_K_M", "token_embd.weight", n) == "Q4_K"
    assert tensor_type_name("Q4_K_S", "blk.2.attn_v.weight", n) == "Q5_K"
    # rows that are not a multiple of 256 fall back like llama.cpp: Q4_K → Q5_0, Q6_K → Q8_0
    assert resolve_type("Q4_K_M", "blk.1.ffn_up.weight", (256, 128), n) == "Q5_0"
    assert resolve_type("Q4_K_M", "output.weight", (384, 128), n) == "Q8_0"
    assert resolve_type("Q4_K_M", "blk.1.attn_norm.weight", (128,), n) == "F32"
    with pytest.raises(ValueError, match="Q4_K_M"):
        tensor_type_name("Q3_X", "output.weight", n)


def test_rope_permutation_round_trips():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    p = permute_rope(w, 8)
    assert not np.array_equal(p, w) and np.array_equal(unpermute_rope(p, 8), w)
    # head 0, rows 0..15: HF pairs (i, i+8) become adjacent rows (2i, 2i+1)
    assert np.array_equal(p[1], w[8]) and np.array_equal(p[2], w[1])


def test_metadata_and_tokenizer_are_written(k_model_dir, tmp_path, tiny_tokenizer):
    out = export_gguf(k_model_dir, tmp_path / "m.gguf", "Q4_K_M")
    reader, tensors = _tensors(out)
    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    config = json.loads((k_model_dir / "config.json").read_text())
    assert f["general.architecture"] == "llama"
    assert f["llama.block_count"] == 2 and f["llama.embedding_length"] == 256
    assert f["llama.feed_forward_length"] == 512 and f["llama.context_length"] == 512
    assert f["llama.attention.head_count"] == 4 and f["llama.attention.head_count_kv"] == 2
    assert f["llama.rope.dimension_count"] == 64
    assert f["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    assert f["tokenizer.ggml.model"] == "gpt2"
    tokens = f["tokenizer.ggml.tokens"]
    vocab = tiny_tokenizer.get_vocab()
    assert len(tokens) == config["vocab_size"] and all(tokens[i] == t for t, i in vocab.items())
    assert f["tokenizer.ggml.bos_token_id"] == tiny_tokenizer.bos_token_id
    assert f["tokenizer.ggml.eos_token_id"] == tiny_tokenizer.eos_token_id
    assert len(f["tokenizer.ggml.merges"]) > 100
    assert f["tokenizer.ggml.token_type"][tiny_tokenizer.bos_token_id] == int(gguf.TokenType.CONTROL)
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    kinds = {n: t.tensor_type for n, t in tensors.items()}
    # 2 layers: use_more_bits picks layer 1 only (the last eighth)
    assert kinds["output.weight"] == T.Q6_K and kinds["blk.1.ffn_down.weight"] == T.Q6_K
    assert kinds["blk.0.ffn_down.weight"] == T.Q4_K and kinds["blk.1.attn_v.weight"] == T.Q6_K
    assert kinds["blk.0.ffn_up.weight"] == T.Q4_K and kinds["token_embd.weight"] == T.Q4_K


def test_own_reader_recovers_the_source_from_f16(k_model_dir, tmp_path):
    out = export_gguf(k_model_dir, tmp_path / "m.gguf", "F16")
    _, state = read_gguf(out)
    src = _source(k_model_dir, "model.layers.1.self_attn.k_proj.weight")
    assert np.abs(state["model.layers.1.self_attn.k_proj.weight"].numpy() - src).max() < 1e-3


@pytest.mark.parametrize("preset", ["F16", "Q8_0", "Q4_K_M"])
def test_transformers_gguf_loading_matches_quantscope_reader(k_model_dir, tmp_path, preset):
    pytest.importorskip("accelerate")
    out = export_gguf(k_model_dir, tmp_path / f"{preset}.gguf", preset)
    report = verify_export(out, tokens=64)
    assert report.ok and report.rel_logit_diff <= 1e-5
    # and against the float source: F16 is float rounding, Q8_0 close, Q4_K_M further
    vs_source = verify_export(out, reference=k_model_dir, tokens=64, tolerance=1.0)
    bound = {"F16": 2e-3, "Q8_0": 3e-2, "Q4_K_M": 0.3}[preset]
    assert vs_source.rel_logit_diff <= bound
    if preset == "Q4_K_M":
        with pytest.raises(VerifyError, match="does not match"):
            verify_export(out, reference=k_model_dir, tokens=64)


def test_quantized_folder_exports_dequantized(tiny_llama_dir, tmp_path):
    pytest.importorskip("accelerate")
    cfg = RTNConfig(bits=4, group_size=32)
    folder = write_quantized(tiny_llama_dir, tmp_path / "ct", "compressed-tensors", rtn_quantizer(cfg), method_config=cfg)
    out = export_gguf(folder, tmp_path / "ct.gguf", "F32")
    report = verify_export(out, reference=folder, tokens=48)
    assert report.ok and report.rel_logit_diff <= 1e-5


def test_bad_input_is_refused_before_work(tiny_llama_dir, tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")
    with pytest.raises(ValueError, match="--overwrite"):
        export_gguf(tiny_llama_dir, target, "Q8_0")
    with pytest.raises(ValueError, match="preset"):
        export_gguf(tiny_llama_dir, tmp_path / "n.gguf", "Q9_9")
    with pytest.raises(ValueError, match=".gguf"):
        export_gguf(tiny_llama_dir, tmp_path / "n.bin", "Q8_0")
    assert target.read_bytes() == b"old"
    assert not list(tmp_path.glob(".*partial"))
