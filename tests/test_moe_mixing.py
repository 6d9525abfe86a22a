"""Every expert-mixing fast path equals the plain reference, for random routings and slot maps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from emoe_jax.config import tiny_config
from emoe_jax.model.moe import ExpertSlots, Routing, mix_experts, route


def _setup(seed, n_tokens, num_slots, num_experts=8, k=2, h=16, i=8):
    rng = np.random.default_rng(seed)
    experts = ExpertSlots(*(jnp.asarray(rng.normal(size=s), jnp.float32)
                            for s in ((num_slots, h, i), (num_slots, h, i), (num_slots, i, h))))
    x = jnp.asarray(rng.normal(size=(n_tokens, h)), jnp.float32)
    # Random resident set of num_slots experts in random slots.
    resident = rng.choice(num_experts, size=num_slots, replace=False)
    slot_of_expert = np.full(num_experts, -1, np.int32)
    slot_of_expert[resident] = rng.permutation(num_slots)
    ids = np.stack([rng.choice(resident, size=k, replace=False) for _ in range(n_tokens)]).astype(np.int32)
    weights = rng.random((n_tokens, k)).astype(np.float32)
    return x, Routing(jnp.asarray(ids), jnp.asarray(weights)), experts, jnp.asarray(slot_of_expert)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), n_tokens=st.integers(1, 40), num_slots=st.integers(2, 8))
def test_fast_paths_match_reference(seed, n_tokens, num_slots):
    x, routing, experts, slot_of_expert = _setup(seed, n_tokens, num_slots)
    ref = mix_experts(x, routing, experts, slot_of_expert, "reference")
    for method in ("gather", "sorted", "blocked", "auto"):
        out = mix_experts(x, routing, experts, slot_of_expert, method)
        # float32 sums in another order: outputs of a few units differ by up to ~3e-5 (seed 497, 29 tokens,
        # 3 slots: 2.3e-5 for "sorted"); a wrong pair or weight is off by O(1).
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4, err_msg=method)


def test_non_resident_pairs_contribute_nothing():
    x, routing, experts, slot_of_expert = _setup(0, 5, 4)
    # Point one expert at "not resident": its pairs must vanish, not wrap to slot -1.
    victim = int(routing.ids[0, 0])
    masked = slot_of_expert.at[victim].set(-1)
    keep = routing.ids != victim
    ref = mix_experts(x, Routing(routing.ids, jnp.where(keep, routing.weights, 0.0)), experts,
                      slot_of_expert, "reference")
    for method in ("reference", "gather", "sorted", "blocked"):
        out = mix_experts(x, routing, experts, masked, method)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_unknown_method_is_clear_error():
    x, routing, experts, slot_of_expert = _setup(0, 2, 4)
    with pytest.raises(ValueError, match="unknown expert mixing method"):
        mix_experts(x, routing, experts, slot_of_expert, "magic")


def test_route_restricted_picks_only_resident_and_renormalises():
    cfg = tiny_config("mixtral")  # norm_topk_prob=True
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(6, cfg.num_experts)), jnp.float32)
    resident = jnp.zeros(cfg.num_experts, bool).at[jnp.array([1, 4, 6])].set(True)
    r = route(logits, cfg, resident)
    assert set(np.asarray(r.ids).ravel()) <= {1, 4, 6}
    np.testing.assert_allclose(np.asarray(r.weights.sum(-1)), 1.0, rtol=1e-6)
    # Unrestricted: equals softmax top-k computed by hand.
    r = route(logits, cfg)
    probs = np.asarray(jax.nn.softmax(logits, -1))
    top = np.argsort(-probs, -1)[:, : cfg.top_k]
    assert (np.asarray(r.ids) == top).all()
