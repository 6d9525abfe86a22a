"""cross-reuse's within-token model: the ridge fit (one Gram matrix plus per-layer corrections) and its rows,
against plain NumPy that builds every state x(t, l) from the definition (emoe_jax/predict/within_token.py)."""

from __future__ import annotations

import numpy as np
import pytest

from emoe_jax.predict.cross_model import begin_token, crf_vectors, cross_step
from emoe_jax.predict.within_token import fit_within_model, prompt_within_rows, within_row

L, E, K, DECAY, RIDGE = 3, 4, 2, 0.5, 2.0


def _prompts(rng, n):
    prompts = [np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)])
                         for _ in range(int(rng.integers(3, 7)))]) for _ in range(n)]  # [T, L, k] each  # fmt: skip
    return prompts, [rng.random((len(p), L, E)) for p in prompts]  # expected use [T, L, E] each


def _states(p, expected):
    """[T, L, N] x(t, l) = decay * CRF(t-1) + routing of token t at layers < l + expected use at layers >= l;
    [T, N] routing."""
    T, N = len(p), L * E
    used = np.zeros((T, N))
    for t in range(T):
        for l in range(L):
            used[t, l * E + p[t, l]] = 1.0
    crf = crf_vectors(p, E, DECAY)
    out = np.zeros((T, L, N))
    for t in range(T):
        for l in range(L):
            x = DECAY * crf[t - 1] if t > 0 else np.zeros(N)
            x = x.copy()
            x[: l * E] += used[t, : l * E]
            x[l * E:] += expected[t].reshape(-1)[l * E:]
            out[t, l] = x
    return out, used


def test_fit_is_each_layers_ridge_solution():
    prompts, expected = _prompts(np.random.default_rng(0), 5)
    got = fit_within_model(prompts, lambda i: expected[i], E, DECAY, RIDGE)  # [L, N+1, E]
    built = [_states(p, x) for p, x in zip(prompts, expected)]
    for l in range(L):
        x = np.concatenate([np.hstack([s[:, l], np.ones((len(s), 1))]) for s, _ in built])
        y = np.concatenate([u[:, l * E:(l + 1) * E] for _, u in built])
        want = np.linalg.solve(x.T @ x + RIDGE * np.eye(x.shape[1]), x.T @ y)
        np.testing.assert_allclose(got[l], want, atol=1e-10)


def test_prompt_rows_and_step_rows_read_the_state_before_each_step():
    prompts, expected = _prompts(np.random.default_rng(1), 4)
    weights = fit_within_model(prompts, lambda i: expected[i], E, DECAY, RIDGE)
    p, x = prompts[0], expected[0]
    states, _ = _states(p, x)
    want = np.einsum("tln,lne->tle", states, weights[:, : L * E]) + weights[:, L * E][None]  # [T, L, E]
    np.testing.assert_allclose(prompt_within_rows(p, x, weights, DECAY), want.reshape(-1, E), atol=1e-12)
    # the step path: the cross model's running state, read before each step routes
    crf, state, scratch = np.zeros(L * E), np.zeros(L * E), np.zeros(E)
    for t in range(len(p)):
        begin_token(crf, state, x[t].reshape(-1), DECAY)
        for l in range(L):
            np.testing.assert_allclose(within_row(state, l, weights), want[t, l], atol=1e-12)
            cross_step(crf, state, l, p[t, l].astype(np.int64), np.zeros((L * E + 1, L * E)), scratch)


def test_within_model_learns_a_layer_to_layer_rule():
    """Layer 1 routes expert (e + 1) mod E when layer 0 routed e: the row of layer 1 ranks that expert first."""
    rng = np.random.default_rng(2)
    prompts = []
    for _ in range(20):
        first = rng.integers(0, E, size=8)
        prompts.append(np.stack([[[a], [(a + 1) % E], [rng.integers(0, E)]] for a in first]))  # [T, L=3, k=1]
    expected = [np.full((len(p), L, E), 1.0 / E) for p in prompts]
    weights = fit_within_model(prompts, lambda i: expected[i], E, DECAY, 1e-3)
    rows = prompt_within_rows(prompts[0], expected[0], weights, DECAY).reshape(-1, L, E)
    np.testing.assert_array_equal(rows[:, 1].argmax(1), (prompts[0][:, 0, 0] + 1) % E)


def test_within_model_needs_a_prompt():
    with pytest.raises(ValueError, match="at least one training prompt"):
        fit_within_model([], lambda i: None, E)
