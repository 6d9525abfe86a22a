"""Predictor interface, registry, and every predictor on tiny hand-made traces."""

from __future__ import annotations

import numpy as np
import pytest

from emoe_jax.predict import (
    BasePredictor,
    Prediction,
    Predictor,
    UnknownPredictorError,
    available_predictors,
    get_predictor,
    step_predictions,
)
from emoe_jax.predict.drive import prompt_predictions



def random_experts(rng, T, L, E, k):
    return np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(L)]) for _ in range(T)])


@pytest.fixture(scope="module")
def random_traces(make_traces):
    def random_traces(seed=0, prompts=4, L=3, E=8, k=2, max_tokens=7):
        rng = np.random.default_rng(seed)
        return make_traces([random_experts(rng, int(rng.integers(1, max_tokens)), L, E, k) for _ in range(prompts)], E)

    return random_traces


PREDICTIVE = ["static-freq", "prev-token", "causal-table", "causal-reuse", "cross-reuse", "recency-reuse", "moe-infinity-beyond", "moe-infinity", "oracle-prefetch"]


def built(name, train, lookahead=1):
    p = get_predictor(name, ignore_unknown=True, lookahead=lookahead)
    p.fit(train)
    return p


# -- registry -------------------------------------------------------------------


def test_registry_lists_and_builds_every_predictor():
    names = available_predictors()
    for expected in ["lru", "lfu", "belady", *PREDICTIVE]:
        assert expected in names
        p = get_predictor(expected, ignore_unknown=True, lookahead=2)
        assert isinstance(p, Predictor)
    assert get_predictor("min").eviction == "belady" and get_predictor("min").oracle
    assert get_predictor("oracle-prefetch").oracle and not get_predictor("static-freq").oracle


def test_registry_unknown_name_and_option_give_clear_errors():
    with pytest.raises(UnknownPredictorError, match="unknown predictor 'nope'.*static-freq"):
        get_predictor("nope")
    with pytest.raises(ValueError, match="does not take lookahead"):
        get_predictor("lru", lookahead=1)
    assert get_predictor("lru", ignore_unknown=True, lookahead=1).name == "lru"


def test_unfitted_predictor_names_the_missing_fit(random_traces):
    traces = random_traces()
    with pytest.raises(RuntimeError, match="call fit"):
        step_predictions(get_predictor("static-freq"), traces[0], traces.meta)


def test_prediction_rejects_targets_in_the_past(random_traces):
    class Bad(BasePredictor):
        name = "bad"

        def predict(self, t, l):
            return Prediction(np.array([[0, max(l - 1, 0)]]), np.ones((1, 8), np.float32)) if l else None

    traces = random_traces()
    with pytest.raises(ValueError, match="already ran"):
        step_predictions(Bad(), traces[0], traces.meta)


# -- fast paths against the step path -------------------------------------------


@pytest.mark.parametrize("name", PREDICTIVE)
@pytest.mark.parametrize("lookahead", [0, 1, 4])
def test_fast_path_equals_step_path(random_traces, name, lookahead):
    traces = random_traces(seed=1, prompts=5, L=3)
    fast, slow = built(name, traces, lookahead), built(name, traces, lookahead)
    for trace in traces:
        a = prompt_predictions(fast, trace, traces.meta, fast=True)
        b = step_predictions(slow, trace, traces.meta)
        np.testing.assert_array_equal(a.issue_step, b.issue_step)
        np.testing.assert_array_equal(a.target_step, b.target_step)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6, atol=1e-7)
        assert (a.reuse is None) == (b.reuse is None)
        if a.reuse is not None:  # eviction-side scores, one row per step
            assert a.reuse.shape == (trace.experts.shape[0] * traces.meta.num_layers, traces.meta.num_experts)
            np.testing.assert_allclose(a.reuse, b.reuse, rtol=1e-6, atol=1e-7)


# -- no peeking into the future --------------------------------------------------


@pytest.mark.parametrize("name", [n for n in PREDICTIVE if n != "oracle-prefetch"])
@pytest.mark.parametrize("fast", [True, False])
def test_predictions_do_not_depend_on_the_future(random_traces, make_traces, name, fast):
    """Replace everything from step s* on: predictions issued at steps <= s* stay identical."""
    rng = np.random.default_rng(3)
    L, E, k = 3, 8, 2
    train = random_traces(seed=4, prompts=6, L=L, E=E, k=k)
    base = random_experts(rng, 6, L, E, k)
    for cut in [0, 1, 4, 7, 13]:
        other = base.copy()
        flat = other.reshape(-1, k)
        flat[cut:] = random_experts(rng, 6, L, E, k).reshape(-1, k)[cut:]  # a different future
        a = prompt_predictions(built(name, train, 2), make_traces([base], E)[0], train.meta, fast)
        b = prompt_predictions(built(name, train, 2), make_traces([other], E)[0], train.meta, fast)
        keep_a, keep_b = a.issue_step <= cut, b.issue_step <= cut
        np.testing.assert_array_equal(a.target_step[keep_a], b.target_step[keep_b])
        np.testing.assert_array_equal(a.scores[keep_a], b.scores[keep_b])
        if a.reuse is not None:  # reuse row s is made after step s ran: rows < cut see only the past
            np.testing.assert_array_equal(a.reuse[:cut], b.reuse[:cut])


def test_the_no_peeking_check_catches_an_oracle(random_traces, make_traces):
    rng = np.random.default_rng(3)
    train = random_traces(seed=4)
    base = random_experts(rng, 5, 3, 8, 2)
    other = base.copy()
    other[2:] = (other[2:] + 1) % 8
    a = prompt_predictions(built("oracle-prefetch", train, 2), make_traces([base], 8)[0], train.meta)
    b = prompt_predictions(built("oracle-prefetch", train, 2), make_traces([other], 8)[0], train.meta)
    before = a.issue_step <= 6  # step 6 = token 2, layer 0: the first changed step
    assert not np.array_equal(a.scores[before], b.scores[before])


# -- each predictor's arithmetic --------------------------------------------------


def test_static_frequency_counts_per_layer(make_traces):
    # 2 tokens, 2 layers, k=1: layer 0 uses 1 then 1, layer 1 uses 2 then 3.
    traces = make_traces([np.array([[[1], [2]], [[1], [3]]])], num_experts=4)
    p = built("static-freq", traces, lookahead=0)
    np.testing.assert_allclose(p.freq, [[0, 1, 0, 0], [0, 0, 0.5, 0.5]])
    pred = p.predict(0, 1)
    np.testing.assert_array_equal(pred.targets, [[0, 1]])
    np.testing.assert_allclose(pred.scores, [[0, 0, 0.5, 0.5]])


def test_prev_token_uses_latest_routing_at_each_layer(make_traces):
    # L=2: at (t=1, l=1) with lookahead 1 the targets are (1, 1) and (2, 0):
    # layer 1 was last routed by token 0 (expert 5), layer 0 by token 1 (expert 2).
    traces = make_traces([np.array([[[0], [5]], [[2], [6]], [[3], [7]]])], num_experts=8)
    preds = step_predictions(built("prev-token", traces, 1), traces[0], traces.meta)
    rows = np.nonzero(preds.issue_step == 3)[0]
    np.testing.assert_array_equal(preds.target_step[rows], [3, 4])
    assert preds.scores[rows[0]].nonzero()[0].tolist() == [5]
    assert preds.scores[rows[1]].nonzero()[0].tolist() == [2]
    first = np.nonzero(preds.issue_step == 0)[0]
    assert not preds.scores[first].any()  # nothing routed yet: no prediction


def test_moe_infinity_beyond_uses_mean_of_nine_lowest_prompt_ids(make_traces):
    # Prompt ids 20..9 in reverse; the 9 lowest (9..17) all route to expert 1 except id 9 (expert 2).
    prompts, ids = [], []
    for pid in range(20, 8, -1):
        e = 2 if pid == 9 else (1 if pid <= 17 else 3)
        prompts.append(np.full((2, 1, 1), e))
        ids.append(pid)
    traces = make_traces(prompts, num_experts=4, ids=ids)
    p = built("moe-infinity-beyond", traces, lookahead=0)
    assert sorted(p.fit_prompt_ids) == list(range(9, 18))
    # per-prompt counts: 2 tokens each; mean over 9 prompts: expert 1 = 16/9, expert 2 = 2/9
    np.testing.assert_allclose(p.centroid, [[0, 16 / 9, 2 / 9, 0]], rtol=1e-6)


def test_moe_infinity_picks_nearest_past_request_and_decays_by_distance(make_traces):
    L, E = 3, 6
    a = np.tile(np.array([[0, 1], [0, 1], [0, 1]]), (4, 1, 1))  # request A: experts 0,1 everywhere
    b = np.tile(np.array([[2, 3], [4, 5], [2, 3]]), (4, 1, 1))  # request B
    train = make_traces([a, b], E)
    p = built("moe-infinity", train, lookahead=2)
    current = make_traces([b[:2]], E)[0]
    preds = step_predictions(p, current, train.meta)
    # At (t=0, l=1) only layer 0 is seen, identical to B's: B is nearest.
    rows = np.nonzero(preds.issue_step == 1)[0]
    np.testing.assert_array_equal(preds.target_step[rows], [1, 2, 3])
    decay = 1 - np.arange(3) / (L + 1)
    b_rows = np.array([[0, 0, 0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5, 0, 0]])
    np.testing.assert_allclose(preds.scores[rows], b_rows * decay[:, None], rtol=1e-6)
    # The replayed request joined the collection as a past request.
    assert p.size == 3


def test_moe_infinity_collection_replaces_least_matched_when_full(make_traces):
    E = 4
    reqs = [np.full((1, 1, 1), e) for e in range(3)]
    p = get_predictor("moe-infinity", capacity=2)
    p.fit(make_traces(reqs[:2], E))
    p.access[:] = [5, 0]  # entry 1 matched least
    p.add_request(np.array([[0, 0, 0, 1.0]]))
    np.testing.assert_allclose(p.store_rows[:, 0], [[1, 0, 0, 0], [0, 0, 0, 1]])


def test_oracle_scores_exactly_the_future(random_traces):
    traces = random_traces(seed=2)
    preds = prompt_predictions(built("oracle-prefetch", traces, 1), traces[0], traces.meta)
    flat = np.asarray(traces[0].experts).reshape(-1, traces.meta.top_k)
    for r in range(len(preds)):
        tgt = preds.target_step[r]
        if tgt < flat.shape[0]:
            assert sorted(preds.scores[r].nonzero()[0]) == sorted(flat[tgt])


def test_causal_table_combines_token_layer_and_previous_token_tables(make_traces):
    """Each table alone picks the expert its counts say; the combination stays a distribution over k."""
    E, k = 6, 1  # 2 layers
    # token 0 -> layer0 expert 0 -> layer1 expert 3; token 1 -> layer0 expert 1 -> layer1 expert 4, alternating
    x = np.array([[[0], [3]], [[1], [4]]] * 6)  # [12, 2, 1]
    from dataclasses import replace

    from emoe_jax.traces import TraceSet

    plain = make_traces([x], E)
    train = TraceSet.from_prompts(plain.meta, [replace(plain[0], token_ids=np.tile([10, 11], 6).astype(np.int32))])
    for weights, want_l1 in [((0, 1, 0), 3), ((0, 0, 1), 3), ((1, 0, 0), 3)]:
        p = get_predictor("causal-table", lookahead=0, w_tok=weights[0], w_cond=weights[1], w_prev=weights[2],
                          min_token_count=1)
        p.fit(train)
        preds = prompt_predictions(p, train[0], train.meta)
        # step 2 = (token 1, layer 0) ... step 5 = (token 2, layer 1): token 2 is id 10, layer 0 expert 0
        row = int(np.nonzero(preds.target_step == 5)[0][0])
        assert int(np.argmax(preds.scores[row])) == want_l1, weights
        np.testing.assert_allclose(preds.scores.sum(1), k, rtol=1e-5)
        # reuse after step 3 = (token 1, layer 1, expert 4): token 2 at layer 1 is expected on expert 3
        if weights[2]:
            assert int(np.argmax(preds.reuse[3])) == 3
