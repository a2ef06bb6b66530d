"""Planning from a GGUF file's header: exact bytes per tensor and the model's shape from its
metadata; a DeepSeek-style GGUF without MLA metadata gets llama.cpp's full per-head cache."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core import planner

gguf = pytest.importorskip("gguf")
GIB = 2**30


def _write(path: Path, arch: str, meta: dict[str, int], tensors: dict[str, tuple[tuple[int, ...], str]]) -> int:
    """A GGUF with random weights of the given (HF-order shape, GGML type); returns the tensor bytes."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        w.add_uint32(f"{arch}.{key}", value)
    rng = np.random.default_rng(0)
    total = 0
    for name, (shape, tname) in tensors.items():
        qtype = gguf.GGMLQuantizationType[tname]
        data = rng.standard_normal(shape).astype(np.float32)
        if tname == "F32":
            w.add_tensor(name, data)
            total += data.nbytes
        else:
            q = gguf.quants.quantize(data, qtype)
            w.add_tensor(name, q, raw_dtype=qtype)
            total += q.nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return total


def _llama(path: Path) -> int:
    H, I, L, V = 256, 512, 2, 1024
    tensors: dict[str, tuple[tuple[int, ...], str]] = {"token_embd.weight": ((V, H), "Q8_0"),
                                                       "output_norm.weight": ((H,), "F32"),
                                                       "output.weight": ((V, H), "Q8_0")}
    for i in range(L):
        p = f"blk.{i}."
        tensors |= {p + "attn_norm.weight": ((H,), "F32"), p + "ffn_norm.weight": ((H,), "F32"),
                    p + "attn_q.weight": ((H, H), "Q4_0"), p + "attn_k.weight": ((128, H), "Q4_0"),
                    p + "attn_v.weight": ((128, H), "Q8_0"), p + "attn_output.weight": ((H, H), "Q4_0"),
                    p + "ffn_gate.weight": ((I, H), "Q4_0"), p + "ffn_up.weight": ((I, H), "Q4_0"),
                    p + "ffn_down.weight": ((H, I), "Q8_0")}
    return _write(path, "llama", {"block_count": L, "embedding_length": H, "feed_forward_length": I,
                                  "attention.head_count": 4, "attention.head_count_kv": 2, "context_length": 4096},
                  tensors)


def test_gguf_header_gives_exact_bytes_and_shape(tmp_path: Path) -> None:
    f = tmp_path / "tiny-Q4_0.gguf"
    total = _llama(f)
    spec = planner.load_model(f)
    assert spec.exact and spec.source == "gguf" and spec.exact_bytes == total
    assert (spec.num_layers, spec.hidden_size, spec.num_kv_heads, spec.head_dim, spec.vocab_size) == (2, 256, 2, 64, 1024)
    row = planner.plan(f, "rtx-4090", engine="llama.cpp", context=65536, cpu_ram_gib=8).formats[0]
    assert row.format == "stored" and row.weights_bytes == total and "GGUF header" in row.formulas["weights"]
    assert row.kv_cache_gib == pytest.approx(2 * 2 * 2 * 64 * 65536 * 2 / GIB, abs=1e-3)


def test_gguf_without_mla_metadata_plans_full_per_head_cache(tmp_path: Path) -> None:
    H, L, V, heads = 256, 1, 512, 4
    tensors: dict[str, tuple[tuple[int, ...], str]] = {"token_embd.weight": ((V, H), "F32"),
                                                       "output.weight": ((V, H), "F32")}
    tensors |= {"blk.0.attn_kv_a_mqa.weight": ((64 + 32, H), "F32"), "blk.0.attn_kv_b.weight": ((heads * (64 + 64), 64), "F32"),
                "blk.0.attn_q.weight": ((heads * (64 + 32), H), "F32"), "blk.0.attn_output.weight": ((H, heads * 64), "F32"),
                "blk.0.ffn_up.weight": ((512, H), "F32")}
    meta = {"block_count": L, "embedding_length": H, "feed_forward_length": 512, "attention.head_count": heads,
            "attention.head_count_kv": heads, "attention.kv_lora_rank": 64, "rope.dimension_count": 32,
            "attention.key_length": 96, "attention.value_length": 64}
    old = tmp_path / "old.gguf"
    _write(old, "deepseek2", meta, tensors)
    new = tmp_path / "new.gguf"
    _write(new, "deepseek2", meta | {"attention.key_length_mla": 96, "attention.value_length_mla": 64}, tensors)
    kw = dict(engine="llama.cpp", context=65536, cpu_ram_gib=8)
    old_row = planner.plan(old, "rtx-4090", **kw).formats[0]  # type: ignore[arg-type]
    new_row = planner.plan(new, "rtx-4090", **kw).formats[0]  # type: ignore[arg-type]
    assert old_row.kv_cache_gib == pytest.approx(heads * (96 + 64) * 65536 * 2 / GIB, abs=1e-3)
    assert new_row.kv_cache_gib == pytest.approx((64 + 32) * 65536 * 2 / GIB, abs=1e-3)
    assert any("predates" in n for n in planner.plan(old, "rtx-4090", **kw).notes)  # type: ignore[arg-type]


def test_not_a_gguf_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        planner.load_model(bad)


def test_iq_types_have_llama_cpp_block_sizes() -> None:
    from core.formats import get_format

    for name, bpw in (("iq1_s", 1.5625), ("iq1_m", 1.75), ("iq2_xxs", 2.0625), ("iq2_xs", 2.3125), ("iq2_s", 2.5625),
                      ("iq3_xxs", 3.0625), ("iq3_s", 3.4375), ("iq4_xs", 4.25), ("iq4_nl", 4.5)):
        fmt = get_format(name)
        blk, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[fmt.gguf_type]]
        assert fmt.bits_per_weight() == bpw == 8 * nbytes / blk
    row = planner.plan("llama-3.1-8b", "rtx-4090", formats=["iq4_xs", "q4_k_m"], engine="llama.cpp", cpu_ram_gib=8)
    assert row.formats[0].weights_gib < row.formats[1].weights_gib
