"""Forced-routing replay: the engine runs the trace's routing, and its hit counts follow LRU on that trace."""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from emoe_jax.config import tiny_config
from emoe_jax.model.random_init import random_model
from emoe_jax.predict import get_predictor
from emoe_jax.runtime.engine import OffloadedEngine, StepRouting
from emoe_jax.bench.replay import forced_replay_model, run_forced_replay
from emoe_jax.model.random_init import scaled_config
from emoe_jax.traces.forced_routing import ForcedRoutingError, TraceRouting, fold_token_ids, forced_routing
from emoe_jax.runtime.tiers import InMemoryExperts
from emoe_jax.sim import SimConfig, simulate
from emoe_jax.traces import PromptTrace, TraceMeta, TraceSet

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config("deepseek_v2", num_layers=3)  # layer 0 dense, 2 MoE layers, E=8, k=2
    g, p, ex = random_model(cfg, seed=0, router_scale=5.0)
    return cfg, g, p, ex


def _engine(tiny, slots):
    cfg, g, p, ex = tiny
    return OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=slots)


def _random_experts(rng, t, L, E, k):
    """[t, L, k] distinct experts per (token, layer)."""
    return np.stack([np.stack([rng.permutation(E)[:k] for _ in range(L)]) for _ in range(t)]).astype(np.int16)


def _trace_set(cfg, lengths, n_prefill, seed=0, weights=True) -> TraceSet:
    rng = np.random.default_rng(seed)
    L, E, k = cfg.num_moe_layers, cfg.num_experts, cfg.top_k
    meta = TraceMeta(model="test", num_layers=L, num_experts=E, top_k=k, moe_layer_ids=cfg.moe_layers,
                     hidden_size=None, source="test")
    prompts = [PromptTrace(prompt_id=i, task="", text="", token_ids=rng.integers(0, 3 * cfg.vocab_size, t).astype(np.int32),
                           experts=_random_experts(rng, t, L, E, k),
                           weights=rng.uniform(0.1, 1.0, (t, L, k)).astype(np.float32) if weights else None,
                           n_prefill=n)
               for i, (t, n) in enumerate(zip(lengths, n_prefill))]
    return TraceSet.from_prompts(meta, prompts)


def test_engine_runs_the_trace_routing_for_every_real_token(tiny):
    cfg = tiny[0]
    traces = _trace_set(cfg, lengths=[7, 4], n_prefill=[5, 2])
    routing = TraceRouting(traces, cfg)
    engine = _engine(tiny, 3)
    before, after = [], []

    def override(step):
        before.append(step.ids.copy())
        return routing(step)

    engine.routing_override = override
    engine.routing_hooks.append(after.append)
    assert routing.max_new_tokens == 3  # 2 generated tokens per trace, +1 only sampled
    engine.generate(routing.prompts, routing.max_new_tokens, stop_at_eos=False)

    seen = {(b, l): [] for b in range(2) for l in range(cfg.num_moe_layers)}
    for step, router_ids in zip(after, before):
        for b in range(2):
            trace = traces[b]
            for t, pos in enumerate(step.positions[b]):
                if pos < 0:  # padding keeps the router's own choice
                    np.testing.assert_array_equal(step.ids[b, t], router_ids[b, t])
                    continue
                np.testing.assert_array_equal(step.ids[b, t], trace.experts[pos, step.moe_layer])
                np.testing.assert_allclose(step.weights[b, t], trace.weights[pos, step.moe_layer], rtol=1e-6)
                seen[(b, step.moe_layer)].append(int(pos))
    # Every trace token replayed exactly once, at every MoE layer.
    for (b, _), positions in seen.items():
        assert sorted(positions) == list(range(traces[b].n_tokens))
    assert routing.forced_tokens == sum(len(v) for v in seen.values())


def test_prompts_are_the_trace_token_ids_folded_into_the_vocabulary(tiny):
    cfg = tiny[0]
    traces = _trace_set(cfg, lengths=[6], n_prefill=[4])
    routing = TraceRouting(traces, cfg)
    ids = traces[0].token_ids[:4]
    assert routing.prompts == [[int(i) % cfg.vocab_size for i in ids]]
    assert fold_token_ids(np.array([-1, 5, cfg.vocab_size + 3]), cfg) == [0, 5, 3]
    # prompt_tokens overrides n_prefill: the rest of the trace is decoded.
    routing = TraceRouting(traces, cfg, prompt_tokens=2)
    assert len(routing.prompts[0]) == 2 and routing.decode_tokens == 4 and routing.max_new_tokens == 5


def _step(positions, layer, k, router_id=7):
    positions = np.asarray(positions)[None, :]  # [1, T]
    shape = (*positions.shape, k)
    return StepRouting(layer, np.full(shape, router_id, np.int32), np.full(shape, 0.5, np.float32),
                       positions >= 0, None, positions)


@pytest.mark.parametrize("past_end, expected", [("wrap", [2, 3, 0, 1, 2]), ("hold", [2, 3, 3, 3, 3])])
def test_runs_past_the_trace_wrap_or_hold(tiny, past_end, expected):
    cfg = tiny[0]
    traces = _trace_set(cfg, lengths=[4], n_prefill=[2])
    routing = TraceRouting(traces, cfg, decode_tokens=5, past_end=past_end)
    ids, _ = routing(_step([2, 3, 4, 5, 6], 1, cfg.top_k))
    np.testing.assert_array_equal(ids[0], traces[0].experts[expected, 1])
    ids, _ = routing(_step([-1, 0], 0, cfg.top_k))
    assert ids[0, 0].tolist() == [7] * cfg.top_k  # padding: the router's own choice


def test_weights_follow_the_model_normalisation():
    k = 2
    mixtral = tiny_config("mixtral", num_layers=2, top_k=k)  # renormalises its top-k
    rng = np.random.default_rng(0)
    L, E = mixtral.num_moe_layers, mixtral.num_experts
    raw = np.array([[[0.3, 0.1]] * L, [[0.2, 0.2]] * L], np.float32)  # [T=2, L, k]
    meta = TraceMeta(model="t", num_layers=L, num_experts=E, top_k=k, moe_layer_ids=mixtral.moe_layers,
                     hidden_size=None, source="t")
    trace = PromptTrace(0, "", "", np.arange(2, dtype=np.int32), _random_experts(rng, 2, L, E, k), raw, 1)
    _, w = TraceRouting(TraceSet.from_prompts(meta, [trace]), mixtral)(_step([0, 1], 0, k))
    np.testing.assert_allclose(w[0], [[0.75, 0.25], [0.5, 0.5]], rtol=1e-3)
    # DeepSeek: no renormalisation, weights as recorded; without weights 1/k times the routed factor.
    ds = tiny_config("deepseek_v2", num_layers=3, routed_scaling_factor=2.0)
    ds_meta = TraceMeta(model="t", num_layers=2, num_experts=8, top_k=k, moe_layer_ids=(1, 2), hidden_size=None,
                        source="t")
    _, w = TraceRouting(TraceSet.from_prompts(ds_meta, [trace]), ds)(_step([0, 1], 0, k))
    np.testing.assert_allclose(w[0], raw[:, 0], rtol=1e-3)
    bare = PromptTrace(0, "", "", np.arange(2, dtype=np.int32), trace.experts, None, 1)
    _, w = TraceRouting(TraceSet.from_prompts(ds_meta, [bare]), ds)(_step([0, 1], 0, k))
    np.testing.assert_allclose(w[0], np.full((2, k), 2.0 / k))


# ------------------------------------------------------------------ hit rates


def _lru_hits_engine_semantics(traces, L, slots) -> tuple[int, int]:
    """Independent count for batch 1, one token per step: per layer, the token's experts
    (sorted, as the engine's np.unique orders them) are looked up; hits move to most recent,
    misses are inserted most recent, evicting the least recent expert this token does not use."""
    hits = misses = 0
    caches = [OrderedDict() for _ in range(L)]
    for trace in traces:
        for t in range(trace.n_tokens):
            for layer in range(L):
                needed = sorted(set(int(e) for e in trace.experts[t, layer]))
                cache = caches[layer]
                missing = [e for e in needed if e not in cache]
                for e in needed:
                    if e in cache:
                        hits += 1
                        cache.move_to_end(e)
                for e in missing:
                    misses += 1
                    if len(cache) >= slots:
                        victim = next(x for x in cache if x not in needed)
                        del cache[victim]
                    cache[e] = None
    return hits, misses


def _replay_counts(tiny, traces, slots):
    """Engine hits and misses over the whole replay: batch 1, one prompt token, the rest decoded."""
    out = run_forced_replay(None, traces, len(traces), engine=_engine(tiny, slots), prompt_tokens=1,
                            decode_tokens=None)
    return out["device_hits_with_prefill"], out["device_misses_with_prefill"], out


def test_hand_computed_lru_count(make_traces, tiny):
    # Layer 0, 3 slots (LRU order oldest..newest after each token):
    #   {0,1}: 2 misses -> 0,1 | {1,2}: hit 1, miss 2 -> 0,1,2 | {0,3}: hit 0, miss 3 evicts 1 -> 2,0,3
    #   {1,2}: hit 2, miss 1 evicts 0 -> 3,2,1 | {0,1}: hit 1, miss 0 evicts 3 -> 2,1,0   => 4 hits, 6 misses
    # Layer 1: {4,5} five times => 2 misses, then 8 hits.                               => 12 hits, 8 misses
    layer0 = [[0, 1], [1, 2], [0, 3], [1, 2], [0, 1]]
    experts = np.array([[l0, [4, 5]] for l0 in layer0], np.int16)  # [T=5, L=2, k=2]
    traces = make_traces([experts], 8)
    hits, misses, out = _replay_counts(tiny, traces, 3)
    assert (hits, misses) == (12, 8)
    assert _lru_hits_engine_semantics(traces, 2, 3) == (12, 8)
    assert out["decode_tokens"] == 4 and out["compiles"] == out["decode_compiles"] == 0


@pytest.mark.parametrize("slots", [3, 5])
def test_hit_counts_equal_an_independent_lru_on_random_traces(make_traces, tiny, slots):
    cfg = tiny[0]
    rng = np.random.default_rng(slots)
    traces = make_traces([_random_experts(rng, t, 2, 8, 2) for t in (9, 6, 12)], 8)
    hits, misses, _ = _replay_counts(tiny, traces, slots)
    assert (hits, misses) == _lru_hits_engine_semantics(traces, cfg.num_moe_layers, slots)


@pytest.mark.parametrize("slots", [2, 8])
def test_hit_rate_equals_the_lru_simulator(make_traces, tiny, slots):
    # With k slots per layer the cache holds exactly the last token's experts, with E slots it
    # never evicts: either way the order in which one token's experts are touched cannot matter,
    # so the engine and the simulator (zero latency, per-layer pools, running cache) must agree.
    cfg = tiny[0]
    rng = np.random.default_rng(10 + slots)
    traces = make_traces([_random_experts(rng, t, 2, 8, 2) for t in (10, 7, 12)], 8)
    hits, misses, _ = _replay_counts(tiny, traces, slots)
    sim = simulate(traces, get_predictor("lru"),
                   SimConfig(capacity=slots * cfg.num_moe_layers, per_layer=True, zero_latency=True))
    assert (hits, hits + misses) == (sim.hits, sim.accesses)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("change, what", [(dict(num_layers=3), "MoE layers"), (dict(num_experts=16), "routed experts"),
                                          (dict(top_k=3), "top-k")])
def test_shape_mismatch_is_a_clear_error(tiny, change, what):
    cfg = tiny[0]
    fields = dict(num_layers=2, num_experts=8, top_k=2)
    fields.update(change)
    meta = TraceMeta(model="t", moe_layer_ids=tuple(range(fields["num_layers"])), hidden_size=None, source="t", **fields)
    rng = np.random.default_rng(0)
    trace = PromptTrace(0, "", "", np.arange(3, dtype=np.int32),
                        _random_experts(rng, 3, fields["num_layers"], fields["num_experts"], fields["top_k"]), None, 2)
    with pytest.raises(ForcedRoutingError, match=what):
        TraceRouting(TraceSet.from_prompts(meta, [trace]), cfg)
    with pytest.raises(ForcedRoutingError, match=what):  # a plain list of PromptTrace is checked too
        bad = PromptTrace(0, "", "", np.arange(3, dtype=np.int32),
                          np.full((3, fields["num_layers"], fields["top_k"]), fields["num_experts"] - 1, np.int16),
                          None, 2)
        TraceRouting([bad], cfg)


def test_bad_use_is_a_clear_error(tiny):
    cfg = tiny[0]
    traces = _trace_set(cfg, lengths=[5, 3], n_prefill=[2, 2])
    with pytest.raises(ForcedRoutingError, match="fewer than the 4 prompt tokens"):
        TraceRouting(traces, cfg, prompt_tokens=4)
    with pytest.raises(ForcedRoutingError, match="outside the 2 traces"):
        TraceRouting(traces, cfg, [0, 2])
    with pytest.raises(ForcedRoutingError, match="past_end"):
        TraceRouting(traces, cfg, past_end="loop")
    routing = TraceRouting(traces, cfg)
    engine = _engine(tiny, 2)
    with forced_routing(engine, routing), pytest.raises(ForcedRoutingError, match="runs 1 prompts but"):
        engine.generate(routing.prompts[:1], 2, stop_at_eos=False)
    assert engine.routing_override is None  # restored after the block
    with pytest.raises(ForcedRoutingError, match="only 0 of 2"):
        run_forced_replay(None, traces, 1, engine=engine, prompt_tokens=2, decode_tokens=10)


# ------------------------------------------------------------------ the replay model


def test_scaled_deepseek_shape():
    cfg = scaled_config("deepseek-v2-lite", 0.25, vocab_size=4096)
    assert (cfg.hidden_size, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size) == (512, 352, 704)
    assert (cfg.num_moe_layers, cfg.moe_layers[0], cfg.num_experts, cfg.top_k) == (26, 1, 64, 6)
    assert (cfg.attention, cfg.num_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank) == ("mla", 4, 128, 128)
    assert cfg.vocab_size == 4096 and cfg.bos_token_id == 1
    full = scaled_config("deepseek-v2-lite", 1.0, vocab_size=None)
    assert full.expert_params * 2 == 17_301_504  # 17.3 MB per bf16 expert, as the traces' README says
    mixtral = scaled_config("mixtral-8x7b", 0.125)
    assert (mixtral.hidden_size, mixtral.num_heads, mixtral.num_kv_heads, mixtral.num_experts) == (512, 4, 1, 8)


def test_replay_model_weights():
    model = forced_replay_model("deepseek-v2-lite", scale=1 / 32, seed=0, vocab_size=256)
    cfg = model.cfg
    assert (cfg.num_moe_layers, cfg.num_experts, cfg.top_k, cfg.vocab_size) == (26, 64, 6, 256)
    assert model.expert_bytes_total == 26 * 64 * 3 * cfg.hidden_size * cfg.moe_intermediate_size * 2
    for layer, expert in [(0, 0), (25, 63)]:
        weights = model.source.read(layer, expert)
        for name, fan_in in (("gate", cfg.hidden_size), ("down", cfg.moe_intermediate_size)):
            w = weights[name]
            assert w.dtype == ml_dtypes.bfloat16
            rms = float(np.sqrt(np.mean(w.astype(np.float32) ** 2)))
            assert 0.5 < rms * fan_in ** 0.5 < 2.0
    assert not np.array_equal(model.source.read(0, 0)["gate"], model.source.read(0, 1)["gate"])


# ------------------------------------------------------------------ CLI


def _write_dsv2_like_traces(path, n_prompts=10, tokens=5):
    from emoe_jax.traces import TraceWriter

    rng = np.random.default_rng(3)
    meta = TraceMeta(model="t", num_layers=26, num_experts=64, top_k=6, moe_layer_ids=tuple(range(1, 27)),
                     hidden_size=None, source="t")
    with TraceWriter(path, meta) as writer:
        for i in range(n_prompts):
            writer.add(PromptTrace(i + 1, "puffin", "", np.arange(tokens, dtype=np.int32),
                                   _random_experts(rng, tokens, 26, 64, 6), None, tokens))


def test_bench_replay_cli(tmp_path, capsys):
    import json

    from emoe_jax.bench.replay import main

    traces = tmp_path / "traces"
    _write_dsv2_like_traces(traces)
    out = tmp_path / "replay.json"
    args = ["--traces", str(traces), "--prompts", "1", "--prompt-tokens", "2", "--decode-tokens", "2",
            "--fractions", "0.25", "--scale", str(1 / 32), "--vocab", "256", "--no-progress"]
    assert main(args + ["--json", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["prompt_ids"] == [9]  # validation side: the highest 20% of ids (9, 10)
    (row,) = result["rows"]
    # The DeepSeek-V2-Lite shape ran: 26 MoE layers x top-6 lookups per decode token.
    assert row["slots"] == 16 and row["decode_tokens"] == 2 and row["decode_compiles"] == 0
    assert row["device_hits"] + row["device_misses"] == 2 * 26 * 6
    assert 0 <= row["device_hit_rate"] <= 1 and 0 <= row["sim_lru_hit_rate"] <= 1
    # Bad input: one "error:" line, exit status 2, before any model is built.
    assert main(["--traces", str(tmp_path / "missing")]) == 2
    assert main(args + ["--fractions", "1.5"]) == 2  # the last --fractions counts
    assert main(args + ["--prompts", "5"]) == 2  # only 2 validation prompts
    assert main(args + ["--policy", "score"]) == 2  # score eviction without a predictor
    assert main(args + ["--eviction-scores", "reuse"]) == 2  # reuse scores without score eviction
    err = capsys.readouterr().err
    assert err.count("error:") == 5 and "Traceback" not in err
    assert "no trace set" in err and "--fractions=1.5" in err and "only 2 of 2" in err
    assert "predictor's scores" in err and "add --policy score" in err
