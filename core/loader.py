"""Load any model folder back as a torch model for evaluation: a plain Hugging Face folder, or a
Quantscope output in any layout it writes (compressed-tensors, GPTQ, AWQ, bitsandbytes).

Quantized outputs are read with the same exporter that wrote them (`detect_exporter` on the
config's `quantization_config`); each quantized linear becomes a `QuantLinear`, so evaluation
runs the real quantized arithmetic (dequantized weights, W8A8 activation quantization, the
LLM.int8 decomposition). Only safetensors are read; pickles and remote code never run.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.model_io import ModelSource, open_model
from core.qlinear import QuantLinear
from core.qtensors import QuantizedWeight

log = logging.getLogger(__name__)


def _model_class(source: ModelSource) -> type:
    import transformers

    # transformers draws a tqdm bar per load on stderr; progress is reported through events.
    transformers.utils.logging.disable_progress_bar()

    cls = getattr(transformers, source.architecture, None)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ValueError(
            f"{source.path / 'config.json'} names architecture {source.architecture!r}, which this transformers "
            f"version ({transformers.__version__}) does not provide; Quantscope never runs remote code"
        )
    return cls


def _config(path: Path) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    # Quantscope rebuilds quantized layers itself; leaving the block in place would make
    # transformers try (and often fail) to apply its own quantizer.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return config


def load_tokenizer(path: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(
            f"{path} has no usable tokenizer ({exc.__class__.__name__}); copy tokenizer.json and "
            "tokenizer_config.json from the source model into it"
        ) from None


def read_quantized_weights(source: ModelSource, linear_names: list[str]) -> dict[str, QuantizedWeight]:
    """Rebuild every quantized linear among `linear_names` from a Quantscope output folder with the
    exporter its `quantization_config` names. Linears stored unquantized are left out."""
    from core.export import detect_exporter

    qc = source.quantization_config
    if qc is None:
        return {}
    exporter = detect_exporter(qc)

    def get(name: str) -> torch.Tensor | None:
        return source.load_tensors([name])[name] if name in source.tensors else None

    out: dict[str, QuantizedWeight] = {}
    for name in linear_names:
        q = exporter.read_weight(name, get, qc)
        if q is not None:
            out[name] = q
    return out


def _linear_names(cls: type, config: Any) -> tuple[list[str], list[str]]:
    """(names of nn.Linear modules, persistent state-dict keys) of the architecture, from a
    skeleton built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"):
        skeleton = cls(config)
    linears = [n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear)]
    return linears, list(skeleton.state_dict().keys())


def _load_quantized(source: ModelSource, dtype: torch.dtype) -> nn.Module:
    cls = _model_class(source)
    config = _config(source.path)
    linears, keys = _linear_names(cls, config)
    quantized = read_quantized_weights(source, linears)
    if not quantized:
        log.warning("%s has a quantization_config but no quantized linear layers", source.path)
    state: dict[str, torch.Tensor] = {}
    for name, q in quantized.items():
        state[f"{name}.weight"] = q.dequantize().reshape(q.shape).to(dtype)
    plain = [k for k in keys if k not in state and k in source.tensors]
    state.update(source.load_tensors(plain))
    missing = [k for k in keys if k not in state]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing:
        raise ValueError(
            f"{source.path} lacks tensors {missing[:3]}{' …' if len(missing) > 3 else ''} that its config needs; "
            "the output is incomplete, quantize again"
        )
    model = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype, trust_remote_code=False)
    del state
    for name, q in quantized.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        bias = linear.bias.detach() if linear.bias is not None else None
        # Reuse the dequantized weight transformers already holds instead of computing it twice.
        setattr(parent, child, QuantLinear(q, bias, compute_dtype=dtype, dequantized=linear.weight.detach()))
    return model


def load_model(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, *, with_tokenizer: bool = True
) -> tuple[nn.Module, Any]:
    """(model in eval mode on CPU, tokenizer or None) for a plain Hugging Face folder, any
    Quantscope output folder, or a Llama .gguf file (dequantized by Quantscope's own reader).
    Raises ValueError with the fix for folders it cannot load."""
    if Path(path).suffix.lower() == ".gguf" and Path(path).is_file():
        return _load_gguf(Path(path), dtype, with_tokenizer)
    source = open_model(path, check_architecture=False)
    source.require_weights()
    if source.quantization_config is None:
        cls = _model_class(source)
        model = cls.from_pretrained(
            source.path, dtype=dtype, use_safetensors=True, local_files_only=True, trust_remote_code=False
        )
    else:
        model = _load_quantized(source, dtype)
    model.eval()
    tokenizer = load_tokenizer(source.path) if with_tokenizer else None
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype, with_tokenizer: bool) -> tuple[nn.Module, Any]:
    """GGUF stores weight-only block formats, so the dequantized weights reproduce its arithmetic."""
    from core.export.gguf import gguf_quantscope_model

    model = gguf_quantscope_model(path).to(dtype).eval()
    tokenizer = None
    if with_tokenizer:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True,
                                                      trust_remote_code=False)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: could not read its tokenizer ({exc}); the GGUF needs tokenizer.ggml.* metadata") from None
    return model, tokenizer


def quantized_layers(model: nn.Module) -> dict[str, str]:
    """{module name: format kind} of the QuantLinear layers in a loaded model."""
    return {n: m.format for n, m in model.named_modules() if isinstance(m, QuantLinear)}
