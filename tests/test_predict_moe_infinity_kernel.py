"""MoE-Infinity's compiled prompt replay equals the plain NumPy path, bit for bit, state included."""

from __future__ import annotations

import numpy as np
import pytest

from emoe_jax.predict import get_predictor
from emoe_jax.predict.drive import step_predictions


@pytest.fixture(scope="module")
def _random(make_traces):
    def _random(seed: int, prompts: int, L: int = 4, E: int = 12, k: int = 3):
        rng = np.random.default_rng(seed)
        skew = np.linspace(3, 0.2, E) / np.linspace(3, 0.2, E).sum()  # repeated experts: counts above 1
        return make_traces([np.stack([np.stack([rng.choice(E, k, replace=False, p=skew) for _ in range(L)])
                                      for _ in range(int(n))]) for n in rng.integers(1, 14, prompts)], E)  # fmt: skip

    return _random


@pytest.mark.parametrize("lookahead,capacity", [(0, 1000), (2, 1000), (1, 3), (4, 1)])
def test_compiled_replay_equals_python(_random, lookahead, capacity):
    """Same scores and the same collection (stored EAMs, access counts) after every prompt,
    including a full collection whose least-matched entries are replaced."""
    train, replay = _random(0, 6), _random(1, 8)
    fast = get_predictor("moe-infinity", lookahead=lookahead, capacity=capacity)
    slow = get_predictor("moe-infinity", lookahead=lookahead, capacity=capacity)
    fast.fit(train)
    slow.fit(train)
    for trace in replay:
        a = fast.predict_prompt(trace, replay.meta)
        b = slow.predict_prompt_python(trace, replay.meta)
        np.testing.assert_array_equal(a.issue_step, b.issue_step)
        np.testing.assert_array_equal(a.target_step, b.target_step)
        np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(fast.access, slow.access)
        np.testing.assert_array_equal(fast.store, slow.store)
        assert fast.size == slow.size


def test_compiled_replay_equals_step_path_and_empty_collection(_random):
    replay = _random(2, 3)
    fast, step = get_predictor("moe-infinity", lookahead=1), get_predictor("moe-infinity", lookahead=1)
    for trace in replay:  # no fit: the first prompt sees an empty collection (zero scores)
        a = fast.predict_prompt(trace, replay.meta)
        b = step_predictions(step, trace, replay.meta)
        np.testing.assert_array_equal(a.target_step, b.target_step)
        np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=0)
