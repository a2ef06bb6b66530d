"""GGUF export for llama.cpp (and transformers' `gguf_file` loading), written with gguf-py.

`export_gguf(model_dir, out_file, preset)` reads a float model folder — or any quantized folder
Quantscope reads, dequantized layer by layer — and writes one .gguf file with:

* Llama architecture metadata (`llama.*`: context length, embedding length, block count,
  feed-forward length, head counts, RoPE dimension and base, RMS-norm epsilon, vocab size).
* Tensors renamed with gguf-py's `TensorNameMap`; q_proj/k_proj rows permuted into the
  interleaved-pair RoPE order llama.cpp expects (as `convert_hf_to_gguf.py` does for Llama).
* The BPE tokenizer from tokenizer.json (`gpt2` model: tokens, token types, merges, special ids,
  add-BOS/EOS flags, chat template) with the llama.cpp pre-tokenizer name that splits text as the
  model's tokenizer does (`core.export.gguf_tokenizer`; unknown pre-tokenizers are refused).

Types: F32, F16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 are quantized by gguf-py itself
(`gguf.quants.quantize`, so the bytes are exactly gguf-py's); Q4_K, Q5_K and Q6_K by
`core.export.kquants`. One-dimensional tensors (norms) stay F32, as llama.cpp requires.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.events import CancelToken, Log, Progress, Sink, StageStarted, check_cancel, null_sink

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


def _types() -> Any:
    import gguf

    return gguf.GGMLQuantizationType


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers that get the larger type in *_M mixtures: the first and
    last eighth of the layers, and every third layer in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


# Single-type presets: every 2-D tensor gets this type.
_UNIFORM = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
# Mixtures, as llama.cpp's `llama_tensor_get_type` assigns them for Llama models:
#   Q4_K_M: output.weight Q6_K; attn_v and ffn_down Q6_K in the use_more_bits layers; rest Q4_K.
#   Q4_K_S: output.weight Q6_K; attn_v Q5_K in the first 4 layers; ffn_down Q5_K in the first
#           eighth of the layers; rest Q4_K.
#   Q5_K_M: output.weight Q6_K; attn_v and ffn_down Q6_K in the use_more_bits layers; rest Q5_K.
#   Q5_K_S: output.weight Q6_K; rest Q5_K.
_MIXTURES = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S")
PRESETS = _UNIFORM + _MIXTURES

# When a row is not a multiple of a type's block, llama.cpp falls back to these.
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q4_0": "F16", "Q4_1": "F16", "Q5_0": "F16",
             "Q5_1": "F16", "Q8_0": "F16"}


def tensor_type_name(preset: str, gguf_name: str, n_layers: int) -> str:
    """The GGML type a preset gives tensor `gguf_name` (e.g. "blk.3.attn_v.weight") before any
    block-size fallback."""
    if preset not in PRESETS:
        raise ValueError(f"unknown GGUF preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if preset in _UNIFORM:
        return preset
    base = "Q4_K" if preset.startswith("Q4") else "Q5_K"
    if gguf_name == "output.weight":
        return "Q6_K"
    layer = int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else -1
    is_v, is_down = ".attn_v." in gguf_name, ".ffn_down." in gguf_name
    if preset in ("Q4_K_M", "Q5_K_M") and (is_v or is_down) and use_more_bits(layer, n_layers):
        return "Q6_K"
    if preset == "Q4_K_S":
        if is_v and layer < 4:
            return "Q5_K"
        if is_down and layer < n_layers // 8:
            return "Q5_K"
    return base


def _block_size(type_name: str) -> int:
    import gguf

    return gguf.GGML_QUANT_SIZES[getattr(_types(), type_name)][0]


def resolve_type(preset: str, gguf_name: str, shape: tuple[int, ...], n_layers: int) -> str:
    if len(shape) < 2:
        return "F32"
    name = tensor_type_name(preset, gguf_name, n_layers)
    while shape[-1] % _block_size(name):
        name = _FALLBACK.get(name, "F16")
    return name


def encode(data: np.ndarray, type_name: str) -> np.ndarray:
    """float32 [rows, cols] → the stored array (float for F32/F16, uint8 bytes otherwise)."""
    import gguf

    from core.export import kquants

    if type_name == "F32":
        return data.astype(np.float32)
    if type_name == "F16":
        return data.astype(np.float16)
    own = {"Q4_K": kquants.quantize_q4_k, "Q5_K": kquants.quantize_q5_k, "Q6_K": kquants.quantize_q6_k}
    if type_name in own:
        return own[type_name](data)
    return gguf.quants.quantize(data.astype(np.float32), getattr(_types(), type_name))


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k_proj rows (rotate-half pairs i, i + d/2) → llama.cpp's interleaved pairs (2i, 2i+1)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config: dict) -> float:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if kind not in (None, "default"):
        raise ValueError(f"RoPE scaling type {kind!r} in config.json is not supported by the GGUF export "
                         "(plain RoPE only)")
    return float(config.get("rope_theta") or (params.get("rope_theta") if isinstance(params, dict) else None)
                 or 10000.0)


@dataclass(frozen=True)
class LlamaDims:
    n_layers: int
    hidden: int
    ffn: int
    n_head: int
    n_head_kv: int
    head_dim: int
    context: int
    rms_eps: float
    rope_theta: float
    vocab: int

    @classmethod
    def from_config(cls, config: dict) -> LlamaDims:
        arch = (config.get("architectures") or ["?"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"GGUF export supports {', '.join(SUPPORTED_ARCHITECTURES)}; config.json says {arch}")
        n_head = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return cls(
            n_layers=int(config["num_hidden_layers"]), hidden=hidden, ffn=int(config["intermediate_size"]),
            n_head=n_head, n_head_kv=int(config.get("num_key_value_heads") or n_head),
            head_dim=int(config.get("head_dim") or hidden // n_head),
            context=int(config.get("max_position_embeddings") or 2048),
            rms_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(config),
            vocab=int(config["vocab_size"]),
        )


def _add_architecture(writer: Any, dims: LlamaDims, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(dims.context)
    writer.add_embedding_length(dims.hidden)
    writer.add_block_count(dims.n_layers)
    writer.add_feed_forward_length(dims.ffn)
    writer.add_head_count(dims.n_head)
    writer.add_head_count_kv(dims.n_head_kv)
    writer.add_rope_dimension_count(dims.head_dim)
    writer.add_rope_freq_base(dims.rope_theta)
    writer.add_layer_norm_rms_eps(dims.rms_eps)
    writer.add_vocab_size(dims.vocab)
    if dims.head_dim != dims.hidden // dims.n_head:
        writer.add_key_length(dims.head_dim)
        writer.add_value_length(dims.head_dim)


def _load_source_tokenizer(folder: Path) -> Any:
    """The model's own tokenizer, never running code from the folder (an `auto_map` in its
    tokenizer_config.json is ignored, not offered)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{folder}: its tokenizer cannot be loaded without running code from the folder "
                         f"({exc.__class__.__name__}), and Quantscope never runs a model's own code; the GGUF "
                         "export needs a standard tokenizer.json (drop auto_map and a custom tokenizer_class from "
                         "tokenizer_config.json if tokenizer.json is one)") from None


def _special_flags(tok: Any) -> tuple[bool, bool]:
    """(add BOS, add EOS) as the tokenizer really behaves: tokenizer_config.json's flags are often
    absent (transformers 5 and Llama 3 put the BOS in tokenizer.json's post-processor)."""
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a", add_special_tokens=True)["input_ids"]
    bos = tok.bos_token_id is not None and len(full) > len(plain) and full[0] == tok.bos_token_id
    eos = tok.eos_token_id is not None and len(full) > len(plain) and full[-1] == tok.eos_token_id
    return bool(bos), bool(eos)


def _looks_special(token: str) -> bool:
    """llama.cpp's converter marks these added tokens CONTROL even when tokenizer.json does not."""
    return (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>"))


def _add_tokenizer(writer: Any, folder: Path, vocab_size: int) -> None:
    """gpt2-style BPE vocabulary from tokenizer.json, padded to the model's vocab size, with the
    llama.cpp pre-tokenizer that splits text as the model's tokenizer does
    (`core.export.gguf_tokenizer.identify_pre_tokenizer`; unknown ones are refused)."""
    import gguf

    from core.export.gguf_tokenizer import identify_pre_tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no tokenizer.json; the GGUF export needs the model's BPE tokenizer there")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); copy tokenizer.json from the source model") from None
    model = doc.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: tokenizer model {model.get('type')!r} is not BPE; GGUF export supports "
                         "byte-level BPE (gpt2-style) tokenizers")
    if model.get("byte_fallback"):
        raise ValueError(f"{path}: a byte-fallback BPE (SentencePiece-style) tokenizer; GGUF export supports "
                         "byte-level BPE (gpt2-style) tokenizers")
    tok = _load_source_tokenizer(folder)
    pre = identify_pre_tokenizer(folder, tok)
    id_to_token: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types: dict[int, int] = {i: gguf.TokenType.NORMAL for i in id_to_token}
    for added in doc.get("added_tokens") or []:
        i = int(added["id"])
        id_to_token[i] = added["content"]
        special = added.get("special") or _looks_special(added["content"])
        types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    if max(id_to_token) >= vocab_size:
        raise ValueError(f"{path}: token id {max(id_to_token)} is outside the model's vocab_size {vocab_size}")
    tokens, token_types = [], []
    for i in range(vocab_size):
        if i in id_to_token:
            tokens.append(id_to_token[i])
            token_types.append(int(types[i]))
        else:  # the embedding matrix is larger than the vocabulary: padding rows
            tokens.append(f"[PAD{i}]")
            token_types.append(int(gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    for setter, value in ((writer.add_bos_token_id, tok.bos_token_id), (writer.add_eos_token_id, tok.eos_token_id),
                          (writer.add_unk_token_id, tok.unk_token_id), (writer.add_pad_token_id, tok.pad_token_id)):
        if value is not None:
            setter(int(value))
    add_bos, add_eos = _special_flags(tok)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    if template:
        writer.add_chat_template(template)


def _file_type(preset: str) -> Any:
    import gguf

    name = "ALL_F32" if preset == "F32" else f"MOSTLY_{preset}"
    return getattr(gguf.LlamaFileType, name, None)


# Quantscope's own header keys: the mark an --overwrite looks for, and the file's CRC-32 (taken
# over the whole file with this value's 8 bytes read as "00000000"; written last, patched at the end).
MARK_KEY = "quantscope.version"
CRC_KEY = "quantscope.crc32"
_CRC_BLANK = b"00000000"


def export_gguf(
    model_dir: str | Path,
    out_file: str | Path,
    preset: str = "Q8_0",
    *,
    overwrite: bool = False,
    sink: Sink = null_sink,
    cancel: CancelToken | None = None,
) -> Path:
    """Write `model_dir` (float, or quantized in any layout Quantscope reads — dequantized first)
    as a llama.cpp GGUF file. The file is written once, as a temporary file beside `out_file`
    under the output's lock (core.output.OutputFile), and appears only when complete."""
    import gguf

    from core.export.convert import dequantized_shapes, iter_dequantized
    from core.model_io import open_model
    from core.output import OutputFile, package_versions

    if preset not in PRESETS:
        raise ValueError(f"unknown GGUF preset {preset!r}; choose one of {', '.join(PRESETS)}")
    out_file = Path(out_file).expanduser().absolute()
    if out_file.suffix != ".gguf":
        raise ValueError(f"GGUF output must be a .gguf file path, got {out_file}")
    src = open_model(model_dir)
    output = OutputFile(out_file, overwrite=overwrite, source=src.path, is_ours=is_quantscope_gguf)
    output.check_target()
    src.require_weights()
    dims = LlamaDims.from_config(src.config)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, dims.n_layers)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_architecture(writer, dims, Path(src.path).name)
    file_type = _file_type(preset)
    if file_type is not None:
        writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, src.path, dims.vocab)
    # Every tensor's name, shape and type first (from the headers, or the packed codes of a
    # quantized folder), so the header is written before the data and the data streams to the
    # file once, one tensor at a time.
    plan = _tensor_plan(dequantized_shapes(src.path), preset, dims, name_map)
    for gguf_name, shape, type_name, nbytes in plan:
        raw = getattr(gguf.GGMLQuantizationType, type_name) if type_name not in ("F32", "F16") else None
        writer.add_tensor_info(gguf_name, shape, np.dtype(np.float16 if type_name == "F16" else np.float32),
                               nbytes, raw_dtype=raw)
    writer.add_string(MARK_KEY, package_versions().get("quantscope") or "unknown")
    writer.add_string(CRC_KEY, _CRC_BLANK.decode())  # last: its value ends the key-value section
    sink(StageStarted("gguf", total=len(plan), message=f"writing {out_file.name} ({preset})"))
    counts: dict[str, int] = {}
    with output:
        try:
            _write_gguf(writer, output.tmp, plan, iter_dequantized(src.path, cancel=cancel), dims, counts, sink,
                        cancel)
        finally:
            writer.close()
        output.commit()
    sink(Log("info", "GGUF tensor types: " + ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items()))))
    return out_file


def _tensor_plan(shapes: list[tuple[str, tuple[int, ...]]], preset: str, dims: LlamaDims,
                 name_map: Any) -> list[tuple[str, tuple[int, ...], str, int]]:
    """(GGUF name, shape, type, stored bytes) of each tensor, in the order they are written."""
    import gguf

    plan = []
    for hf_name, shape in shapes:
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for tensor {hf_name} of a Llama model")
        type_name = resolve_type(preset, gguf_name, shape, dims.n_layers)
        numel = int(np.prod(shape)) if shape else 1
        if type_name in ("F32", "F16"):
            nbytes = numel * (4 if type_name == "F32" else 2)
        else:
            block, size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, type_name)]
            nbytes = numel // block * size
        plan.append((gguf_name, tuple(shape), type_name, nbytes))
    return plan


def _write_gguf(writer: Any, path: Path, plan: list[tuple[str, tuple[int, ...], str, int]], tensors: Any,
                dims: LlamaDims, counts: dict[str, int], sink: Sink, cancel: CancelToken | None) -> None:
    """Header, key-values and tensor infos through gguf-py, then each tensor's bytes as it is
    encoded (aligned as gguf-py aligns them); then the file's CRC-32 into its header slot."""
    import zlib

    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    if list(writer.kv_data[0])[-1] != CRC_KEY:
        raise RuntimeError("the checksum must be the last GGUF key-value")
    f = writer.fout[0]
    crc_at = f.tell() - len(_CRC_BLANK)
    writer.write_ti_data_to_file()
    f.flush()
    with open(path, "rb") as head:
        crc = zlib.crc32(head.read(f.tell()))
    align = writer.data_alignment

    def put(data: bytes | memoryview) -> None:
        nonlocal crc
        f.write(data)
        crc = zlib.crc32(data, crc)

    put(bytes(-f.tell() % align))
    expected = iter(plan)
    done = 0
    for hf_name, tensor in tensors:
        check_cancel(cancel)
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name, shape, type_name, nbytes = next(expected, (None, None, None, None))
        data = tensor.float().numpy()
        if tuple(data.shape) != shape:
            raise RuntimeError(f"{hf_name}: shape {tuple(data.shape)} read, {shape} planned for {gguf_name}")
        if hf_name.endswith("q_proj.weight"):
            data = permute_rope(data, dims.n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = permute_rope(data, dims.n_head_kv)
        stored = np.ascontiguousarray(encode(data, type_name))
        if stored.nbytes != nbytes:
            raise RuntimeError(f"{gguf_name}: {stored.nbytes} bytes encoded as {type_name}, {nbytes} planned")
        put(memoryview(stored).cast("B"))
        put(bytes(-nbytes % align))
        counts[type_name] = counts.get(type_name, 0) + 1
        done += 1
        sink(Progress("gguf", done, len(plan), gguf_name))
    if done != len(plan):
        raise RuntimeError(f"{done} tensors written, {len(plan)} planned")
    f.seek(crc_at)
    f.write(f"{crc:08x}".encode())
    f.flush()
    os.fsync(f.fileno())


def is_quantscope_gguf(path: Path) -> bool:
    """Whether `path` is a GGUF file Quantscope wrote (its header carries MARK_KEY)."""
    try:
        import gguf

        return MARK_KEY in gguf.GGUFReader(str(path)).fields
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def gguf_damage(path: Path) -> str | None:
    """Why the GGUF file at `path` cannot be used (one line naming the file): structurally unsound
    (any writer's file), or Quantscope's file no longer holding the bytes it wrote; None when it is
    intact or sound without Quantscope's checksum."""
    import zlib

    from core.export.gguf_check import open_gguf

    again = "export it again"
    # A structurally unsound file (any writer's) raises open_gguf's bounded one-line error, which
    # names the file and what is wrong better than a checksum mismatch would.
    try:
        field = open_gguf(path).fields.get(CRC_KEY)
    except ValueError as exc:
        return str(exc)
    if field is None:
        return None
    end = field.offset + sum(int(p.nbytes) for p in field.parts)
    start = end - len(_CRC_BLANK)
    stored = bytes(field.parts[-1]).decode("ascii", "replace")
    crc = 0
    with open(path, "rb") as f:
        pos = 0
        for block in iter(lambda: f.read(1 << 22), b""):
            if pos < end and pos + len(block) > start:  # the checksum's own bytes read as blanks
                a, b = max(start - pos, 0), min(end - pos, len(block))
                block = block[:a] + _CRC_BLANK[a + pos - start:b + pos - start] + block[b:]
            crc = zlib.crc32(block, crc)
            pos += len(block)
    if f"{crc:08x}" != stored:
        return f"{path} is damaged: its CRC-32 differs from the one Quantscope recorded in it; {again}"
    return None


# --- reading back --------------------------------------------------------------------------------


def read_gguf(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Quantscope's own reader: (HF config dict, HF-named float32 state dict) from a Llama GGUF,
    dequantized with gguf-py and with the RoPE permutation undone."""
    import gguf

    from core.export.gguf_check import open_gguf

    reader = open_gguf(path)

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return None
        return f.contents()

    def number(key: str, default: float | None = None, *, integer: bool = True) -> Any:
        # Counts from the metadata size loops and allocations below: bound them by the file itself.
        value = field(key)
        if value is None:
            value = default
        if value is None or isinstance(value, (str, list)):
            raise ValueError(f"{path}: metadata {key} is missing or not a number; the GGUF file is incomplete")
        value = int(value) if integer else float(value)
        if not value > 0 or (integer and value > limit):
            raise ValueError(f"{path}: metadata {key} = {value} is out of range; the GGUF file is damaged")
        return value

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}; Quantscope reads llama GGUF files")
    names = {t.name for t in reader.tensors}
    limit = 1 << 24  # no Llama has more heads, layers or rows than this
    n_layers = number("llama.block_count")
    if 9 * n_layers > len(names):
        raise ValueError(f"{path}: metadata llama.block_count = {n_layers} but the file holds {len(names)} tensors; "
                         "the GGUF file is damaged")
    n_head = number("llama.attention.head_count")
    n_head_kv = number("llama.attention.head_count_kv", n_head)
    hidden = number("llama.embedding_length")
    tokens = field("tokenizer.ggml.tokens")
    vocab = number("llama.vocab_size", len(tokens) if isinstance(tokens, list) else None)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": number("llama.feed_forward_length"), "num_hidden_layers": n_layers,
        "num_attention_heads": n_head, "num_key_value_heads": n_head_kv,
        "head_dim": number("llama.attention.key_length", field("llama.rope.dimension_count") or hidden // n_head),
        "max_position_embeddings": number("llama.context_length"),
        "rms_norm_eps": number("llama.attention.layer_norm_rms_epsilon", integer=False),
        "rope_theta": number("llama.rope.freq_base", 10000.0, integer=False), "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": field("tokenizer.ggml.bos_token_id"), "eos_token_id": field("tokenizer.ggml.eos_token_id"),
    }
    hf_names = _inverse_names(n_layers)
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        hf = hf_names.get(t.name)
        if hf is None:
            raise ValueError(f"{path}: unexpected tensor {t.name}")
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        data = data.reshape(shape)
        if hf.endswith("q_proj.weight"):
            data = unpermute_rope(data, n_head)
        elif hf.endswith("k_proj.weight"):
            data = unpermute_rope(data, n_head_kv)
        state[hf] = torch.from_numpy(np.ascontiguousarray(data))
    return config, state


def _inverse_names(n_layers: int) -> dict[str, str]:
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    hf: list[str] = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        hf += [p + s for s in ("input_layernorm.weight", "post_attention_layernorm.weight",
                               "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                               "mlp.down_proj.weight")]
    return {name_map.get_name(n, try_suffixes=(".weight",)): n for n in hf}


def gguf_quantscope_model(path: str | Path) -> torch.nn.Module:
    """A float32 transformers Llama holding Quantscope's own reading of a GGUF file."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config, state = read_gguf(path)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise ValueError(f"{path}: GGUF tensors do not match a Llama model ({(unexpected or missing)[:3]})")
    if "lm_head.weight" not in state:
        model.tie_weights()
    return model.eval()


def gguf_consumer_and_quantscope(
    path: Path, reference: str | Path | None
) -> tuple[torch.nn.Module, torch.nn.Module, Any, str]:
    """For verify_export: (transformers' gguf_file model, Quantscope's model, tokenizer, loader)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import accelerate  # noqa: F401  (transformers refuses gguf_file loading without it)
    except ImportError:
        raise ValueError("verifying a GGUF file loads it with transformers, which needs the accelerate "
                         "package; run ./dev.sh setup (or pip install accelerate)") from None
    from core.export.gguf_check import check_gguf

    check_gguf(path)  # transformers' reader trusts the header; refuse a damaged file first
    consumer = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                    local_files_only=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True,
                                              trust_remote_code=False)
    if reference is not None:
        from core.export.verify import quantscope_model

        ours = quantscope_model(reference)
    else:
        ours = gguf_quantscope_model(path)
    return consumer.eval(), ours, tokenizer, f"transformers {transformers.__version__} gguf_file (gguf-py dequantize)"


