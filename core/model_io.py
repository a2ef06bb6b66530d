"""Open a Hugging Face model folder without loading its weights, and read tensors on demand.

`open_model(path)` parses config.json and the safetensors headers (single file or sharded with
`model.safetensors.index.json`) and validates them; weights are only read by
`ModelSource.load_tensors(names)`, which goes through safetensors' lazy, memory-mapped access so
that only the asked-for tensors become resident. Pickle checkpoints are refused, never opened.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from core.arch import SUPPORTED_ARCHITECTURES as SUPPORTED_ARCHITECTURES  # re-exported
from core.arch import unsupported_message

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"

# safetensors header dtype string -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, float]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "U16": (torch.uint16, 2),
    "U32": (torch.uint32, 4),
    "U64": (torch.uint64, 8),
    "BOOL": (torch.bool, 1),
}

_TORCH_TO_HEADER = {dt: name for name, (dt, _) in DTYPES.items()}

# Files that hold only pickled weights. Unpickling runs arbitrary code, so they are refused.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# A safetensors header above this is not a real header (the format caps it at 100 MB).
_MAX_HEADER = 100 * 1024 * 1024


def torch_dtype(header_dtype: str) -> torch.dtype:
    """Torch dtype of a safetensors header dtype string such as "BF16"."""
    try:
        return DTYPES[header_dtype][0]
    except KeyError:
        raise ValueError(f"unknown safetensors dtype {header_dtype!r}") from None


def header_dtype(dtype: torch.dtype) -> str:
    """safetensors header dtype string of a torch dtype (torch.bfloat16 -> "BF16")."""
    return _TORCH_TO_HEADER[dtype]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as described by its file's header; nothing is read."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # header spelling: "F32", "F16", "BF16", "U8", ...
    file: Path
    data_offsets: tuple[int, int]  # relative to the start of the data section, as in the header
    data_start: int  # absolute byte offset of the first byte in `file`

    @property
    def nbytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)


@dataclass
class ModelSource:
    """A model folder opened for reading. Only headers have been parsed."""

    path: Path
    config: dict
    architecture: str
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    @property
    def has_weights(self) -> bool:
        return bool(self.tensors)

    @property
    def supported(self) -> bool:
        return self.architecture in SUPPORTED_ARCHITECTURES

    @property
    def quantization_config(self) -> dict | None:
        qc = self.config.get("quantization_config")
        return qc if isinstance(qc, dict) else None

    @property
    def num_layers(self) -> int:
        return int(self.config.get("num_hidden_layers", 0))

    @property
    def tied_embeddings(self) -> bool:
        """Whether lm_head shares the embedding matrix (so it is stored once)."""
        if self.has_weights and "model.embed_tokens.weight" in self.tensors:
            return "lm_head.weight" not in self.tensors
        return bool(self.config.get("tie_word_embeddings", False))

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def source_dtype(self) -> torch.dtype:
        """The floating dtype most weight bytes are stored in (config's torch_dtype if no weights)."""
        by_dtype: dict[str, int] = {}
        for t in self.tensors.values():
            if t.dtype in ("F32", "F16", "BF16", "F64"):
                by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
        if by_dtype:
            return torch_dtype(max(by_dtype, key=by_dtype.__getitem__))
        name = self.config.get("torch_dtype") or self.config.get("dtype") or "float32"
        dt = getattr(torch, str(name).replace("torch.", ""), None)
        return dt if isinstance(dt, torch.dtype) else torch.float32

    def layer_prefix(self, i: int) -> str:
        return f"model.layers.{i}."

    def layer_tensor_names(self, i: int) -> list[str]:
        """Names of decoder layer i's tensors, in header order."""
        prefix = self.layer_prefix(i)
        return [n for n in self.tensors if n.startswith(prefix)]

    def non_layer_tensor_names(self) -> list[str]:
        """Tensors outside the decoder layers (embeddings, final norm, lm_head)."""
        return [n for n in self.tensors if not n.startswith("model.layers.")]

    def require_weights(self) -> None:
        """Raise the clear error quantize/eval need when the folder holds a config only."""
        if not self.has_weights:
            raise ValueError(
                f"{self.path} has a config.json but no *.safetensors weights; "
                "point --model at a folder with the model's safetensors files"
            )

    def require_supported(self) -> None:
        if not self.supported:
            raise ValueError(
                f"{unsupported_message(self.architecture)} in {self.path / CONFIG_FILE}"
            )

    def load_tensors(self, names: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Read the named tensors in their stored dtype. Each file is opened lazily (mmap) and
        closed again, so nothing but the returned tensors stays resident."""
        by_file: dict[Path, list[str]] = {}
        for n in names:
            info = self.tensors.get(n)
            if info is None:
                raise KeyError(f"tensor {n!r} not found in {self.path}")
            by_file.setdefault(info.file, []).append(n)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for n in file_names:
                    out[n] = f.get_tensor(n)
        return {n: out[n] for n in names}


class InvalidModelError(ValueError):
    """A model folder whose files are malformed or disagree with each other. The message is one
    line naming the file and what to do; the CLI prints it and exits with status 2."""


def _header_error(file: Path, what: str) -> InvalidModelError:
    return InvalidModelError(f"corrupt safetensors header in {file}: {what}; re-download or re-save it")


def _header_int(value: object) -> int | None:
    """A non-negative JSON integer, else None (JSON booleans are not integers here)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header and validate it as strictly as the safetensors library
    does before any byte of data is used: every entry has a known dtype, a shape of non-negative
    integers and a [begin, end] byte range whose length is exactly shape × dtype size; the ranges,
    sorted, tile the data section with no gap, overlap or trailing byte. Raises InvalidModelError
    (a ValueError) naming the file."""
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _header_error(file, f"file is only {size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise _header_error(file, f"header length {n} does not fit a {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise TypeError("header is not a JSON object")
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
        raise _header_error(file, str(exc)) from None
    data_start = 8 + n
    data_size = size - data_start
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise _header_error(file, "__metadata__ must map names to strings")
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise _header_error(file, f"bad entry for tensor {name!r}")
        dtype, raw_shape, raw_offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise InvalidModelError(f"unsupported dtype {dtype} for tensor {name!r} in {file}; "
                                    f"re-save it in one of {', '.join(DTYPES)}")
        if not isinstance(raw_shape, list) or any(_header_int(d) is None for d in raw_shape):
            raise _header_error(file, f"tensor {name!r} has shape {raw_shape!r}; dimensions must be "
                                      "non-negative integers")
        if (not isinstance(raw_offsets, list) or len(raw_offsets) != 2
                or any(_header_int(x) is None for x in raw_offsets)):
            raise _header_error(file, f"tensor {name!r} has data_offsets {raw_offsets!r}; they must be two "
                                      "non-negative integers [begin, end]")
        shape = tuple(raw_shape)
        begin, end = raw_offsets
        expected = math.prod(shape) * DTYPES[dtype][1]
        if end < begin or end - begin != expected:
            raise _header_error(file, f"tensor {name!r} has {end - begin} bytes but shape {list(shape)} {dtype} "
                                      f"needs {int(expected)}")
        if end > data_size:
            raise InvalidModelError(
                f"truncated safetensors file {file}: tensor {name!r} ends at byte {data_start + end} "
                f"but the file has {size} bytes; the download or copy was cut short, fetch the file again"
            )
        infos[name] = TensorInfo(name, shape, dtype, file, (begin, end), data_start + begin)
    # The byte ranges must tile the data section exactly, as the safetensors library requires:
    # an overlap means two tensors share bytes, a gap bytes that belong to no tensor (an edited
    # header). Overlaps are reported first: a tensor moved onto another's bytes leaves a gap too.
    covered, previous, gap = 0, None, None
    for info in sorted(infos.values(), key=lambda t: t.data_offsets):
        begin, end = info.data_offsets
        if begin < covered:
            raise _header_error(file, f"tensors {previous!r} and {info.name!r} overlap (bytes {begin}-{covered})")
        if begin > covered and gap is None:
            gap = (f"bytes {covered}-{begin} before tensor {info.name!r} belong to no tensor" if previous is None
                   else f"bytes {covered}-{begin} between tensors {previous!r} and {info.name!r} belong to no tensor")
        covered, previous = max(covered, end), info.name
    if gap is not None:
        raise _header_error(file, gap)
    if covered != data_size:
        raise _header_error(file, f"{data_size - covered} trailing bytes after the last tensor "
                                  f"(the data section has {data_size} bytes, the tensors cover {covered})")
    return infos


def _confined_name(path: Path, index: Path, tensor: str, name: object) -> str:
    """A shard name from the index, refused unless it names a file inside the model folder.
    Confined by the name as written (no absolute path, no `..`), not by where a symlink points:
    a Hugging Face cache snapshot holds symlinks into ../../blobs, which stay allowed."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidModelError(f"corrupt shard index {index}: tensor {tensor!r} maps to {name!r}, not a file "
                                "name; re-download or re-save it")
    parts = Path(name).parts
    if Path(name).is_absolute() or name.startswith(("/", "\\")) or ".." in parts or "\\" in name:
        raise InvalidModelError(
            f"shard index {index} points tensor {tensor!r} at {name!r}, outside the model folder {path}; "
            "every shard must be a file inside the folder: fix the weight_map or re-download the model"
        )
    return name


def _read_index(path: Path) -> dict[str, str] | None:
    """The index's weight_map (tensor name -> shard name inside `path`), or None without an index."""
    index = path / INDEX_FILE
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise InvalidModelError(f"corrupt shard index {index}: {exc!r}; re-download or re-save it") from None
    return {str(t): _confined_name(path, index, str(t), f) for t, f in weight_map.items()}


def _weight_files(path: Path, weight_map: dict[str, str] | None) -> list[Path]:
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise InvalidModelError(f"shard {missing[0]} listed in {path / INDEX_FILE} is missing; "
                                    f"download all shards into {path}")
        return [path / f for f in files]
    return sorted(p for p in path.glob("*.safetensors") if p.is_file())


def _collect_tensors(path: Path, files: list[Path], weight_map: dict[str, str] | None) -> dict[str, TensorInfo]:
    """Every tensor of the folder, each from exactly one file. With an index a tensor comes from
    the shard the index assigns (a stray second copy in another shard is ignored);
    without one, a tensor stored in two files is ambiguous and refused."""
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        rel = file.relative_to(path).as_posix()
        for name, info in read_safetensors_header(file).items():
            assigned = weight_map.get(name) if weight_map is not None else None
            if assigned is not None:
                if Path(assigned).as_posix() == rel:
                    tensors[name] = info
                continue
            if name in tensors:
                raise InvalidModelError(
                    f"tensor {name!r} is stored twice, in {tensors[name].file} and in {file}; remove the stale "
                    f"file from {path} (or add a model.safetensors.index.json that says which copy is meant)"
                )
            tensors[name] = info
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in tensors:
                raise InvalidModelError(
                    f"{path / INDEX_FILE} assigns tensor {name!r} to {shard}, which does not contain it; "
                    "re-download the shards and index together"
                )
    return tensors


def _refuse_pickle(path: Path) -> None:
    pickles = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix in _PICKLE_SUFFIXES
                     and p.name != "training_args.bin")
    if pickles:
        raise ValueError(
            f"{path} holds only pickle weights ({pickles[0]}); Quantscope never unpickles files. "
            "Convert them to safetensors where you trust the file (e.g. load it with transformers and "
            "save_pretrained(..., safe_serialization=True)), then pass the new folder"
        )


def open_model(path: str | os.PathLike, *, check_architecture: bool = True) -> ModelSource:
    """Open a model folder: config.json plus optional safetensors weights (headers only).

    A config-only folder opens with `tensors == {}` (enough for planning); call
    `require_weights()` before quantizing or evaluating. `check_architecture=False` lets planning
    open families the quantizer does not support.
    """
    path = Path(path).expanduser()
    if path.is_file():
        if path.suffix in _PICKLE_SUFFIXES:
            raise ValueError(
                f"{path} is a pickle checkpoint; Quantscope never unpickles files. Convert it to safetensors "
                "and pass the model folder (with config.json)"
            )
        raise ValueError(f"{path} is a file; pass the model folder that contains config.json")
    if not path.is_dir():
        raise ValueError(f"model folder not found: {path}")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"missing {CONFIG_FILE} in {path}; pass a Hugging Face model folder that contains it")
    try:
        config = json.loads(config_path.read_text())
        if not isinstance(config, dict):
            raise TypeError("not a JSON object")
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
        raise ValueError(f"corrupt {config_path}: {exc}; re-download or fix the file") from None
    archs = config.get("architectures") or []
    architecture = str(archs[0]) if archs else str(config.get("model_type", "unknown"))
    source = ModelSource(path=path, config=config, architecture=architecture)
    if check_architecture:
        source.require_supported()
    weight_map = _read_index(path)
    files = _weight_files(path, weight_map)
    if not files:
        _refuse_pickle(path)
        return source
    source.tensors = _collect_tensors(path, files, weight_map)
    source.files = files
    from core.validate import check_tensors_match_config

    check_tensors_match_config(source)
    return source
