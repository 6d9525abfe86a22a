"""recency-reuse inside the one-jit step: the host step path's reuse rows, booked as eviction ranks."""

import jax
import numpy as np
import pytest

from emoe_jax.predict.base import PromptInfo
from emoe_jax.predict.recency_reuse import RecencyReuse
from emoe_jax.predict.reuse_model import NUM_FEATURES
from emoe_jax.runtime.engine import OffloadedEngine
from emoe_jax.runtime.ingraph_predictors import PrefillRouting, in_graph_predictor
from emoe_jax.runtime.ingraph_reuse import RecencyReuseInGraph
from emoe_jax.runtime.tiers import InMemoryExperts


def fitted_recency_reuse(num_moe_layers, num_experts, seed=0):
    """A recency-reuse predictor with random weights and prior: every feature moves its scores."""
    rng = np.random.default_rng(seed)
    pred = RecencyReuse()
    pred.reuse_weights = rng.normal(size=NUM_FEATURES)
    prior = rng.random((num_moe_layers, num_experts)) + 0.1
    pred.log_prior = np.log(prior / prior.sum(1, keepdims=True)).reshape(-1)
    return pred


def test_in_graph_reuse_rows_equal_the_host_step_path():
    lm, e, k = 3, 8, 2
    host = fitted_recency_reuse(lm, e)
    ingraph = RecencyReuseInGraph(host, type("Cfg", (), {"num_moe_layers": lm, "num_experts": e})())
    rng = np.random.default_rng(1)
    lengths, n_decode = (4, 2), 7  # two rows, left-padded to 4 prompt positions
    rows = []
    for n in lengths:
        ids = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(lm)])
                        for _ in range(n + n_decode)]).astype(np.int32)  # [T, Lm, k]
        ids[n + 2] = ids[n + 1]  # a repeat: CRF of an expert used at consecutive tokens
        rows.append(ids)
    width = max(lengths)
    prefill_ids = np.zeros((2, width, lm, k), np.int32)
    valid = np.zeros((2, width), bool)
    positions = np.full((2, width), -1, np.int32)
    hosts = []
    for i, (n, ids) in enumerate(zip(lengths, rows)):
        prefill_ids[i, width - n:] = ids[:n]
        valid[i, width - n:] = True
        positions[i, width - n:] = np.arange(n)
        h = fitted_recency_reuse(lm, e)
        h.begin_prompt(PromptInfo(prompt_id=i, task="", text="", n_prefill=n, num_layers=lm, num_experts=e, top_k=k))
        for t in range(n):
            for layer in range(lm):
                h.observe(t, layer, ids[t, layer])
        hosts.append(h)
    state = ingraph.init_state(PrefillRouting(np.zeros((2, width), np.int32), prefill_ids, valid, positions))
    begin = jax.jit(lambda st, pos: ingraph.begin_step(None, (), st, None, pos)[1])
    reuse = jax.jit(lambda pp, st, i, ml: ingraph.reuse_row(pp, st, ml, i), static_argnums=3)
    params = ingraph.params()
    for step in range(n_decode):
        t = np.array([n + step for n in lengths], np.int32)
        state = begin(state, t)
        for layer in range(lm):
            ids = np.stack([rows[i][t[i], layer] for i in range(2)])  # [B, k]
            got, state = reuse(params, state, ids, layer)
            for i, h in enumerate(hosts):
                h.observe(int(t[i]), layer, ids[i])
                np.testing.assert_allclose(np.asarray(got)[i], h.reuse(int(t[i]), layer), atol=1e-5, rtol=1e-5)


def test_recency_reuse_in_graph_needs_a_fit_on_this_model():
    cfg = type("Cfg", (), {"num_moe_layers": 2, "num_experts": 4})()
    with pytest.raises(ValueError, match="not fitted"):
        in_graph_predictor(RecencyReuse(), cfg)
    with pytest.raises(ValueError, match="fit it on this model's traces"):
        in_graph_predictor(fitted_recency_reuse(3, 4), cfg)


@pytest.mark.parametrize("eviction_scores", ["reuse", "latest"])
def test_recency_reuse_runs_one_jit_with_exact_outputs_and_the_staged_paths_ranks(tiny_model, eviction_scores):
    cfg, g, p, ex, resident = tiny_model("qwen3_moe")
    prompts = [[5, 9, 13, 22, 7], [3, 17, 8]]
    ref = resident.generate(prompts, 8)
    final_scores = {}
    for path in ("onejit", "staged"):
        engine = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=2, policy="score",
                                 eviction_scores=eviction_scores, decode_path=path,
                                 predictor=fitted_recency_reuse(cfg.num_moe_layers, cfg.num_experts))
        out = engine.generate(prompts, 8, stop_at_eos=False)
        assert out.stats["decode_path"] == path and out.stats["predictor"] == "recency-reuse"
        assert [out.tokens[i] for i in range(2)] == [ref[i].tolist() for i in range(2)]
        final_scores[path] = np.array([[pol.scores[x] for x in range(cfg.num_experts)]
                                       for pol in engine.device_cache.policies])  # [Lm, E]
    # The one-jit step's last reuse rows (best over the batch) are the staged driver's.
    assert final_scores["onejit"].std() > 0
    np.testing.assert_allclose(final_scores["onejit"], final_scores["staged"], atol=1e-5)


def test_reuse_eviction_scores_keep_predictions_out_of_the_one_jit_ranks(tiny_model):
    from emoe_jax.runtime.ingraph_predictors import SpecGatingInGraph

    cfg, g, p, ex, _ = tiny_model("qwen3_moe")
    booked = {}
    for eviction_scores in ("latest", "reuse"):
        engine = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=2, policy="score",
                                 eviction_scores=eviction_scores, predictor=SpecGatingInGraph(cfg))
        out = engine.generate([[5, 9, 13, 22, 7]], 6, stop_at_eos=False)
        assert out.stats["decode_path"] == "onejit"
        booked[eviction_scores] = max(abs(v) for pol in engine.device_cache.policies for v in pol.scores.values())
    # spec-gating has no reuse rows: with "reuse" nothing ranks the slots (LRU decides), with "latest" its predictions
    assert booked["latest"] > 0 and booked["reuse"] == 0
