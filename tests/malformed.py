"""Ways to break a model folder, for the malformed-input tests: each function damages a copy of a
tiny Llama folder in place, the way a bad download, a careless edit or a hostile file would."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"


def read_header(file: Path) -> tuple[dict[str, Any], bytes]:
    """(parsed header, data section) of a safetensors file."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_header(file: Path, header: dict[str, Any], data: bytes) -> None:
    """Write a safetensors file with exactly this header and data (no checks: that is the point)."""
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads headers to 8 bytes with spaces
    file.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def edit_config(model: Path, **changes: Any) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(changes)
    (model / "config.json").write_text(json.dumps(cfg))


# --- safetensors headers ------------------------------------------------------------------------

def overlapping_offsets(model: Path) -> None:
    """Layer 0's k_proj claims v_proj's bytes (same size), so two tensors share data."""
    header, data = read_header(model / WEIGHTS)
    header["model.layers.0.self_attn.k_proj.weight"]["data_offsets"] = \
        header["model.layers.0.self_attn.v_proj.weight"]["data_offsets"]
    write_header(model / WEIGHTS, header, data)


def gapped_offsets(model: Path) -> None:
    """The last tensor moves 4 bytes later (the file grows by 4): bytes no tensor owns."""
    header, data = read_header(model / WEIGHTS)
    begin, end = header["model.norm.weight"]["data_offsets"]
    header["model.norm.weight"]["data_offsets"] = [begin + 4, end + 4]
    write_header(model / WEIGHTS, header, data[:begin] + b"\0" * 4 + data[begin:])


def negative_offset(model: Path) -> None:
    header, data = read_header(model / WEIGHTS)
    header["model.layers.0.self_attn.q_proj.weight"]["data_offsets"][0] = -8
    write_header(model / WEIGHTS, header, data)


def uncovered_bytes(model: Path) -> None:
    """A tensor's entry is removed from the header: its bytes stay, owned by nobody."""
    header, data = read_header(model / WEIGHTS)
    del header["model.layers.1.self_attn.k_proj.weight"]
    write_header(model / WEIGHTS, header, data)


def trailing_bytes(model: Path) -> None:
    with open(model / WEIGHTS, "ab") as f:
        f.write(b"\0" * 64)


def negative_dim(model: Path) -> None:
    header, data = read_header(model / WEIGHTS)
    header["model.norm.weight"]["shape"] = [-128]
    write_header(model / WEIGHTS, header, data)


def shape_span_mismatch(model: Path) -> None:
    """q_proj says [64, 128] F32 (32 KiB) over a 64 KiB byte range."""
    header, data = read_header(model / WEIGHTS)
    header["model.layers.0.self_attn.q_proj.weight"]["shape"] = [64, 128]
    write_header(model / WEIGHTS, header, data)


def integer_weight(model: Path) -> None:
    """q_proj's F32 bytes relabelled I32: same size, a valid header, but not a float weight."""
    header, data = read_header(model / WEIGHTS)
    header["model.layers.0.self_attn.q_proj.weight"]["dtype"] = "I32"
    write_header(model / WEIGHTS, header, data)


def truncated_file(model: Path) -> None:
    f = model / WEIGHTS
    with open(f, "r+b") as h:
        h.truncate(f.stat().st_size - 1000)


def corrupt_header_json(model: Path) -> None:
    f = model / WEIGHTS
    data = bytearray(f.read_bytes())
    data[8:20] = b"{not json!!!"
    f.write_bytes(bytes(data))


# --- config.json against the tensors ------------------------------------------------------------

def absurd_hidden_size(model: Path) -> None:
    edit_config(model, hidden_size=10**9)


def wrong_hidden_size(model: Path) -> None:
    edit_config(model, hidden_size=256)


def zero_heads(model: Path) -> None:
    edit_config(model, num_attention_heads=0)


def more_layers_than_stored(model: Path) -> None:
    edit_config(model, num_hidden_layers=3)


def fewer_layers_than_stored(model: Path) -> None:
    edit_config(model, num_hidden_layers=1)


def q_proj_wrong_shape(model: Path) -> None:
    """Layer 1's q_proj stored as [64, 256] (a valid file, but not what the config implies)."""
    tensors = load_file(str(model / WEIGHTS))
    tensors["model.layers.1.self_attn.q_proj.weight"] = torch.randn(64, 256)
    save_file(tensors, str(model / WEIGHTS), metadata={"format": "pt"})


# --- shard index --------------------------------------------------------------------------------

def write_index(model: Path, weight_map: dict[str, str]) -> None:
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def index_pointing_outside(model: Path) -> None:
    """The index sends every tensor to ../outside.safetensors, a real file beside the folder."""
    (model / WEIGHTS).rename(model.parent / "outside.safetensors")
    names = [n for n in read_header(model.parent / "outside.safetensors")[0] if n != "__metadata__"]
    write_index(model, {n: "../outside.safetensors" for n in names})


def index_with_absolute_path(model: Path) -> None:
    elsewhere = model.parent / "elsewhere"
    elsewhere.mkdir()
    (model / WEIGHTS).rename(elsewhere / WEIGHTS)
    names = [n for n in read_header(elsewhere / WEIGHTS)[0] if n != "__metadata__"]
    write_index(model, {n: str(elsewhere / WEIGHTS) for n in names})


def duplicate_tensor_without_index(model: Path) -> None:
    """A second file also holds model.norm.weight (different values): which one is meant?"""
    save_file({"model.norm.weight": torch.zeros(128)}, str(model / "extra.safetensors"), metadata={"format": "pt"})


def missing_shard(model: Path) -> None:
    names = [n for n in read_header(model / WEIGHTS)[0] if n != "__metadata__"]
    write_index(model, {n: (WEIGHTS if n != "model.norm.weight" else "model-00002-of-00002.safetensors")
                        for n in names})


def corrupt_index(model: Path) -> None:
    (model / "model.safetensors.index.json").write_text("{\"weight_map\": ")


# --- other files --------------------------------------------------------------------------------

def missing_config(model: Path) -> None:
    (model / "config.json").unlink()


def pickle_only(model: Path) -> None:
    (model / WEIGHTS).unlink()
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle of the int 1


def nan_weight(model: Path) -> None:
    tensors = load_file(str(model / WEIGHTS))
    tensors["model.layers.1.mlp.up_proj.weight"].view(-1)[7] = float("nan")
    save_file(tensors, str(model / WEIGHTS), metadata={"format": "pt"})


def unsupported_architecture(model: Path) -> None:
    edit_config(model, architectures=["GPTNeoXForCausalLM"])


def tokenizer_invalid_json(model: Path) -> None:
    (model / "tokenizer.json").write_text("{\"version\": \"1.0\", \"model\": ")


def tokenizer_unloadable(model: Path) -> None:
    """Valid JSON, but not a tokenizer the tokenizers library can build."""
    (model / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "NoSuchModel"}}))
