"""Cross-checks between a model folder's files, made before anything is computed or written.

`check_config_bounds` refuses config values no real model has (10⁹ layers, a 10⁹ hidden size),
which would otherwise make planning allocate per-layer tables until memory runs out.
`check_tensors_match_config` compares the stored tensors with the shapes config.json implies for
the supported (Llama-family) layout — every decoder layer's linears and norms, the embeddings,
the final norm and the layer count — so a config that disagrees with its weights is one clear
line instead of an output that will not load (or a division by zero in GPTQ).
`tokenizer_problem` says why a tokenizer.json cannot be used, for the copy into an output.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.model_io import ModelSource

# Generous ceilings, each several times the largest released model's value (Llama-3.1-405B:
# 126 layers, hidden 16384, intermediate 53248; Gemma-3: vocabulary 262208; DeepSeek-V3: 256
# routed experts). Past them a config is a typo or hostile, not a model.
CONFIG_LIMITS: dict[str, int] = {
    "num_hidden_layers": 1024,
    "hidden_size": 131072,
    "intermediate_size": 1 << 20,
    "moe_intermediate_size": 1 << 20,
    "num_attention_heads": 8192,
    "num_key_value_heads": 8192,
    "head_dim": 8192,
    "vocab_size": 1 << 22,
    "num_local_experts": 16384,
    "num_experts": 16384,
    "n_routed_experts": 16384,
    "num_experts_per_tok": 16384,
    "kv_lora_rank": 131072,
    "q_lora_rank": 131072,
}

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")

Shapes = dict[str, tuple[int, ...]]  # tensor name -> shape


class ConfigMismatchError(ValueError):
    """config.json and the stored tensors disagree (one line: tensor, expected and stored shape)."""


def check_config_bounds(config: dict[str, Any], where: str) -> None:
    """Refuse a config whose sizes are not numbers or are beyond any real model (see
    CONFIG_LIMITS). `where` names the file or catalog entry in the message."""
    for key, limit in CONFIG_LIMITS.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigMismatchError(f"{where}: {key} is {value!r}, not an integer; fix the value in config.json")
        if value < 0 or value > limit:
            raise ConfigMismatchError(
                f"{where}: {key} = {value} is outside any real model (0 to {limit}); fix the value in config.json"
            )


def _positive(config: dict[str, Any], key: str, where: Path) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigMismatchError(f"{where}: {key} is {value!r}; it must be a positive integer, fix config.json "
                                  "(or re-download it with the weights)")
    return value


def expected_shapes(config: dict[str, Any], where: Path) -> tuple[int, Shapes, Shapes]:
    """(num_hidden_layers, required tensor shapes, optional tensor shapes) of a model of a
    supported family as its config describes it (the layer layout from the family's adapter in
    core.arch; Llama's for a config naming no supported architecture). Optional tensors are biases
    and q/k norms, checked when stored."""
    check_config_bounds(config, str(where))
    H = _positive(config, "hidden_size", where)
    L = _positive(config, "num_hidden_layers", where)
    nh = _positive(config, "num_attention_heads", where)
    nkv = _positive(config, "num_key_value_heads", where) if config.get("num_key_value_heads") is not None else nh
    V = _positive(config, "vocab_size", where)
    inter = _positive(config, "intermediate_size", where)
    if nh % nkv:
        raise ConfigMismatchError(f"{where}: num_attention_heads {nh} is not a multiple of num_key_value_heads "
                                  f"{nkv}; fix config.json")
    if config.get("head_dim") is not None:
        hd = _positive(config, "head_dim", where)
    else:
        if H % nh:
            raise ConfigMismatchError(f"{where}: hidden_size {H} is not divisible by num_attention_heads {nh} and "
                                      "there is no head_dim; fix config.json")
        hd = H // nh
    from core.arch import SUPPORTED_ARCHITECTURES, adapter_for

    archs = config.get("architectures") or []
    arch = adapter_for(str(archs[0]) if archs and str(archs[0]) in SUPPORTED_ARCHITECTURES else "LlamaForCausalLM")
    required: Shapes = {arch.embed_name: (V, H), "model.norm.weight": (H,)}
    optional: Shapes = {"lm_head.weight": (V, H)}
    layer_required, layer_optional = arch.layer_shapes(H, nh, nkv, hd, inter)
    for i in range(L):
        p = f"{arch.layers_prefix}{i}."
        required |= {p + rel: shape for rel, shape in layer_required.items()}
        optional |= {p + rel: shape for rel, shape in layer_optional.items()}
    return L, required, optional


def _geometry(config: dict[str, Any]) -> str:
    keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size")
    return ", ".join(f"{k} {config[k]}" for k in keys if config.get(k) is not None)


def check_tensors_match_config(source: ModelSource) -> None:
    """Refuse a folder whose stored tensors disagree with its config.json: decoder layers stored
    beyond num_hidden_layers or missing below it, a tensor whose shape is not the one the config
    implies, or (for an unquantized model) an integer dtype where a float weight belongs. Only the
    supported Llama-family layout is checked by shape; quantized folders (quantization_config)
    store packed tensors and are checked for their layer count only."""
    config_path = source.path / "config.json"
    if not source.supported:
        return  # planning opens other families too; their layouts are not modelled here
    quantized = source.quantization_config is not None
    stored_layers = sorted({int(m.group(1)) for n in source.tensors if (m := _LAYER_RE.match(n))})
    L = _positive(source.config, "num_hidden_layers", config_path)
    check_config_bounds(source.config, str(config_path))
    beyond = [i for i in stored_layers if i >= L]
    if beyond:
        name = next(n for n in source.tensors if n.startswith(f"model.layers.{beyond[-1]}."))
        raise ConfigMismatchError(
            f"{config_path} says num_hidden_layers = {L} but {source.tensors[name].file} stores decoder layers up "
            f"to {beyond[-1]} ({name}); set num_hidden_layers to {beyond[-1] + 1} or re-download the model"
        )
    if quantized:
        present = set(stored_layers)
        absent = [i for i in range(L) if i not in present]
        if absent:
            raise ConfigMismatchError(
                f"{config_path} says num_hidden_layers = {L} but {source.path} stores no tensors of decoder layer "
                f"{absent[0]}; set num_hidden_layers to {len(stored_layers)} or re-download the model"
            )
        return
    _, required, optional = expected_shapes(source.config, config_path)
    for name, shape in required.items():
        info = source.tensors.get(name)
        if info is None:
            layer = _LAYER_RE.match(name)
            hint = (f"set num_hidden_layers to {len(stored_layers)} or re-download the model"
                    if layer and int(layer.group(1)) >= len(stored_layers) else "re-download the model")
            raise ConfigMismatchError(f"{source.path} has no tensor {name}, which {config_path} "
                                      f"(num_hidden_layers {L}) implies; {hint}")
        _check_shape(info, shape, config_path, source.config)
    for name, shape in optional.items():
        info = source.tensors.get(name)
        if info is not None:
            _check_shape(info, shape, config_path, source.config)
    for name, info in source.tensors.items():
        if name.endswith(".weight") and info.dtype not in _FLOAT_DTYPES:
            raise ConfigMismatchError(
                f"tensor {name} in {info.file} is stored as {info.dtype}, but a model without quantization_config "
                "keeps its weights in a float dtype; re-save it in float16/bfloat16/float32 (or restore the "
                "quantization_config that describes its layout)"
            )


def _check_shape(info: Any, shape: tuple[int, ...], config_path: Path, config: dict[str, Any]) -> None:
    if tuple(info.shape) != shape:
        raise ConfigMismatchError(
            f"tensor {info.name} in {info.file} is stored as {list(info.shape)} but {config_path} "
            f"({_geometry(config)}) implies {list(shape)}; fix config.json or re-download the matching weights"
        )


def tokenizer_problem(model_dir: Path) -> str | None:
    """Why the folder's tokenizer.json cannot be used (invalid JSON, or a file the tokenizers
    library cannot load), or None when it loads or there is none."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{path} is not valid JSON ({exc}); copy a working tokenizer.json from the original model"
    try:
        from tokenizers import Tokenizer

        Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust loader raises plain Exception subclasses for any bad field
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"{path} cannot be loaded by the tokenizers library ({first}); copy a working tokenizer.json " \
               "from the original model"
    return None
