"""Incremental learned-predictor context: equal to the full context, jittable, compiled once."""

from __future__ import annotations

import time

import jax
import numpy as np
import pytest
from flax import nnx

from emoe_jax.predict import get_predictor
from emoe_jax.predict.base import PromptInfo
from emoe_jax.predict.drive import step_predictions
from emoe_jax.predict.learned import LearnedConfig, LearnedPredictor, RoutingPredictorNet, load
from emoe_jax.predict.learned.incremental import (
    context_step,
    init_context_cache,
    prefill_context,
    routing_update,
    step_logits,
)
from emoe_jax.predict.learned.model import token_buckets
from emoe_jax.runtime.compile_count import compile_count
from emoe_jax.traces import PromptTrace, TraceMeta

L, E, K, HID = 3, 8, 2, 5
# window 4 and 2 context blocks: h_t reads 2 * (4 - 1) + 1 = 7 tokens back
TINY = LearnedConfig(num_layers=L, num_experts=E, top_k=K, horizon=3, d_model=16, num_heads=2, mlp_hidden=32,
                     token_buckets=64, window=4, context_layers=2)  # fmt: skip


def random_prompt(rng, n):
    return {
        "tok": rng.integers(0, TINY.token_buckets, n).astype(np.int32),
        "experts": rng.random((n, L, E)).argsort(-1)[..., :K].astype(np.int32),  # [n, L, k] distinct experts
        "hidden": rng.normal(size=(n, L, HID)).astype(np.float32),  # [n, L, H]
    }


REF_LEN = 32  # references run padded to one length, so they compile once per network


def full_reference(net, p):
    """net.context h [T, d] and all-step logits [T, L, horizon+1, E] of one prompt (padded to REF_LEN)."""
    n = len(p["tok"])
    pad = lambda x: np.pad(x, [(0, REF_LEN - n)] + [(0, 0)] * (x.ndim - 1))[None]  # noqa: E731
    prev = np.concatenate([np.zeros_like(p["experts"][:1]), p["experts"][:-1]])
    # tok, prev_experts, has_prev, seg (padding: 0), pos
    args = tuple(pad(x) for x in (p["tok"], prev, np.arange(n) >= 1, np.ones(n, np.int32), np.arange(n, dtype=np.int32)))
    hidden = pad(p["hidden"]) if net.cfg.hidden_size is not None else None
    graphdef, state = nnx.split(net)
    h, logits = _reference(graphdef, state, args, pad(p["experts"]), hidden)
    return np.asarray(h[0, :n]), np.asarray(logits[0, :n])


@jax.jit(static_argnums=0)
def _reference(graphdef, state, args, experts, hidden):
    net = nnx.merge(graphdef, state)
    return net.context(*args), net(*args, experts, hidden)


def jitted(net):
    graphdef, state = nnx.split(net)
    pure = lambda f: jax.jit(lambda st, *a: f(nnx.merge(graphdef, st), *a))  # noqa: E731
    return state, pure(context_step), pure(step_logits), pure(routing_update)


@pytest.mark.parametrize("hidden_size", [None, HID])
def test_context_step_and_step_logits_equal_the_full_network(hidden_size):
    """Two rows over 20 steps: row 0 one 20-token prompt; row 1 a 6-token prompt paused mid-way, then a 9-token one."""
    net = RoutingPredictorNet(TINY.with_(hidden_size=hidden_size), rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    prompts = [random_prompt(rng, n) for n in (20, 6, 9)]
    refs = [full_reference(net, p) for p in prompts]
    # schedule[row][step] = (prompt, t) or None (inactive)
    idle = [None, None]
    schedule = [[(0, s) for s in range(20)],
                idle + [(1, t) for t in range(3)] + idle + [(1, t) for t in range(3, 6)] + [None]
                + [(2, t) for t in range(9)]]  # fmt: skip
    state, ctx, logits_fn, update = jitted(net)
    cache = init_context_cache(net.cfg, 2)
    before = compile_count()
    for s in range(20):
        cur = [schedule[r][s] for r in range(2)]

        def rows(key, back=0):  # [2, ...] prompts[key] at token t - back of each row; zeros where none
            fill = np.zeros_like(prompts[0][key][0])
            return np.stack([prompts[c[0]][key][c[1] - back] if c and c[1] >= back else fill for c in cur])

        active = np.array([c is not None for c in cur])
        pos = np.array([c[1] if c else 1 for c in cur], np.int32)  # an inactive row's pos is arbitrary
        # prev: token t-1's routing [2, L, k]
        h, cache = ctx(state, cache, rows("tok"), rows("experts", back=1), active & (pos > 0), pos, active)
        experts, hidden = rows("experts"), rows("hidden")  # [2, L, k], [2, L, H]
        prefix = last = np.zeros((2, TINY.d_model), np.float32)
        logits = []
        for l in range(L):
            hidden_prev = None if hidden_size is None else hidden[:, l - 1] if l > 0 else np.zeros((2, HID), np.float32)
            logits.append(np.asarray(logits_fn(state, h, np.int32(l), prefix, last, hidden_prev)))
            prefix, last = update(state, np.int32(l), experts[:, l], prefix)
        if s == 0:
            assert compile_count() > before  # the counter sees the first compilations
            warm = compile_count()
        h = np.asarray(h)
        for r, c in enumerate(cur):
            if c is None:
                np.testing.assert_array_equal(h[r], 0.0)
                continue
            h_ref, logits_ref = refs[c[0]]
            np.testing.assert_allclose(h[r], h_ref[c[1]], atol=1e-5, err_msg=f"row {r} step {s}")
            for l in range(L):
                np.testing.assert_allclose(logits[l][r], logits_ref[c[1], l], atol=1e-5, err_msg=f"row {r} {c} l={l}")
    assert compile_count() == warm, "context_step / step_logits / routing_update recompiled"
    # The sequences reach past the receptive field: h_19 reads tokens 13..19 (two blocks of window 4),
    # so token 14 (outside the last window) matters and token 12 does not.
    for t_changed, matters in ((14, True), (12, False)):
        other = dict(prompts[0], tok=prompts[0]["tok"].copy())
        other["tok"][t_changed] += 1
        assert (np.abs(full_reference(net, other)[0][19] - refs[0][0][19]).max() > 1e-4) == matters


def test_prefill_context_fills_the_cache_for_decoding():
    """Left-padded prefill of two prompts (12 and 7 tokens), then 5 decode tokens each, against net.context."""
    net = RoutingPredictorNet(TINY, rngs=nnx.Rngs(2))
    rng = np.random.default_rng(3)
    lens, decode = (12, 7), 5
    prompts = [random_prompt(rng, n + decode) for n in lens]
    refs = [full_reference(net, p)[0] for p in prompts]  # [n + decode, d]
    t_max = max(lens)
    tok = np.zeros((2, t_max), np.int32)
    experts = np.zeros((2, t_max, L, K), np.int32)
    valid = np.zeros((2, t_max), bool)
    for r, (n, p) in enumerate(zip(lens, prompts)):
        tok[r, t_max - n :], experts[r, t_max - n :], valid[r, t_max - n :] = p["tok"][:n], p["experts"][:n], True
    graphdef, state = nnx.split(net)
    prefill = jax.jit(lambda st, *a: prefill_context(nnx.merge(graphdef, st), *a))
    step = jax.jit(lambda st, *a: context_step(nnx.merge(graphdef, st), *a))
    # start from a cache a previous prompt filled: prefill must start every row afresh
    _, cache = prefill(state, init_context_cache(TINY, 2), tok[:, ::-1].copy(), experts, np.ones((2, t_max), bool))
    h, cache = prefill(state, cache, tok, experts, valid)
    np.testing.assert_allclose(np.asarray(h), np.stack([refs[r][n - 1] for r, n in enumerate(lens)]), atol=1e-5)
    for i in range(decode):
        t = [n + i for n in lens]
        h, cache = step(state, cache, np.array([p["tok"][ti] for p, ti in zip(prompts, t)]),
                        np.stack([p["experts"][ti - 1] for p, ti in zip(prompts, t)]), np.ones(2, bool),
                        np.array(t, np.int32), np.ones(2, bool))  # fmt: skip
        np.testing.assert_allclose(np.asarray(h), np.stack([ref[ti] for ref, ti in zip(refs, t)]), atol=1e-5)


def test_step_path_compiles_once_across_tokens_and_prompts():
    net = RoutingPredictorNet(TINY.with_(hidden_size=HID), rngs=nnx.Rngs(4))
    meta = TraceMeta(model="t", num_layers=L, num_experts=E, top_k=K, moe_layer_ids=(0, 1, 2), hidden_size=HID,
                     source="test")  # fmt: skip
    rng = np.random.default_rng(5)

    def trace(n):
        p = random_prompt(rng, n)
        return PromptTrace(prompt_id=0, task="", text="", token_ids=p["tok"], experts=p["experts"].astype(np.int16),
                           weights=None, n_prefill=n, hidden=p["hidden"].astype(np.float16))  # fmt: skip

    pred = LearnedPredictor(lookahead=2, model=net)
    before = compile_count()
    step_predictions(pred, trace(3), meta)
    warm = compile_count()
    assert warm > before
    step_predictions(pred, trace(13), meta)  # a longer prompt, beyond the receptive field
    assert compile_count() == warm


def test_embedded_checkpoint_incremental_equals_recompute_and_is_faster():
    """learned-embedded (L=8, E=32, k=4, window 256): h after 600 tokens equals the receptive-field
    recompute the old begin_token ran; prints both per-token times."""
    p = get_predictor("learned", lookahead=1, num_layers=8, num_experts=32, top_k=4, router_inputs=True)
    assert isinstance(p, LearnedPredictor)
    c = p.cfg
    rng = np.random.default_rng(6)
    n = 600
    ids = rng.integers(0, 50_000, n)
    routing = rng.random((n, c.num_layers, c.num_experts)).argsort(-1)[..., : c.top_k]  # [n, L, k]
    p.begin_prompt(PromptInfo(prompt_id=0, task="", text="", n_prefill=n, num_layers=c.num_layers,
                              num_experts=c.num_experts, top_k=c.top_k))  # fmt: skip
    new_s = []
    for t in range(n):
        start = time.perf_counter()
        p.begin_token(t, int(ids[t]))
        jax.block_until_ready(p._h)
        new_s.append(time.perf_counter() - start)
        for l in range(c.num_layers):
            p.observe(t, l, routing[t, l])

    # The old begin_token: the whole receptive field through net.context, for every token.
    model, _ = load(p.checkpoint)
    graphdef, state = nnx.split(model)
    context = jax.jit(lambda st, *a: nnx.merge(graphdef, st).context(*a))
    w = c.context_layers * (c.window - 1) + 1
    t = n - 1
    # tokens t-w+1 .. t, each with its previous token's routing; one segment
    args = (token_buckets(ids[t + 1 - w :], c.token_buckets)[None], routing[t - w : t][None].astype(np.int32),
            np.ones((1, w), bool), np.ones((1, w), np.int32),
            np.arange(t + 1 - w, t + 1, dtype=np.int32)[None])  # fmt: skip
    old_s = []
    for _ in range(6):
        start = time.perf_counter()
        h_old = jax.block_until_ready(context(state, *args))
        old_s.append(time.perf_counter() - start)
    np.testing.assert_allclose(np.asarray(p._h)[0], np.asarray(h_old)[0, -1], atol=1e-4)
    old_ms, new_ms = 1e3 * np.median(old_s[1:]), 1e3 * np.median(new_s[10:])
    print(f"\nlearned-embedded begin_token: recompute over {w} tokens {old_ms:.1f} ms -> incremental {new_ms:.2f} ms")
