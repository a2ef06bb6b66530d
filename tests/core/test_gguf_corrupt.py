"""Corrupt GGUF inputs end in one bounded, explicit line naming the file: bad magic, unknown
version, absurd tensor/metadata/array counts and string lengths, truncation anywhere, absurd
llama metadata — through `quantscope eval` (exit 2), the demo conversion and `verify_export`."""
from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from core.cli import main
from core.export.gguf import export_gguf, read_gguf
from core.export.gguf_check import check_gguf

gguf = pytest.importorskip("gguf")

HUGE = 1 << 62


@pytest.fixture(scope="module")
def good(tiny_model_factory, tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("good") / "t.gguf"
    export_gguf(tiny_model_factory(), path, "F16")
    return path.read_bytes()


def _patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _kv_only(key: bytes, vtype: int, payload: bytes) -> bytes:
    """A GGUF v3 header with no tensors and one metadata entry."""
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key + struct.pack("<I", vtype) + payload


def _cases(good: bytes) -> dict[str, tuple[bytes, str]]:
    return {
        "empty": (b"", "empty"),
        "short": (good[:10], "shorter than a GGUF header"),
        "bad magic": (b"GGML" + good[4:], "not the GGUF magic"),
        "unknown version": (_patched(good, 4, "<I", 99), "GGUF version 99"),
        "absurd tensor count": (_patched(good, 8, "<Q", HUGE), f"claims {HUGE} tensors"),
        "absurd metadata count": (_patched(good, 16, "<Q", HUGE), f"{HUGE} metadata entries"),
        "truncated in metadata": (good[:300], "truncated"),
        "truncated in tensor data": (good[: len(good) * 3 // 5], "truncated"),
        "absurd array count": (_kv_only(b"tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 1 << 40) + b"\0" * 64),
                               f"claims {1 << 40} items"),
        "absurd string length": (_kv_only(b"general.name", 8, struct.pack("<Q", 1 << 50) + b"abc"), "truncated"),
        "unknown value type": (_kv_only(b"general.name", 77, b"\0" * 16), "unknown value type 77"),
    }


CASES = ["empty", "short", "bad magic", "unknown version", "absurd tensor count", "absurd metadata count",
         "truncated in metadata", "truncated in tensor data", "absurd array count", "absurd string length",
         "unknown value type"]


@pytest.mark.parametrize("case", CASES)
def test_corrupt_gguf_gives_one_line_exit_2_through_the_cli(good, tmp_path, capsys, case):
    data, expected = _cases(good)[case]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    start = time.perf_counter()
    code = main(["eval", "--model", str(bad), "--windows", "1", "--seq-len", "16"])
    seconds = time.perf_counter() - start
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"quantscope eval: error: {bad}:"), err
    assert expected in err[0]
    assert seconds < 20


@pytest.mark.parametrize("case", CASES)
def test_check_is_bounded_by_the_file_not_the_header(good, tmp_path, case):
    data, expected = _cases(good)[case]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=str(bad)) as info:
        read_gguf(bad)
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert time.perf_counter() - start < 2


def test_the_exporters_own_output_passes_the_check(good, tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(good)
    check_gguf(path)
    config, state = read_gguf(path)
    assert config["num_hidden_layers"] == 2 and len(state) == 2 + 9 * 2 + 1


@pytest.mark.parametrize("layers, message", [(10**9, "= 1000000000 is out of range"),
                                             (1000, "= 1000 but the file holds 1 tensors")])
def test_absurd_llama_metadata_is_refused_before_allocating(tmp_path, layers, message):
    import numpy as np

    path = tmp_path / "absurd.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_embedding_length(128)
    writer.add_feed_forward_length(256)
    writer.add_context_length(512)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(16)
    writer.add_tensor("token_embd.weight", np.zeros((16, 128), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"absurd.gguf: metadata llama.block_count " + message):
        read_gguf(path)
    assert time.perf_counter() - start < 2


def test_demo_conversion_refuses_a_corrupt_packaged_gguf(good, tmp_path, monkeypatch):
    import core.demo

    bad = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    bad.write_bytes(good[: len(good) // 2])
    monkeypatch.setattr(core.demo, "gguf_path", lambda: bad)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=f"{bad}: .*truncated"):
        core.demo.prepare_smollm2(cache)
    assert list((cache / "models").iterdir()) == []


def test_verify_refuses_a_corrupt_gguf_before_transformers_reads_it(good, tmp_path):
    from core.export.verify import verify_export

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_patched(good, 8, "<Q", HUGE))
    with pytest.raises(ValueError, match=f"{bad}: header claims"):
        verify_export(bad)


def test_a_real_gguf_is_accepted_quickly():
    from core.demo import gguf_path

    try:
        path = gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    start = time.perf_counter()
    check_gguf(path)
    assert time.perf_counter() - start < 5
    assert isinstance(Path(path).stat().st_size, int)
