"""Teacher forcing: decode steps fed given tokens give the full model's logits on that prefix."""

import numpy as np
import pytest

from emoe_jax.config import tiny_config
from emoe_jax.model.random_init import random_model
from emoe_jax.model.resident import ResidentModel
from emoe_jax.runtime.engine import GenerationError, OffloadedEngine
from emoe_jax.runtime.tiers import InMemoryExperts


def test_teacher_forced_logits_follow_the_given_tokens():
    cfg = tiny_config("qwen3_moe", num_layers=2)
    g, p, ex = random_model(cfg, seed=1, router_scale=5.0)
    resident = ResidentModel(cfg, g, p, ex)
    prompt, teacher, new = [5, 9, 13, 22], [7, 100, 3, 44, 61], 6
    engine = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=2)
    out = engine.generate([prompt], new, teacher_tokens=[teacher], return_logits=True)
    full_logits, _, _ = resident.logits([prompt + teacher])
    np.testing.assert_allclose(out.logits[0], np.asarray(full_logits[0, len(prompt) - 1:]), atol=2e-5, rtol=1e-5)
    # The picks are the model's own argmax at each forced prefix.
    assert out.tokens[0] == np.argmax(out.logits[0], -1).tolist()
    # Forcing the model's own greedy output reproduces the free run.
    free = engine.generate([prompt], new, stop_at_eos=False, return_logits=True)
    again = engine.generate([prompt], new, teacher_tokens=[free.tokens[0][:-1]], return_logits=True)
    assert again.tokens == free.tokens
    with pytest.raises(GenerationError, match="teacher_tokens"):
        engine.generate([prompt], new, teacher_tokens=[[1, 2]])


def test_bfloat16_waves_round_like_one_pass():
    """Waves keep float32 partial sums, so in bf16 a small cache gives the all-resident logits
    (here bit for bit) and the same greedy tokens, not just close ones."""
    import jax.numpy as jnp

    cfg = tiny_config("mixtral", num_layers=2)
    g, p, ex = random_model(cfg, seed=4, dtype=jnp.bfloat16, router_scale=5.0)
    prompts = [[5, 9, 13, 22, 7, 40, 41, 42, 43, 44, 45, 3], [3, 17, 8, 99, 100, 101]]
    full = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=cfg.num_experts, dtype=jnp.bfloat16)
    ref = full.generate(prompts, 8, stop_at_eos=False, return_logits=True)
    small = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=2, dtype=jnp.bfloat16)
    out = small.generate(prompts, 8, stop_at_eos=False, return_logits=True)
    assert out.stats["waves"] > 0
    assert out.tokens == ref.tokens
    np.testing.assert_array_equal(out.logits, ref.logits)
