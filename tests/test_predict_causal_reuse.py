"""causal-reuse and recency-reuse: the learned reuse model's features, labels and fit, worked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from emoe_jax.predict import get_predictor
from emoe_jax.predict.reuse_model import FEATURES, NUM_FEATURES, fit_logistic, next_use_within, prompt_feature_rows


def test_next_use_within_looks_ahead_inside_the_prompt_only():
    experts = np.array([[[0]], [[1]], [[0]], [[2]]])  # [T=4, L=1, k=1]
    np.testing.assert_array_equal(next_use_within(experts, 3, 1), [[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0]])
    np.testing.assert_array_equal(next_use_within(experts, 3, 2), [[1, 1, 0], [1, 0, 1], [0, 0, 1], [0, 0, 0]])


def test_features_by_hand():
    experts = np.array([[[0]], [[1]], [[0]]])  # one layer, two experts, expert 0 at tokens 0 and 2
    reuse = np.full((3, 2), 0.5)
    log_prior = np.log(np.array([0.75, 0.25]))
    x = prompt_feature_rows(experts, reuse, log_prior)  # [T*L, E, F]
    assert x.shape == (3, 2, NUM_FEATURES) == (3, 2, len(FEATURES))
    e0 = x[2, 0]  # expert 0 after token 2: used now, used twice, CRF = decay^2 + 1
    np.testing.assert_allclose(e0[:3], [1.0, 1.0, 0.0])  # bias, routed now, logit(0.5)
    np.testing.assert_allclose(e0[3:6], np.log(1e-3 + np.array([0.5, 0.8, 0.95]) ** 2 + 1.0))
    np.testing.assert_allclose(e0[6:], [0.0, np.log(0.75), 2 / 3, np.log(3), np.log(3)])
    e1 = x[2, 1]  # expert 1 after token 2: last used at token 1, once
    np.testing.assert_allclose(e1[1], 0.0)
    np.testing.assert_allclose(e1[3:6], np.log(1e-3 + np.array([0.5, 0.8, 0.95])))
    np.testing.assert_allclose(e1[6:9], [np.log(2), np.log(0.25), 1 / 3])
    never = x[0, 1]  # expert 1 before its first use: no CRF, age capped at 1000
    np.testing.assert_allclose(never[3:7], [np.log(1e-3)] * 3 + [np.log1p(1000)])


def test_fit_logistic_recovers_known_weights():
    rng = np.random.default_rng(0)
    x = np.column_stack([np.ones(20000), rng.normal(size=(20000, 2))])
    w_true = np.array([-0.5, 2.0, -1.0])
    y = rng.random(20000) < 1.0 / (1.0 + np.exp(-(x @ w_true)))
    np.testing.assert_allclose(fit_logistic(x, y, ridge=0.0), w_true, atol=0.1)
    assert np.all(np.isfinite(fit_logistic(x, np.ones(20000, bool))))  # separable: the ridge keeps it finite


@pytest.mark.parametrize("name", ["causal-reuse", "cross-reuse", "recency-reuse"])
def test_learned_reuse_ranks_a_sticky_expert_first(make_traces, name):
    """Expert 0 of layer 0 is routed at every token; the others rotate. Its reuse must rank first."""
    rng = np.random.default_rng(1)
    E = 6
    prompts = []
    for _ in range(10):
        T = int(rng.integers(8, 14))
        rest = rng.integers(1, E, size=T)
        prompts.append(np.stack([np.stack([[0, r], [r, (r % (E - 1)) + 1]]) for r in rest]))  # [T, L=2, k=2]
    traces = make_traces(prompts, E)
    p = get_predictor(name)
    p.fit(traces)
    reuse = p.predict_prompt(traces[0], traces.meta).reuse  # [T*L, E]
    layer0 = reuse[0::2]
    assert layer0[:, 0].min() > layer0[:, 1:].max()  # above every other expert at every token


def test_causal_reuse_refuses_what_it_cannot_fit(make_traces):
    one = make_traces([np.zeros((3, 2, 1), np.int64)], 4)
    with pytest.raises(ValueError, match="at least 2 training prompts"):
        get_predictor("causal-reuse").fit(one)
    with pytest.raises(ValueError, match="horizon must be >= 1"):
        get_predictor("causal-reuse", horizon=0)
    with pytest.raises(ValueError, match="horizon must be >= 1"):
        get_predictor("recency-reuse", horizon=0)
    recency = get_predictor("recency-reuse")  # no prefetch: empty predictions, reuse rows only
    recency.fit(make_traces([np.array([[[0], [1]], [[2], [1]]])], 4))
    rows = recency.predict_prompt(make_traces([np.array([[[0], [1]]])], 4)[0], one.meta)
    assert len(rows) == 0 and rows.reuse.shape == (2, 4)
