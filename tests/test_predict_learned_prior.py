"""Learned predictor with the causal-table prior: equals the table, causal, fast = step path, checkpoints."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from emoe_jax.predict.causal_table import CausalTables, row_scores
from emoe_jax.predict.base import horizon_rows
from emoe_jax.predict.drive import prompt_predictions, step_predictions
from emoe_jax.predict.learned import LearnedConfig, LearnedPredictor, LearnedPredictorError, TrainSettings, load, save
from emoe_jax.predict.learned.incremental import step_logits
from emoe_jax.predict.learned.model import RoutingPredictorNet
from emoe_jax.predict.learned.prior import PRIOR_FILE, fit_table_prior, prior_scores
from emoe_jax.predict.learned.train import train_model
from emoe_jax.traces import PromptTrace, TraceMeta, TraceSet

L, E, K, H = 4, 8, 2, 2


def make_set(rng, lengths, vocab=5):
    meta = TraceMeta(model="t", num_layers=L, num_experts=E, top_k=K, moe_layer_ids=tuple(range(L)),
                     hidden_size=None, source="test")  # fmt: skip
    prompts = []
    for i, n in enumerate(lengths):
        ex = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(n)])
        prompts.append(PromptTrace(prompt_id=i, task="", text="", token_ids=rng.integers(0, vocab, n).astype(np.int32),
                                   experts=ex.astype(np.int16), weights=None, n_prefill=n))  # fmt: skip
    return TraceSet.from_prompts(meta, prompts)


def prior_cfg(rows):
    return LearnedConfig(num_layers=L, num_experts=E, top_k=K, horizon=H, d_model=16, num_heads=2, mlp_hidden=32,
                         token_buckets=16, window=4, table_prior=True, prior_token_rows=rows)  # fmt: skip


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    train = make_set(rng, (12, 9, 7, 5))
    prior = fit_table_prior(train, H, max_token_rows=3, min_token_count=1)
    model = train_model(train, prior_cfg(len(prior.token_ids)), TrainSettings(steps=3, batch_size=2, row_len=8),
                        progress=False, prior=prior).model  # fmt: skip
    return train, prior, model


def test_prior_equals_the_causal_table_row_scores(fitted):
    """In-graph prior_scores = causal_table.row_scores on the same (token-restricted) tables, every (t, l, d)."""
    train, prior, _ = fitted
    tables = CausalTables(train, min(H + 1, L - 1), 4.0, 1)
    keep = np.searchsorted(tables.token_ids, prior.token_ids)
    tables.tok, tables.token_ids = tables.tok[keep], tables.token_ids[keep]  # the prior keeps the 3 commonest ids
    assert len(prior.token_ids) == 3
    trace = make_set(np.random.default_rng(5), (6,)).prompts[0] if hasattr(TraceSet, "prompts") else None
    trace = trace or next(iter(make_set(np.random.default_rng(5), (6,))))
    ex = np.asarray(trace.experts).astype(np.int64)
    T = ex.shape[0]
    issue, target = horizon_rows(T * L, H)
    want = row_scores(tables, (0.5, 1.2, 0.7), tables.token_rows(np.asarray(trace.token_ids)), ex, issue, target,
                      issue // L)  # fmt: skip
    prev = np.concatenate([np.zeros_like(ex[:1]), ex[:-1]])
    got = prior_scores(prior.arrays(), prior.token_rows(trace.token_ids)[None], ex[None], prev[None],
                       (np.arange(T) > 0)[None], H, K)[0]  # [T, L, H+1, E]  # fmt: skip
    got = np.asarray(got).reshape(T * L, H + 1, E)
    rows = {(int(i), int(tg)): r for r, (i, tg) in enumerate(zip(issue, target))}
    for s in range(T * L):
        for d in range(H + 1):
            if (s, s + d) in rows:
                np.testing.assert_allclose(got[s, d], want[rows[(s, s + d)]], rtol=2e-5, atol=1e-6)


def test_untrained_prior_network_ranks_as_the_table(fitted):
    train, prior, _ = fitted
    model = RoutingPredictorNet(prior_cfg(len(prior.token_ids)), rngs=nnx.Rngs(0))
    model.install_prior(prior)
    p = LearnedPredictor(lookahead=H, model=model)
    trace = next(iter(train))
    scores = p.all_scores(trace)  # [T, L, H+1, E]
    ex = np.asarray(trace.experts).astype(np.int32)
    prev = np.concatenate([np.zeros_like(ex[:1]), ex[:-1]])
    q = np.asarray(model.prior_q(model.table_prior().token_rows(trace.token_ids)[None], ex[None], prev[None],
                                 (np.arange(len(ex)) > 0)[None]))[0]  # fmt: skip
    qh = np.asarray(np.float16(q), np.float32)  # install_prior rounds the tables as the checkpoint does
    np.testing.assert_array_equal(np.argsort(-scores, -1, kind="stable")[..., :K],
                                  np.argsort(-q, -1, kind="stable")[..., :K])  # fmt: skip
    assert qh.shape == scores.shape


def test_prior_predictions_never_read_the_future(fitted):
    """Change token t+1.. and layers >= l of token t: every row issued at (t, l) stays identical."""
    _, _, model = fitted
    p = LearnedPredictor(lookahead=H, model=model)
    rng = np.random.default_rng(3)
    base = next(iter(make_set(rng, (7,))))
    ref = p.all_scores(base)
    for t in (0, 2, 5):
        for l in range(L):
            ex = np.asarray(base.experts).copy()
            ids = np.asarray(base.token_ids).copy()
            ex[t, l:] = (ex[t, l:] + 3) % E
            ex[t + 1 :] = (ex[t + 1 :] + 5) % E
            ids[t + 1 :] = (ids[t + 1 :] + 1) % 5
            changed = PromptTrace(prompt_id=0, task="", text="", token_ids=ids, experts=ex, weights=None,
                                  n_prefill=len(ids))  # fmt: skip
            got = p.all_scores(changed)
            np.testing.assert_allclose(got[:t], ref[:t], atol=1e-6)
            np.testing.assert_allclose(got[t, : l + 1], ref[t, : l + 1], atol=1e-6)


def test_prior_fast_path_equals_step_path(fitted):
    train, _, model = fitted
    p = LearnedPredictor(lookahead=H, model=model)
    trace = next(iter(train))
    fast = prompt_predictions(p, trace, train.meta)
    slow = step_predictions(p, trace, train.meta)
    np.testing.assert_array_equal(fast.issue_step, slow.issue_step)
    np.testing.assert_array_equal(fast.target_step, slow.target_step)
    np.testing.assert_allclose(fast.scores, slow.scores, atol=2e-5)


def test_prior_checkpoint_round_trip_and_clear_errors(fitted, tmp_path):
    train, prior, model = fitted
    path = save(tmp_path / "ck", model, {"steps": 3})
    assert (path / PRIOR_FILE).is_file() and not list(path.glob(".*tmp*"))
    back, info = load(path)
    assert back.cfg == model.cfg and info == {"steps": 3}
    np.testing.assert_array_equal(back.table_prior().token_ids, prior.token_ids)
    trace = next(iter(train))
    np.testing.assert_allclose(LearnedPredictor(lookahead=H, model=back).all_scores(trace),
                               LearnedPredictor(lookahead=H, model=model).all_scores(trace), atol=2e-3)  # fmt: skip
    (path / PRIOR_FILE).write_bytes(b"not a zip")
    with pytest.raises(LearnedPredictorError, match="cannot read the table-prior file"):
        load(path)
    (path / PRIOR_FILE).unlink()
    with pytest.raises(LearnedPredictorError, match="table_prior.npz is missing"):
        load(path)
    save(tmp_path / "ck2", model)
    record = json.loads((tmp_path / "ck2" / "config.json").read_text())
    record["config"]["prior_token_rows"] += 1  # tables no longer match the config
    (tmp_path / "ck2" / "config.json").write_text(json.dumps(record))
    with pytest.raises(LearnedPredictorError, match="tok has shape"):
        load(tmp_path / "ck2")


def test_prior_config_validation_and_missing_inputs(fitted):
    _, prior, model = fitted
    with pytest.raises(LearnedPredictorError, match="horizon < num_layers"):
        LearnedConfig(num_layers=2, num_experts=4, top_k=1, horizon=2, table_prior=True)
    with pytest.raises(LearnedPredictorError, match="needs table_prior"):
        LearnedConfig(num_layers=2, num_experts=4, top_k=1, horizon=1, prior_token_rows=3)
    with pytest.raises(ValueError, match="needs the fitted tables"):
        train_model(make_set(np.random.default_rng(0), (4,)), prior_cfg(3), TrainSettings(steps=1, row_len=8),
                    progress=False)  # fmt: skip
    plain = RoutingPredictorNet(prior_cfg(3).with_(table_prior=False, prior_token_rows=0), rngs=nnx.Rngs(0))
    with pytest.raises(LearnedPredictorError, match="without table_prior"):
        plain.install_prior(prior)


def test_in_graph_step_refuses_a_prior_checkpoint(fitted):
    """The runtime's in-graph path calls step_logits without table scores: it must refuse, not ignore the prior."""
    _, _, model = fitted
    h = jax.numpy.zeros((1, 16))
    with pytest.raises(LearnedPredictorError, match="causal-table prior"):
        step_logits(model, h, 0, h, h)


def test_runtime_in_graph_learned_path_refuses_a_prior_network(tiny_model):
    """The one-jit runtime's LearnedInGraph cannot compute the table prior: its step raises, naming the prior;
    in_graph_predictor therefore leaves a prior network to the host path (None: no in-graph version)."""
    from emoe_jax.runtime.ingraph_learned import LearnedInGraph
    from emoe_jax.runtime.ingraph_predictors import PrefillRouting, in_graph_predictor

    cfg = tiny_model("deepseek_v2")[0]
    lm, e, k = cfg.num_moe_layers, cfg.num_experts, cfg.top_k
    net_cfg = LearnedConfig(num_layers=lm, num_experts=e, top_k=k, horizon=min(1, lm - 1), d_model=16, num_heads=2,
                            mlp_hidden=32, token_buckets=64, window=3, table_prior=True, prior_token_rows=2)  # fmt: skip
    host = LearnedPredictor(model=RoutingPredictorNet(net_cfg, rngs=nnx.Rngs(0)))
    assert in_graph_predictor(host, cfg) is None
    ingraph = LearnedInGraph(host, cfg)
    ids = np.zeros((1, 2, lm, k), np.int32) + np.arange(k, dtype=np.int32)
    state = ingraph.init_state(PrefillRouting(np.array([[3, 4]], np.int32), ids, np.ones((1, 2), bool),
                                              np.arange(2)[None]))  # fmt: skip
    with pytest.raises(LearnedPredictorError, match="causal-table prior"):
        ingraph.begin_step(None, ingraph.params(), state, np.array([5], np.int32), np.array([2], np.int32))
