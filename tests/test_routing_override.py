"""Routing overrides (forced-routing replay, sensitivity profiling) replace the router's choice."""

import numpy as np
import pytest

from emoe_jax.config import tiny_config
from emoe_jax.model.random_init import random_model
from emoe_jax.runtime.engine import OffloadedEngine
from emoe_jax.runtime.tiers import InMemoryExperts


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config("mixtral", num_layers=2)
    g, p, ex = random_model(cfg, seed=0, router_scale=5.0)
    return cfg, g, p, ex


def test_identity_override_changes_nothing(tiny):
    cfg, g, p, ex = tiny
    prompts = [[5, 9, 13, 22, 7], [3, 17, 8]]
    plain = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=2)
    ref = plain.generate(prompts, 5, stop_at_eos=False, return_logits=True)
    engine = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=2)
    engine.routing_override = lambda step: (step.ids, step.weights)
    out = engine.generate(prompts, 5, stop_at_eos=False, return_logits=True)
    assert out.tokens == ref.tokens
    np.testing.assert_allclose(out.logits, ref.logits, atol=1e-6)


def test_forced_routing_is_what_runs_and_positions_are_prompt_indices(tiny):
    cfg, g, p, ex = tiny
    k = cfg.top_k
    seen = []

    def force(step):
        # Expert (position + layer) mod E for every choice, equal weights: a routing the router would not pick.
        pos = np.maximum(step.positions, 0)[..., None]  # [B, T, 1]
        ids = (pos + step.moe_layer + np.arange(k)) % cfg.num_experts
        return ids.astype(np.int32), np.full(ids.shape, 1.0 / k, np.float32)

    engine = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=cfg.num_experts)
    engine.routing_override = force
    engine.routing_hooks.append(lambda s: seen.append(s))
    prompts = [[5, 9, 13, 22], [3, 17]]
    engine.generate(prompts, 3, stop_at_eos=False)
    first = seen[0]  # prefill, layer 0
    # Prompts are left-padded to a bucket of 8 tokens.
    assert first.positions.tolist() == [[-1] * 4 + [0, 1, 2, 3], [-1] * 6 + [0, 1]]
    np.testing.assert_array_equal(first.ids[0, 4:, 0], [0, 1, 2, 3])
    decode = seen[cfg.num_moe_layers]  # first decode step, layer 0
    assert decode.positions[:, 0].tolist() == [4, 2]
    np.testing.assert_array_equal(decode.ids[:, 0, 0], [4, 2])
    # The forced routing changed the outputs: the model really ran it.
    plain = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=cfg.num_experts)
    forced_logits = engine.generate(prompts, 2, stop_at_eos=False, return_logits=True).logits
    plain_logits = plain.generate(prompts, 2, stop_at_eos=False, return_logits=True).logits
    assert not np.allclose(forced_logits, plain_logits, atol=1e-3)


def test_bad_override_is_a_clear_error(tiny):
    cfg, g, p, ex = tiny
    engine = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=2)
    engine.routing_override = lambda step: (step.ids[..., :1], step.weights[..., :1])
    with pytest.raises(ValueError, match="expected"):
        engine.generate([[1, 2, 3]], 2)
    engine.routing_override = lambda step: (step.ids + cfg.num_experts, step.weights)
    with pytest.raises(ValueError, match="outside"):
        engine.generate([[1, 2, 3]], 2)
