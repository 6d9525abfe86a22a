"""Speculative next-layer gating: exact on a hand-made case, fast path == step path, no peeking."""

from __future__ import annotations

import numpy as np
import pytest

from emoe_jax.predict import get_predictor, prompt_predictions, step_predictions
from emoe_jax.predict.spec_gating import SpecGatingError, SpeculativeGating
from emoe_jax.sim import SimConfig, simulate
from emoe_jax.traces import PromptTrace, TraceMeta, TraceSet

L, E, K, H = 4, 8, 2, 6


def _meta(hidden: bool = True) -> TraceMeta:
    return TraceMeta(model="tiny", num_layers=L, num_experts=E, top_k=K, moe_layer_ids=tuple(range(L)),
                     hidden_size=H if hidden else None, source="test")  # fmt: skip


def _routers(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(L, E, H)).astype(np.float32)  # [L, E, H]


def _route(routers: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """Top-K experts of every (t, l) as the model routes: argsort of W[l] @ h[t, l]."""
    logits = np.einsum("leh,tlh->tle", routers, hidden.astype(np.float32))  # [T, L, E]
    return np.argsort(-logits, axis=-1)[..., :K].astype(np.int16)


def _prompt(pid: int, hidden: np.ndarray, experts: np.ndarray | None = None, routers=None) -> PromptTrace:
    experts = _route(routers, hidden) if experts is None else experts
    T = hidden.shape[0]
    return PromptTrace(prompt_id=pid, task="t", text="", token_ids=np.arange(T, dtype=np.int32),
                       experts=experts, weights=None, n_prefill=T, hidden=hidden)  # fmt: skip


def _constant_depth_prompt(pid: int, T: int, routers: np.ndarray, seed: int) -> PromptTrace:
    """Router inputs identical across layers, so the next layers' routers see their own input."""
    per_token = np.random.default_rng(seed).normal(size=(T, 1, H))
    hidden = np.repeat(per_token, L, axis=1).astype(np.float16)  # [T, L, H]
    return _prompt(pid, hidden, routers=routers)


def test_exact_when_router_inputs_do_not_change_with_depth():
    routers = _routers()
    traces = TraceSet.from_prompts(_meta(), [_constant_depth_prompt(i, 12, routers, i) for i in range(3)])
    pred = SpeculativeGating(lookahead=2, routers=routers)
    for trace in traces:
        p = prompt_predictions(pred, trace, traces.meta)
        assert len(p) > 0
        flat = np.asarray(trace.experts).reshape(-1, K)  # [S, k]
        top = np.argsort(-p.scores, axis=1, kind="stable")[:, :K]
        for row in range(len(p)):  # every prediction's top-k is exactly the routed set
            assert set(top[row]) == set(flat[p.target_step[row]].tolist())
    # In the simulator: recall@k is 100% over all its rows and on every layer it predicts
    # (layer 0 has no source: its own input may not be used, the next token's does not exist yet).
    result = simulate(traces, SpeculativeGating(lookahead=1, routers=routers), SimConfig(capacity=0.5))
    assert result.prediction["rows"] > 0
    assert result.prediction[f"recall@{K}"] == pytest.approx(1.0)
    per_layer = result.prediction[f"recall@{K}_per_layer"]
    assert all(v == pytest.approx(1.0) for v in per_layer[1:]), per_layer


def test_targets_and_sources_never_use_the_layers_own_input():
    """Layer l is predicted from layer l-1's input (not its own); layer 0 and token t+1 get nothing."""
    routers = _routers(1)
    rng = np.random.default_rng(3)
    hidden = rng.normal(size=(5, L, H)).astype(np.float16)
    trace = _prompt(0, hidden, routers=routers)
    p = step_predictions(SpeculativeGating(lookahead=1, routers=routers), trace, _meta())
    issue_layer, target_layer = p.issue_step % L, p.target_step % L
    assert np.all(p.target_step // L == p.issue_step // L)  # never into token t+1
    assert not np.any((p.target_step == p.issue_step) & (issue_layer == 0))
    h32 = hidden.astype(np.float32)
    for row in range(len(p)):
        t, l, lt = p.issue_step[row] // L, issue_layer[row], target_layer[row]
        src = l if lt > l else l - 1
        logits = routers[lt] @ h32[t, src]
        expect = np.exp(logits - logits.max())
        np.testing.assert_allclose(p.scores[row], expect / expect.sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lookahead", [0, 1, 3, L + 1])
def test_fast_path_equals_step_path(lookahead):
    routers = _routers(2)
    hidden = np.random.default_rng(lookahead).normal(size=(7, L, H)).astype(np.float16)
    trace = _prompt(0, hidden, routers=routers)
    pred = SpeculativeGating(lookahead=lookahead, routers=routers)
    fast, ref = pred.predict_prompt(trace, _meta()), step_predictions(pred, trace, _meta())
    np.testing.assert_array_equal(fast.issue_step, ref.issue_step)
    np.testing.assert_array_equal(fast.target_step, ref.target_step)
    np.testing.assert_allclose(fast.scores, ref.scores, rtol=1e-5, atol=1e-6)


def test_no_future_peeking():
    """Predictions issued up to step s do not change when everything after step s is replaced."""
    routers = _routers(4)
    rng = np.random.default_rng(5)
    T = 6
    hidden = rng.normal(size=(T, L, H)).astype(np.float16)
    base = _prompt(0, hidden, routers=routers)
    ref = SpeculativeGating(lookahead=2, routers=routers).predict_prompt(base, _meta())
    for s in (0, 5, 11, T * L - 2):
        t, l = divmod(s, L)
        h2 = hidden.copy().reshape(T * L, H)
        h2[s + 1 :] = rng.normal(size=(T * L - s - 1, H))  # the router inputs after step s
        e2 = _route(routers, h2.reshape(T, L, H))
        e2.reshape(T * L, K)[: s + 1] = np.asarray(base.experts).reshape(T * L, K)[: s + 1]
        other = _prompt(0, h2.reshape(T, L, H), experts=e2)
        for fn in (lambda p, tr: p.predict_prompt(tr, _meta()), lambda p, tr: step_predictions(p, tr, _meta())):
            got = fn(SpeculativeGating(lookahead=2, routers=routers), other)
            keep_ref, keep_got = ref.issue_step <= s, got.issue_step <= s
            np.testing.assert_array_equal(ref.target_step[keep_ref], got.target_step[keep_got])
            np.testing.assert_allclose(ref.scores[keep_ref], got.scores[keep_got], rtol=1e-5, atol=1e-6)


def test_clear_errors():
    routers = _routers()
    with pytest.raises(SpecGatingError, match="router weights"):
        SpeculativeGating()
    with pytest.raises(SpecGatingError, match="router weights"):
        get_predictor("spec-gating")
    hidden = np.zeros((3, L, H), np.float16)
    no_hidden = PromptTrace(prompt_id=0, task="", text="", token_ids=np.zeros(3, np.int32),
                            experts=_route(routers, hidden), weights=None, n_prefill=3)  # fmt: skip
    traces = TraceSet.from_prompts(_meta(hidden=False), [no_hidden])
    pred = SpeculativeGating(routers=routers)
    with pytest.raises(SpecGatingError, match="router inputs"):
        pred.fit(traces)
    with pytest.raises(SpecGatingError, match="router inputs"):
        simulate(traces, pred, SimConfig(capacity=0.5))
    with pytest.raises(SpecGatingError, match="router inputs"):
        step_predictions(pred, traces[0], traces.meta)
    with pytest.raises(SpecGatingError, match="layers"):
        SpeculativeGating(routers=_routers()[:2]).fit(TraceSet.from_prompts(_meta(), [_prompt(0, hidden, routers=routers)]))
    with pytest.raises(FileNotFoundError):
        SpeculativeGating(model_checkpoint="/nonexistent/ckpt")


def test_loads_router_kernels_of_a_checkpoint(tmp_path):
    """Router matrices come from the checkpoint's dense params, one per MoE layer, in layer order."""
    from pathlib import Path

    ckpt = Path(__file__).resolve().parents[1] / "checkpoints" / "embedded"
    if not (ckpt / "manifest.json").exists():
        pytest.skip("embedded checkpoint not present")
    from emoe_jax.checkpoint import load_checkpoint
    from emoe_jax.predict.spec_gating import load_routers

    routers, biases, ids = load_routers(ckpt)
    c = load_checkpoint(ckpt)
    assert ids == tuple(c.config.moe_layers)
    assert routers.shape == (c.config.num_moe_layers, c.config.num_experts, c.config.hidden_size) and biases is None
    last = ids[-1]
    np.testing.assert_array_equal(routers[-1], np.asarray(c.dense["layers"][str(last)]["mlp"]["gate"]["weight"], np.float32))


def test_gpt_oss_router_with_bias_scores_as_the_model_routes(tmp_path):
    """gpt-oss's router is `mlp.router` with a bias: the host predictor reads both and scores the next layer as
    the model's own router (what the in-graph spec-gating applies) does."""
    import jax
    from flax import nnx

    from emoe_jax.checkpoint import write_checkpoint
    from emoe_jax.config import tiny_config
    from emoe_jax.model.hf_params import nest_for_checkpoint, params_to_hf
    from emoe_jax.model.random_init import random_model
    from emoe_jax.predict.base import PromptInfo
    from emoe_jax.predict.spec_gating import load_routers

    cfg = tiny_config("gpt_oss", top_k=4)
    graphdef, params, experts = random_model(cfg, seed=0)
    model = nnx.merge(graphdef, params)
    rng = np.random.default_rng(0)
    for layer in cfg.moe_layers:  # random_model leaves router biases at 0; make them matter
        gate = model.layers[layer].mlp.gate
        gate.bias[...] = rng.normal(size=gate.bias.shape).astype(np.float32)
    graphdef, params = nnx.split(model)
    stacked = {w: np.stack([np.asarray(layer[j]) for layer in experts]) for j, w in enumerate(("gate", "up", "down"))}
    write_checkpoint(tmp_path / "ckpt", cfg, nest_for_checkpoint(params_to_hf(cfg, params)), stacked)
    routers, biases, ids = load_routers(tmp_path / "ckpt")
    lm, e = cfg.num_moe_layers, cfg.num_experts
    assert ids == tuple(cfg.moe_layers) and routers.shape[:2] == (lm, e) and biases.shape == (lm, e)
    assert np.abs(biases).max() > 0
    pred = SpeculativeGating(lookahead=1, model_checkpoint=tmp_path / "ckpt")
    pred.begin_prompt(PromptInfo(prompt_id=0, task="", text="", n_prefill=1, num_layers=lm, num_experts=e,
                                 top_k=cfg.top_k))  # fmt: skip
    pred.begin_token(0, 5)
    h = np.random.default_rng(1).normal(size=cfg.hidden_size).astype(np.float32)
    pred.observe_router_input(0, 0, h)
    got = pred.predict(0, 0)
    want = jax.nn.softmax(model.layers[cfg.moe_layers[1]].mlp.router_logits(h[None]), axis=-1)[0]
    row = [i for i, (offset, layer) in enumerate(got.targets) if offset == 0 and layer == 1][0]
    np.testing.assert_allclose(got.scores[row], np.asarray(want), atol=1e-5)
