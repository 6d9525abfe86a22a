"""DeepSeek-V3 / R1 / Kimi-K2, GLM-4.5 and Qwen3-Coder configs: the real config.json files map onto
the presets, no-op fields are accepted, and what would change the model is refused by name."""

import pytest

from emoe_jax.config import ConfigError, from_hf_config, get_preset, tiny_config

QUANT_FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}

DEEPSEEK_V3 = {  # deepseek-ai/DeepSeek-V3 (and R1) config.json, auto_map left out
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "quantization_config": QUANT_FP8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}

KIMI_K2 = {  # moonshotai/Kimi-K2-Instruct: DeepSeek-V3 architecture under model_type kimi_k2
    **DEEPSEEK_V3, "model_type": "kimi_k2", "vocab_size": 163840, "num_attention_heads": 64,
    "num_key_value_heads": 64, "n_routed_experts": 384, "n_group": 1, "topk_group": 1,
    "first_k_dense_replace": 1, "routed_scaling_factor": 2.827, "rope_theta": 50000.0,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "max_position_embeddings": 131072, "bos_token_id": 163584, "eos_token_id": 163585,
}

GLM_45 = {  # zai-org/GLM-4.5 config.json
    "architectures": ["Glm4MoeForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 5120, "partial_rotary_factor": 0.5, "initializer_range": 0.02, "intermediate_size": 12288,
    "max_position_embeddings": 131072, "model_type": "glm4_moe", "moe_intermediate_size": 1536,
    "norm_topk_prob": True, "num_attention_heads": 96, "n_group": 1, "topk_group": 1, "n_routed_experts": 160,
    "n_shared_experts": 1, "routed_scaling_factor": 2.5, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
    "num_hidden_layers": 92, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000,
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.54.0", "use_cache": True, "use_qk_norm": True, "vocab_size": 151552,
}

GLM_45_AIR = {**GLM_45, "hidden_size": 4096, "intermediate_size": 10944, "moe_intermediate_size": 1408,
              "n_routed_experts": 128, "routed_scaling_factor": 1.0, "first_k_dense_replace": 1,
              "num_hidden_layers": 46, "use_qk_norm": False}

QWEN3_CODER_480B = {  # Qwen/Qwen3-Coder-480B-A35B-Instruct config.json
    "architectures": ["Qwen3MoeForCausalLM"], "attention_dropout": 0.0, "decoder_sparse_step": 1,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 6144,
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 262144,
    "max_window_layers": 62, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 2560,
    "norm_topk_prob": True, "num_attention_heads": 96, "num_experts": 160, "num_experts_per_tok": 8,
    "num_hidden_layers": 62, "num_key_value_heads": 8, "output_router_logits": False, "qkv_bias": False,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000000, "router_aux_loss_coef": 0.0,
    "shared_expert_intermediate_size": 0, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True, "use_qk_norm": True,
    "use_sliding_window": False, "vocab_size": 151936,
}


@pytest.mark.parametrize("hf, preset", [(DEEPSEEK_V3, "deepseek-v3"), (KIMI_K2, "kimi-k2"),
                                        (GLM_45, "glm-4.5"), (GLM_45_AIR, "glm-4.5-air")])
def test_real_configs_map_to_presets(hf, preset):
    assert from_hf_config(hf) == get_preset(preset)


def test_flagship_shapes():
    v3 = get_preset("deepseek-v3")
    assert (v3.num_moe_layers, v3.num_experts, v3.top_k, v3.n_group, v3.topk_group) == (58, 256, 8, 8, 4)
    assert v3.expert_params * 2 == 88_080_384  # bf16 bytes of one routed expert
    glm = get_preset("glm-4.5")
    assert (glm.num_moe_layers, glm.num_experts, glm.rotary_dim) == (89, 160, 64)


def test_transformers_5_rope_parameters_spelling():
    # transformers 5 writes partial_rotary_factor into rope_parameters; GLM's default is 0.5.
    moved = {k: v for k, v in GLM_45.items() if k not in ("partial_rotary_factor", "rope_theta")}
    moved["rope_parameters"] = {"rope_theta": 1000000, "rope_type": "default", "partial_rotary_factor": 0.5}
    assert from_hf_config(moved) == get_preset("glm-4.5")
    absent = {k: v for k, v in GLM_45.items() if k != "partial_rotary_factor"}
    assert from_hf_config(absent).partial_rotary_factor == 0.5


def test_v3_defaults_are_transformers_defaults():
    # Fields a config leaves out take DeepseekV3Config's defaults, not the generic fallbacks.
    minimal = {k: DEEPSEEK_V3[k] for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                                           "num_hidden_layers", "num_attention_heads", "num_experts_per_tok",
                                           "moe_intermediate_size", "n_routed_experts", "kv_lora_rank",
                                           "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")}
    cfg = from_hf_config(minimal)
    assert (cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor, cfg.dense_layers, cfg.q_lora_rank,
            cfg.norm_topk_prob, cfg.rope.interleaved) == (8, 4, 2.5, (0, 1, 2), 1536, True, True)


@pytest.mark.parametrize("field, value", [("topk_method", "greedy"), ("scoring_func", "softmax"),
                                          ("moe_layer_freq", 2), ("hidden_act", "gelu"), ("new_field", 1)])
def test_v3_changes_we_do_not_implement_are_named(field, value):
    with pytest.raises(ConfigError, match=field):
        from_hf_config({**DEEPSEEK_V3, field: value})


def test_glm_unknown_field_is_named():
    with pytest.raises(ConfigError, match="use_sliding_window"):
        from_hf_config({**GLM_45, "use_sliding_window": True})


def test_qwen3_coder_no_op_fields_accepted():
    cfg = from_hf_config(QWEN3_CODER_480B)
    assert (cfg.qkv_bias, cfg.shared_expert_intermediate_size, cfg.qk_norm) == (False, 0, "head")
    assert (cfg.num_experts, cfg.num_moe_layers, cfg.top_k) == (160, 62, 8)


@pytest.mark.parametrize("field, value", [("qkv_bias", True), ("shared_expert_intermediate_size", 2560),
                                          ("use_qk_norm", False)])
def test_qwen3_fields_that_would_change_the_model_are_refused(field, value):
    with pytest.raises(ConfigError, match=f"{field}={value!r}"):
        from_hf_config({**QWEN3_CODER_480B, field: value})


@pytest.mark.parametrize("overrides, match", [
    (dict(n_group=3), "n_group=3 must divide"),
    (dict(topk_group=5), "topk_group=5"),
    (dict(n_group=4, topk_group=1, top_k=3), "exceeds the experts"),
    (dict(n_group=8, topk_group=1), "groups of 1 are too small"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(topk_method="greedy"), "n_group > 1 needs"),
    (dict(partial_rotary_factor=0.3), "partial_rotary_factor"),
])
def test_router_and_rotary_fields_are_validated(overrides, match):
    family = "glm4_moe" if "partial_rotary_factor" in overrides else "deepseek_v3"
    with pytest.raises(ConfigError, match=match):
        tiny_config(family, **overrides)
