"""cross-reuse's cross-expert model: the ridge fit and the causal rows, against plain NumPy written from the
definitions (docs/simulator.md, "Cross-expert reuse")."""

from __future__ import annotations

import numpy as np
import pytest

from emoe_jax.predict import get_predictor
from emoe_jax.predict.causal_reuse import expected_use, last_run_features, predict_features
from emoe_jax.predict.causal_table import CausalTables
from emoe_jax.predict.cross_model import crf_vectors, fit_cross_model, prompt_cross_rows
from emoe_jax.predict.reuse_model import NUM_FEATURES


def _random_prompts(rng, n, L, E, k):
    return [np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(L)])
                      for _ in range(int(rng.integers(3, 7)))]) for _ in range(n)]  # [T, L, k] each


def test_crf_vectors_by_hand():
    experts = np.array([[[0], [1]], [[0], [0]]])  # T=2, L=2, E=2, k=1
    np.testing.assert_allclose(crf_vectors(experts, 2, 0.5), [[1, 0, 0, 1], [1.5, 0, 1, 0.5]])


def test_fit_is_the_ridge_solution_over_all_tokens():
    rng = np.random.default_rng(0)
    L, E, k, H, decay, ridge = 2, 4, 2, 2, 0.6, 3.0
    prompts = _random_prompts(rng, 3, L, E, k)
    x = np.concatenate([np.hstack([crf_vectors(p, E, decay), np.ones((len(p), 1))]) for p in prompts])
    y = []
    for p in prompts:  # "routed within the next H tokens of the same prompt", written out
        used = np.zeros((len(p) + H, L * E))
        for t in range(len(p)):
            used[t, (p[t] + (np.arange(L) * E)[:, None]).reshape(-1)] = 1
        y.append(np.max([used[h:h + len(p)] for h in range(1, H + 1)], axis=0))
    y = np.concatenate(y)
    want = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ y)
    np.testing.assert_allclose(fit_cross_model(prompts, E, H, decay, ridge), want, rtol=1e-9, atol=1e-12)


def test_rows_read_token_t_up_to_layer_l_and_the_table_past_it():
    rng = np.random.default_rng(1)
    L, E, k, decay = 3, 4, 2, 0.5
    experts = _random_prompts(rng, 1, L, E, k)[0]  # [T, L, k]
    T = len(experts)
    expected = rng.random((T, L, E))
    weights = rng.normal(size=(L * E + 1, L * E))
    before, after = prompt_cross_rows(experts, expected, weights, decay)  # [T*L, E] each
    crf = np.zeros(L * E)

    def row(state, l):
        return state @ weights[:-1, l * E:(l + 1) * E] + weights[-1, l * E:(l + 1) * E]

    for t in range(T):
        crf = crf * decay
        for l in range(L):
            state = crf.copy()
            state[l * E:] += expected[t, l:].reshape(-1)  # layers l and past: the table's expectation
            np.testing.assert_allclose(before[t * L + l], row(state, l), rtol=1e-10, atol=1e-10)
            crf[l * E + experts[t, l]] += 1.0
            state = crf.copy()
            state[(l + 1) * E:] += expected[t, l + 1:].reshape(-1)  # layers past l: the table's expectation
            np.testing.assert_allclose(after[t * L + l], row(state, l), rtol=1e-10, atol=1e-10)


def test_expected_use_is_the_token_table_or_the_prior(make_traces):
    rng = np.random.default_rng(2)
    traces = make_traces(_random_prompts(rng, 6, 2, 4, 2), 4)
    tables = CausalTables(traces, max_gap=1, alpha=4.0, min_token_count=1)
    got = expected_use(tables, np.array([0, 10_000]))  # a known id, an unknown one
    np.testing.assert_allclose(got[0], np.exp(tables.log_layer + tables.tok[tables.token_rows(np.array([0]))[0]]),
                               rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(got[1], np.exp(tables.log_layer), rtol=1e-6)


def test_cross_reuse_refuses_what_it_cannot_fit(make_traces):
    one = make_traces([np.zeros((3, 2, 1), np.int64)], 4)
    with pytest.raises(ValueError, match="at least 2 training prompts"):
        get_predictor("cross-reuse").fit(one)
    with pytest.raises(ValueError, match="decay must be in"):
        get_predictor("cross-reuse", decay=1.0)


def test_cross_prefetch_replaces_only_the_step_about_to_run(make_traces):
    rng = np.random.default_rng(3)
    traces = make_traces(_random_prompts(rng, 8, 3, 6, 2), 6)
    table = get_predictor("causal-table", lookahead=1)
    table.fit(traces)
    plain = get_predictor("cross-reuse", lookahead=1, cross_prefetch=False)
    cross = get_predictor("cross-reuse", lookahead=1)
    plain.fit(traces)
    cross.fit(traces)
    want = table.predict_prompt(traces[0], traces.meta)
    got_plain, got = (p.predict_prompt(traces[0], traces.meta) for p in (plain, cross))
    np.testing.assert_array_equal(got_plain.scores, want.scores)  # without the stage: the table's predictions
    now = want.target_step == want.issue_step
    np.testing.assert_array_equal(got.scores[~now], want.scores[~now])  # further targets: the table's
    assert np.all((got.scores[now] > 0) & (got.scores[now] < 1)) and not np.allclose(got.scores[now], want.scores[now])


def test_prefetch_stage_reads_each_layers_last_run_features():
    """The step-about-to-run features: bias, log table, logits of the cross and within-token rows, then the
    reuse features of (t-1, l), zeros at the first token (whose bias column is then 0, an intercept of its own)."""
    L, E, F = 2, 3, NUM_FEATURES
    features = np.arange(3 * L * E * F, dtype=np.float64).reshape(3 * L, E, F) + 1.0  # [T*L, E, F], T = 3
    last = last_run_features(features, L)
    np.testing.assert_array_equal(last[:L], 0.0)
    np.testing.assert_array_equal(last[L:], features[:-L])
    table = np.full((3 * L, E), 0.5)
    cross = np.full((3 * L, E), 0.25)
    within = np.full((3 * L, E), -0.5)  # a ridge row below 0: clipped to 1e-3
    rows = predict_features(table, cross, within, last)  # [T*L, E, 4 + F]
    assert rows.shape == (3 * L, E, 4 + F)
    np.testing.assert_allclose(rows[..., 0], 1.0)
    np.testing.assert_allclose(rows[..., 1], np.log(0.5))
    np.testing.assert_allclose(rows[..., 2], np.log(0.25 / 0.75))
    np.testing.assert_allclose(rows[..., 3], np.log(1e-3 / (1 - 1e-3)))
    np.testing.assert_array_equal(rows[..., 4:], last)
