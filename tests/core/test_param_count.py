from __future__ import annotations

import pytest
import torch

from core import catalog
from core.param_count import count_parameters, from_config, layer_types

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=100)

FAMILIES = {
    "llama": {},
    "qwen2": {"tie_word_embeddings": False},
    "qwen3": {"head_dim": 32, "tie_word_embeddings": True},
    "mistral": {"sliding_window": 16},
    "gemma2": {"head_dim": 32, "sliding_window": 16},
    "gemma3_text": {"head_dim": 32, "sliding_window": 16, "num_hidden_layers": 6},
    "phi3": {"pad_token_id": 0},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"moe_intermediate_size": 32, "num_hidden_layers": 3, "head_dim": 16, "num_experts": 8,
                  "num_experts_per_tok": 2, "mlp_only_layers": [1]},
    "qwen2_moe": {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 48, "num_experts": 8,
                  "num_experts_per_tok": 2},
    "deepseek_v3": {"moe_intermediate_size": 32, "num_hidden_layers": 3, "num_key_value_heads": 4,
                    "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
                    "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
                    "v_head_dim": 8, "n_group": 1, "topk_group": 1},
}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_config_parameter_count_equals_transformers_state_dict(model_type: str) -> None:
    import transformers

    conf = transformers.AutoConfig.for_model(model_type, **{**TINY, **FAMILIES[model_type]})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(conf)
    expected = sum(t.numel() for t in model.state_dict().values())
    if conf.to_dict().get("tie_word_embeddings"):
        expected -= conf.vocab_size * conf.hidden_size  # state_dict lists the shared matrix twice
    assert count_parameters(conf.to_dict())["total"] == expected


def test_llama2_7b_has_6_74_billion_parameters() -> None:
    counts = count_parameters(catalog.get_model("llama-2-7b").config)
    assert counts["total"] == 6_738_415_616
    assert counts["active"] == counts["total"]


def test_deepseek_r1_is_671b_total_and_37b_active() -> None:
    counts = count_parameters(catalog.get_model("deepseek-r1").config)
    assert 670e9 < counts["total"] < 672e9
    assert 36.5e9 < counts["active"] < 38e9


def test_moe_active_parameters_follow_top_k() -> None:
    mixtral = count_parameters(catalog.get_model("mixtral-8x7b").config)
    assert 46.6e9 < mixtral["total"] < 46.8e9
    assert 12.8e9 < mixtral["active"] < 13.0e9
    qwen = count_parameters(catalog.get_model("qwen3-235b-a22b").config)
    assert 234.5e9 < qwen["total"] < 235.5e9 and 21.5e9 < qwen["active"] < 22.5e9


def test_tied_embeddings_store_the_matrix_once() -> None:
    base = {**TINY, "model_type": "llama"}
    untied = count_parameters({**base, "tie_word_embeddings": False})["total"]
    tied = count_parameters({**base, "tie_word_embeddings": True})["total"]
    assert untied - tied == 100 * 64


def test_gqa_shrinks_k_and_v_projections() -> None:
    mha = count_parameters({**TINY, "model_type": "llama", "num_key_value_heads": 4})["total"]
    gqa = count_parameters({**TINY, "model_type": "llama", "num_key_value_heads": 1})["total"]
    assert mha - gqa == 2 * 2 * 64 * (64 - 16)  # 2 layers × (k, v) × hidden × dropped kv columns


def test_sliding_window_layer_patterns_per_family() -> None:
    gemma3 = catalog.get_model("gemma-3-27b").config
    kinds, window = layer_types(gemma3)
    assert window == 1024 and kinds.count("full") == 62 // 6 and kinds[5] == "full" and kinds[0] == "sliding"
    kinds, window = layer_types(catalog.get_model("gemma-2-9b").config)
    assert kinds[:4] == ["sliding", "full", "sliding", "full"] and window == 4096
    kinds, window = layer_types(catalog.get_model("mistral-7b-v0.1").config)
    assert set(kinds) == {"sliding"} and window == 4096
    kinds, window = layer_types(catalog.get_model("qwen3-8b").config)
    assert set(kinds) == {"full"} and window is None


def test_mla_geometry_is_read_from_config() -> None:
    spec = from_config(catalog.get_model("deepseek-v3").config)
    assert spec.mla is not None and spec.mla.kv_lora_rank == 512 and spec.mla.qk_rope_head_dim == 64
    assert spec.n_routed_experts == 256 and spec.experts_per_tok == 8


def test_config_missing_fields_names_them() -> None:
    with pytest.raises(ValueError, match="hidden_size.*vocab_size"):
        count_parameters({"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 4,
                          "intermediate_size": 8})
