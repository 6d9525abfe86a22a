"""The HF config reader maps every family and refuses what it cannot run faithfully."""

import json

import pytest

from emoe_jax.config import PRESETS, ConfigError, MoEConfig, from_hf_config, get_preset, tiny_config

MIXTRAL = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None,
    "max_position_embeddings": 32768, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "router_aux_loss_coef": 0.02,
}

DEEPSEEK_V2_LITE = {  # the real DeepSeek-V2-Lite config.json (remote-code era field names)
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "aux_loss_alpha": 0.001,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "moe_intermediate_size": 1408, "moe_layer_freq": 1,
    "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
    "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                     "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 102400, "ep_size": 1,
}


def test_mixtral_maps_to_preset():
    assert from_hf_config(MIXTRAL) == get_preset("mixtral-8x7b")


def test_deepseek_v2_lite_maps_to_preset():
    assert from_hf_config(DEEPSEEK_V2_LITE) == get_preset("deepseek-v2-lite")


def test_rope_parameters_and_rope_theta_are_equivalent():
    new = {k: v for k, v in MIXTRAL.items() if k != "rope_theta"}
    new["rope_parameters"] = {"rope_theta": 1e6, "rope_type": "default"}
    assert from_hf_config(new) == from_hf_config(MIXTRAL)


def test_num_experts_spellings():
    qwen = {"model_type": "qwen3_moe", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "num_experts_per_tok": 2, "moe_intermediate_size": 16, "rope_theta": 1e6}
    a = from_hf_config({**qwen, "num_experts": 8})
    b = from_hf_config({**qwen, "num_local_experts": 8})
    assert a == b and a.num_experts == 8 and a.qk_norm == "head"


@pytest.mark.parametrize("field,value", [("quantization_config", {"quant_method": "awq"}), ("hidden_act", "gelu"),
                                         ("some_new_feature", True)])
def test_unsupported_fields_are_named(field, value):
    with pytest.raises(ConfigError, match=field):
        from_hf_config({**MIXTRAL, field: value})


def test_deepseek_group_routing_refused():
    with pytest.raises(ConfigError, match="topk_method"):
        from_hf_config({**DEEPSEEK_V2_LITE, "topk_method": "group_limited_greedy"})


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="llama"):
        from_hf_config(tmp_path)
    with pytest.raises(ConfigError, match="no config.json"):
        from_hf_config(tmp_path / "nope")


def test_qwen2_dense_layers_from_sparse_step():
    cfg = from_hf_config({"model_type": "qwen2_moe", "vocab_size": 100, "hidden_size": 32,
                          "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
                          "num_experts_per_tok": 2, "moe_intermediate_size": 16, "num_experts": 4,
                          "decoder_sparse_step": 2, "mlp_only_layers": [3],
                          "shared_expert_intermediate_size": 32})
    assert cfg.dense_layers == (0, 2, 3) and cfg.moe_layers == (1,)


def test_round_trip_dict_and_presets():
    for name, cfg in PRESETS.items():
        assert MoEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg, name
    cfg = tiny_config("deepseek_v2")
    assert cfg.moe_layers == (1, 2) and cfg.expert_params == 3 * 32 * 16


def test_invalid_values():
    with pytest.raises(ConfigError, match="top_k"):
        tiny_config("mixtral", top_k=9)
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("gpt-5")
