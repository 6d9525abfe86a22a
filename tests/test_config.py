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


def test_deepseek_v2_group_routing():
    # DeepSeek-V2 (236B) / V2-Chat route group-limited (parity: tests/test_parity.py); noaux_tc is V3's.
    cfg = from_hf_config({**DEEPSEEK_V2_LITE, "topk_method": "group_limited_greedy", "n_group": 8,
                          "topk_group": 2})
    assert (cfg.topk_method, cfg.n_group, cfg.topk_group, cfg.scoring_func) == ("group_limited_greedy", 8, 2,
                                                                                 "softmax")
    with pytest.raises(ConfigError, match="topk_method"):
        from_hf_config({**DEEPSEEK_V2_LITE, "topk_method": "noaux_tc"})


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


GPT_OSS_20B = {  # the fields of openai/gpt-oss-20b's config.json
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True,
    "attention_dropout": 0.0, "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64,
    "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
    "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072, "num_attention_heads": 64, "num_experts_per_tok": 4,
    "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
}


def test_gpt_oss_20b_maps_to_preset():
    cfg = from_hf_config(GPT_OSS_20B)
    assert cfg == get_preset("gpt-oss-20b")
    assert cfg.window_of(0) == 128 and cfg.window_of(1) is None and cfg.window_of(22) == 128
    assert cfg.expert_params == 3 * 2880 * 2880 + 2 * 2880 + 2880
    big = {**GPT_OSS_20B, "num_hidden_layers": 36, "num_local_experts": 128,
           "layer_types": ["sliding_attention", "full_attention"] * 18}
    assert from_hf_config(big) == get_preset("gpt-oss-120b")


@pytest.mark.parametrize("change,named", [
    ({"layer_types": ["sliding_attention", "chunked_attention"] * 12}, "layer_types"),
    ({"layer_types": ["full_attention"] * 3}, "layer_types"),
    ({"sliding_window": None}, "sliding_window"),
    ({"experts_per_token": 2}, "experts_per_token"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"quantization_config": {"quant_method": "fp8"}}, "fp8"),
])
def test_gpt_oss_refuses_what_it_cannot_run(change, named):
    with pytest.raises(ConfigError, match=named):
        from_hf_config({**GPT_OSS_20B, **change})


def test_sliding_window_mixtral_accepted_qwen_refused():
    cfg = from_hf_config({**MIXTRAL, "sliding_window": 4096})
    assert cfg.sliding_window == 4096 and cfg.sliding_window_layers == tuple(range(32))
    assert from_hf_config(MIXTRAL).sliding_window_layers == ()
    qwen = {"model_type": "qwen3_moe", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "num_experts_per_tok": 2, "moe_intermediate_size": 16, "num_experts": 8}
    assert from_hf_config({**qwen, "sliding_window": 4096, "use_sliding_window": False}).sliding_window is None
    with pytest.raises(ConfigError, match="use_sliding_window"):
        from_hf_config({**qwen, "sliding_window": 4096, "use_sliding_window": True})
