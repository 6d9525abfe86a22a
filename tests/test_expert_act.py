"""gpt-oss's experts (clamped SwiGLU, biases as an extra weight row) in every mixing kernel."""

import jax.numpy as jnp
import numpy as np
import pytest

from emoe_jax.model.moe import ExpertAct, ExpertSlots, Routing, mix_experts

ACT = ExpertAct("clamped_swiglu", alpha=1.702, limit=7.0, bias=True)


def _setup(n_tokens, num_experts=6, k=3, h=16, i=8, seed=0):
    rng = np.random.default_rng(seed)
    # Large weights so that the clamp at +-7 acts on a good share of the units.
    w = {"gate": rng.normal(size=(num_experts, h, i)) * 2, "up": rng.normal(size=(num_experts, h, i)) * 2,
         "down": rng.normal(size=(num_experts, i, h)) * 0.3, "gate_b": rng.normal(size=(num_experts, i)),
         "up_b": rng.normal(size=(num_experts, i)), "down_b": rng.normal(size=(num_experts, h))}
    x = rng.normal(size=(n_tokens, h))
    ids = np.stack([rng.choice(num_experts, size=k, replace=False) for _ in range(n_tokens)]).astype(np.int32)
    weights = rng.random((n_tokens, k))
    return w, x, ids, weights


def _gpt_oss_reference(w, x, ids, weights, limit=7.0, alpha=1.702):
    """transformers' GptOssExperts arithmetic, per token and choice, in float64."""
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for j, e in enumerate(ids[n]):
            gate = np.minimum(x[n] @ w["gate"][e] + w["gate_b"][e], limit)
            up = np.clip(x[n] @ w["up"][e] + w["up_b"][e], -limit, limit)
            h = (up + 1) * gate / (1 + np.exp(-gate * alpha))
            out[n] += weights[n, j] * (h @ w["down"][e] + w["down_b"][e])
    return out


def _slots(w):
    rows = lambda m, b: np.concatenate([m, b[:, None, :]], axis=1)  # noqa: E731  bias as the last row
    return ExpertSlots(*(jnp.asarray(a, jnp.float32) for a in (rows(w["gate"], w["gate_b"]),
                                                               rows(w["up"], w["up_b"]),
                                                               rows(w["down"], w["down_b"]))))


@pytest.mark.parametrize("n_tokens", [3, 40])  # decode-sized and prefill-sized
def test_every_kernel_matches_gpt_oss_formula(n_tokens):
    w, x, ids, weights = _setup(n_tokens)
    ref = _gpt_oss_reference(w, x, ids, weights)
    gate = np.einsum("nh,nkhi->nki", x, w["gate"][ids]) + w["gate_b"][ids]
    assert (gate > 7).mean() > 0.05  # the clamp is exercised
    experts, identity = _slots(w), jnp.arange(6, dtype=jnp.int32)
    routing = Routing(jnp.asarray(ids), jnp.asarray(weights, jnp.float32))
    for method in ("reference", "gather", "sorted", "blocked"):
        out = mix_experts(jnp.asarray(x, jnp.float32), routing, experts, identity, method, act=ACT)
        np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-4, atol=2e-4, err_msg=method)
    plain = mix_experts(jnp.asarray(x, jnp.float32), routing, experts._replace(
        gate=experts.gate[:, :-1], up=experts.up[:, :-1], down=experts.down[:, :-1]), identity, "reference")
    assert np.abs(np.asarray(plain) - ref).max() > 1e-2  # plain SwiGLU without biases is a different function
