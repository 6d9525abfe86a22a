"""Rope settings are read as transformers reads them (issue 13, item 2), and what we do not
implement is refused by name.

Each case builds the transformers config from the same config.json dict and compares its rotary
embedding (inverse frequencies and cos/sin scale) with ours."""

import math

import numpy as np
import pytest

from emoe_jax.config import ConfigError, from_hf_config
from emoe_jax.model.layers import rope_cos_sin

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

MIXTRAL = {"model_type": "mixtral", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 16,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 8192, "head_dim": 8}
QWEN3 = {"model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 16,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
         "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
         "max_position_embeddings": 8192}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}

CASES = {
    # rope_scaling replaces rope_parameters in transformers (today's reader let rope_parameters win)
    "rope_scaling_over_rope_parameters": {
        **MIXTRAL, "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0},
        "rope_scaling": {**YARN, "rope_theta": 20000.0}},
    # an explicit YaRN attention_factor (today's reader dropped it)
    "attention_factor": {**QWEN3, "rope_parameters": {**YARN, "rope_theta": 1e6, "attention_factor": 0.8}},
    # gpt-oss's truncate=False: the correction range keeps its fractions
    "truncate_false": {**QWEN3, "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "rope_theta": 150000.0,
                                                    "original_max_position_embeddings": 4096,
                                                    "truncate": False}},
    # mscale_all_dim without mscale: transformers ignores it for the cos/sin scale
    "mscale_all_dim_alone": {**QWEN3, "rope_scaling": {"type": "yarn", "factor": 40.0, "mscale_all_dim": 0.707,
                                                       "original_max_position_embeddings": 4096},
                             "rope_theta": 10000.0},
    # no theta anywhere: the family's default (Mixtral's is 1e6, not 1e4)
    "family_default_theta": dict(MIXTRAL),
    # old spelling `type` and beta_fast/beta_slow set
    "old_type_key_and_betas": {**MIXTRAL, "rope_theta": 1e6,
                               "rope_scaling": {**YARN, "type": "yarn", "beta_fast": 16.0, "beta_slow": 2.0}},
}


def _hf_rope(hf: dict):
    family = hf["model_type"]
    cfg_cls = {"mixtral": tf.MixtralConfig, "qwen3_moe": tf.Qwen3MoeConfig}[family]
    emb_cls = {"mixtral": tf.models.mixtral.modeling_mixtral.MixtralRotaryEmbedding,
               "qwen3_moe": tf.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeRotaryEmbedding}[family]
    kw = {k: v for k, v in hf.items() if k != "model_type"}
    emb = emb_cls(cfg_cls(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in kw.items()}))
    return emb


@pytest.mark.parametrize("case", sorted(CASES))
def test_rope_matches_transformers(case):
    hf = CASES[case]
    cfg = from_hf_config(hf)
    emb = _hf_rope(hf)
    positions = np.arange(0, 4096, 37, dtype=np.int32)[None]  # [1, T]
    cos, sin = rope_cos_sin(cfg.rope, cfg.head_dim, positions)
    x = torch.zeros(1, 1, cfg.head_dim)
    ref_cos, ref_sin = emb(x, torch.tensor(positions, dtype=torch.long))
    half = cfg.head_dim // 2  # transformers repeats the frequencies over both halves (Llama style)
    np.testing.assert_allclose(np.asarray(cos), ref_cos[..., :half].numpy(), rtol=1e-5, atol=1e-5, err_msg=case)
    np.testing.assert_allclose(np.asarray(sin), ref_sin[..., :half].numpy(), rtol=1e-5, atol=1e-5, err_msg=case)


def test_yarn_attention_factor_and_truncate_are_kept():
    cfg = from_hf_config(CASES["attention_factor"])
    assert cfg.rope.kind == "yarn" and cfg.rope.attention_factor == 0.8
    assert from_hf_config(CASES["truncate_false"]).rope.truncate is False
    rope = from_hf_config(CASES["rope_scaling_over_rope_parameters"]).rope
    assert rope.kind == "yarn" and rope.theta == 20000.0 and rope.factor == 4.0  # all from rope_scaling
    assert from_hf_config(CASES["family_default_theta"]).rope.theta == 1e6
    assert math.isclose(from_hf_config(CASES["mscale_all_dim_alone"]).rope.mscale, 0.0)


@pytest.mark.parametrize("rope,named", [
    ({**YARN, "low_freq_factor": 1.0}, "low_freq_factor"),  # a llama3 key under yarn
    ({**YARN, "some_future_key": 3}, "some_future_key"),
    ({"rope_type": "default", "factor": 2.0}, "factor"),  # default rope reads no factor
    ({"rope_type": "llama3", "factor": 8.0}, "llama3"),
    ({"rope_type": "linear", "factor": 2.0}, "linear"),
    ({"rope_type": "dynamic", "factor": 2.0}, "dynamic"),
    ({"rope_type": "default", "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "default"}}, "full_attention"),
    ({"rope_type": "yarn"}, "factor"),
])
@pytest.mark.parametrize("where", ["rope_parameters", "rope_scaling"])
def test_unimplemented_rope_is_refused_by_name(rope, named, where):
    with pytest.raises(ConfigError, match=named):
        from_hf_config({**QWEN3, where: rope})
