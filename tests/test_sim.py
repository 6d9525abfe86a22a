"""Simulator: hand-computed cache and cost cases, the compiled kernel against the
plain reference, the MoE-Beyond protocol, clear errors, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emoe_jax.predict import BasePredictor, Prediction, get_predictor
from emoe_jax.sim import SimConfig, SimConfigError, simulate, split_by_prompt_id
from emoe_jax.sim.__main__ import main as sim_main
from sim_reference import simulate_reference
from emoe_jax.sim.requests import next_use_table, ranked_experts, ranked_experts_reference

from emoe_jax.traces import TraceWriter

MS = 1e-3


@pytest.fixture(scope="module")
def sequence(make_traces):
    def sequence(*experts):
        """One layer, top-1: token t routes to experts[t]."""
        return make_traces([np.array(experts).reshape(-1, 1, 1)], num_experts=8)

    return sequence


ZERO = SimConfig(zero_latency=True, lookahead_layers=0)


# -- hand-computed cache behaviour ------------------------------------------------


def test_lru_misses_by_hand(sequence):
    # capacity 2, accesses 0 1 2 0 1 3 0
    # 0 miss [0]; 1 miss [0 1]; 2 miss evict 0 [1 2]; 0 miss evict 1 [2 0];
    # 1 miss evict 2 [0 1]; 3 miss evict 0 [1 3]; 0 miss evict 1 [3 0]  -> 7 misses, 0 hits
    r = simulate(sequence(0, 1, 2, 0, 1, 3, 0), get_predictor("lru"), ZERO.with_(capacity=2))
    assert (r.accesses, r.demand_misses, r.hits) == (7, 7, 0)


def test_belady_min_misses_by_hand(sequence):
    # capacity 2, accesses 0 1 2 0 1 3 0 (steps 0..6)
    # 0 miss; 1 miss; 2 miss: next uses 0@3, 1@4 -> evict 1 [0 2]; 0 hit;
    # 1 miss: next uses 0@6, 2 never -> evict 2 [0 1]; 3 miss: 0@6, 1 never -> evict 1 [0 3];
    # 0 hit  -> 5 misses, 2 hits
    r = simulate(sequence(0, 1, 2, 0, 1, 3, 0), get_predictor("belady"), ZERO.with_(capacity=2))
    assert (r.demand_misses, r.hits) == (5, 2)
    assert r.oracle


def test_lfu_by_hand(sequence):
    # capacity 2, accesses 0 0 1 2 1 0
    # 0 miss; 0 hit (f0=2); 1 miss [0 1]; 2 miss: f0=2, f1=1 -> evict 1 [0 2];
    # 1 miss: f0=2, f2=1 -> evict 2 [0 1]; 0 hit -> 4 misses, 2 hits
    r = simulate(sequence(0, 0, 1, 2, 1, 0), get_predictor("lfu"), ZERO.with_(capacity=2))
    assert (r.demand_misses, r.hits) == (4, 2)


def test_capacity_fraction_and_pools(make_traces):
    traces = make_traces([np.zeros((1, 4, 2), int) + np.array([0, 1])], num_experts=10)  # L=4, E=10, k=2
    assert SimConfig(capacity=0.1).pools(4, 10, 2) == (1, 4)  # int(0.1 * 40)
    assert SimConfig(capacity=0.2, per_layer=True).pools(4, 10, 2) == (4, 2)
    with pytest.raises(SimConfigError, match="below top-k"):
        SimConfig(capacity=0.1, per_layer=True).pools(4, 10, 2)
    r = simulate(traces, get_predictor("lru"), SimConfig(capacity=8))
    assert r.capacity_experts == 8


# -- cost model arithmetic ---------------------------------------------------------


def test_demand_misses_charge_full_transfer_time(make_traces):
    # 10 MB experts over 10 GB/s -> 1 ms per transfer; compute 0.5 ms per layer.
    # L=2, k=1, tokens route (e0, e1) then (e0, e1); the cache holds all.
    # step 0: miss, wait 1 ms; step 1: miss, wait 1 ms; steps 2, 3: hits.
    # stall = 2 ms over 2 tokens = 1 ms/token; bytes = 2 x 10 MB / 2 tokens = 10 MB/token.
    traces = make_traces([np.array([[[0], [1]], [[0], [1]]])], num_experts=4)
    cfg = SimConfig(capacity=8, expert_bytes=10e6, bandwidth_gbps=10.0, layer_compute_ms=0.5)
    d = simulate(traces, get_predictor("lru"), cfg).to_dict()
    assert (d["demand_misses"], d["hits"]) == (2, 2)
    assert d["stall_ms_per_token"] == pytest.approx(1.0)
    assert d["bytes_per_token"] == pytest.approx(10e6)


def test_misses_of_one_step_serialise_on_one_link_and_overlap_on_two(make_traces):
    # k=2, both experts missing: one link -> 2 ms stall, two links -> 1 ms.
    traces = make_traces([np.array([[[0, 1]]])], num_experts=4)
    cfg = SimConfig(capacity=4, expert_bytes=10e6, bandwidth_gbps=10.0, layer_compute_ms=0.5)
    assert simulate(traces, get_predictor("lru"), cfg).stall_seconds == pytest.approx(2 * MS)
    assert simulate(traces, get_predictor("lru"), cfg.with_(links=2)).stall_seconds == pytest.approx(1 * MS)


def test_late_prefetch_is_stall_not_hit_and_early_one_is_timely(make_traces):
    # Oracle prefetch, lookahead 1, 1 ms transfers, 2 ms compute; one token, L=2, k=1: e0 then e1.
    # step 0 at t=0: prefetch e0 (target step 0) starts at 0, ready 1 ms; e1 queued (link busy).
    #   demand e0: in transfer -> LATE, stall 1 ms; now = 1 + 2 = 3 ms.
    # step 1: e1 started at 1 ms when the link freed, ready at 2 ms <= 3 ms -> TIMELY hit.
    traces = make_traces([np.array([[[0], [1]]])], num_experts=4)
    cfg = SimConfig(capacity=8, expert_bytes=10e6, bandwidth_gbps=10.0, layer_compute_ms=2.0, lookahead_layers=1)
    r = simulate(traces, get_predictor("oracle-prefetch", lookahead=1), cfg)
    assert (r.late_prefetches, r.timely_prefetches, r.hits, r.demand_misses) == (1, 1, 1, 0)
    assert r.stall_seconds == pytest.approx(1 * MS)
    assert r.to_dict()["timely_prefetch_rate"] == pytest.approx(0.5)


def test_wrong_prefetch_is_waste_and_costs_bandwidth(make_traces):
    class Wrong(BasePredictor):
        name = "wrong"

        def predict(self, t, l):  # always predicts expert 3 for the next step
            return Prediction(np.array([[(l + 1) // 2, (l + 1) % 2]]), np.eye(4, dtype=np.float32)[[3]])

    # L=2, tokens route e0, e1, e0, e1; capacity 2 per pool (per layer), compute ample.
    traces = make_traces([np.array([[[0], [1]], [[0], [1]]])], num_experts=4)
    cfg = SimConfig(capacity=4, per_layer=True, expert_bytes=10e6, bandwidth_gbps=10.0, layer_compute_ms=5.0)
    r = simulate(traces, Wrong(), cfg)
    assert r.prefetches_used == 0 and r.prefetches_started > 0
    assert r.bytes_moved == pytest.approx((r.prefetches_started + r.demand_transfers) * 10e6)


def test_repeated_pattern_reaches_full_hit_rate(make_traces):
    # Every token routes to the same experts: after warm-up, frequency and
    # previous-token predictors (and plain LRU) hit every access.
    pattern = np.array([[1, 2], [3, 4], [5, 6]])
    traces = make_traces([np.tile(pattern, (12, 1, 1))], num_experts=8)
    cfg = SimConfig(capacity=6, layer_compute_ms=2.0, warmup_tokens=1)
    for name in ["static-freq", "prev-token", "moe-infinity-beyond"]:
        p = get_predictor(name, lookahead=1)
        p.fit(traces)
        r = simulate(traces, p, cfg)
        assert r.hit_rate == 1.0, name
        assert r.prediction["recall@2"] == 1.0, name


# -- MoE-Beyond protocol -------------------------------------------------------------


def test_moe_beyond_protocol_excludes_warmup_and_moves_nothing_in_time(make_traces):
    rng = np.random.default_rng(0)
    traces = make_traces([rng.integers(0, 8, (15, 2, 1)), rng.integers(0, 8, (5, 2, 1))], num_experts=8)
    r = simulate(traces, get_predictor("lru"), SimConfig.moe_beyond(capacity=4))
    assert r.tokens == 5  # 15 - 10 warm-up tokens; the 5-token prompt is all warm-up
    assert r.stall_seconds == 0.0


def test_zero_latency_prefetch_of_current_layer_is_a_hit(make_traces):
    traces = make_traces([np.array([[[0], [1]], [[2], [3]]])], num_experts=4)
    r = simulate(traces, get_predictor("oracle-prefetch", lookahead=0), SimConfig.moe_beyond(capacity=2, warmup_tokens=0, initial_fill="empty"))
    assert r.hit_rate == 1.0 and r.timely_prefetches == 4


# -- compiled kernel against the plain reference ---------------------------------------


@pytest.fixture(scope="module")
def random_traces(make_traces):
    def random_traces(seed, prompts=3, L=3, E=6, k=2, max_tokens=9):
        rng = np.random.default_rng(seed)
        return make_traces(
            [
                np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(L)]) for _ in range(int(n))])
                for n in rng.integers(1, max_tokens, prompts)
            ],
            E,
        )

    return random_traces


CONFIGS = {
    "timed": SimConfig(capacity=5, expert_bytes=1e6, bandwidth_gbps=1.0, layer_compute_ms=0.7),
    "two-links-lookahead3": SimConfig(capacity=6, expert_bytes=1e6, bandwidth_gbps=1.0, layer_compute_ms=0.3,
                                      links=2, lookahead_layers=3),  # fmt: skip
    "slow-link": SimConfig(capacity=4, expert_bytes=3e6, bandwidth_gbps=1.0, layer_compute_ms=0.5, lookahead_layers=2),
    "per-layer": SimConfig(capacity=9, per_layer=True, expert_bytes=1e6, bandwidth_gbps=1.0, layer_compute_ms=0.4),
    "score": SimConfig(capacity=5, eviction="score", expert_bytes=1e6, bandwidth_gbps=1.0, layer_compute_ms=0.5),
    "moe-beyond": SimConfig.moe_beyond(capacity=5, warmup_tokens=2),
    "cost-admission": SimConfig(capacity=5, eviction="score", admission="cost", lookahead_layers=3, expert_bytes=1e6,
                                bandwidth_gbps=2.0, layer_compute_ms=0.3),  # fmt: skip
    "host-only": SimConfig(capacity=5, miss_mode="host", host_bandwidth_gbps=4.0, expert_bytes=1e6,
                           bandwidth_gbps=1.0, layer_compute_ms=0.5),  # fmt: skip
    "host-choose": SimConfig(capacity=5, eviction="score", miss_mode="choose", host_bandwidth_gbps=2.0,
                             host_overhead_ms=0.1, expert_bytes=1e6, bandwidth_gbps=1.0, layer_compute_ms=0.5,
                             lookahead_layers=2),  # fmt: skip
    "bypass": SimConfig(capacity=7, eviction="score", demand_admission="bypass", expert_bytes=1e6,
                        bandwidth_gbps=1.0, layer_compute_ms=0.5, lookahead_layers=2),  # fmt: skip
    "bypass-per-layer-no-prefetch": SimConfig(capacity=12, per_layer=True, eviction="score", demand_admission="bypass",
                                              prefetch_k=0, expert_bytes=1e6, bandwidth_gbps=1.0,
                                              layer_compute_ms=0.5),  # fmt: skip
    "routed-issue": SimConfig(capacity=5, eviction="score", prefetch_issue="routed", lookahead_layers=0,
                              expert_bytes=1e6, bandwidth_gbps=1.0, layer_compute_ms=0.5),  # fmt: skip
    "routed-issue-cost-bypass": SimConfig(capacity=7, eviction="score", admission="cost", demand_admission="bypass",
                                          prefetch_issue="routed", lookahead_layers=2, links=2, warmup_tokens=1,
                                          expert_bytes=1e6, bandwidth_gbps=2.0, layer_compute_ms=0.3),  # fmt: skip
    "reuse-scores-routed": SimConfig(capacity=5, eviction="score", eviction_scores="reuse", prefetch_issue="routed",
                                     lookahead_layers=1, expert_bytes=1e6, bandwidth_gbps=1.0, layer_compute_ms=0.5),  # fmt: skip
    "lrfu-bypass-routed": SimConfig(capacity=7, eviction="score", eviction_scores="reuse", crf_weight=0.3, crf_decay=0.8,
                                    demand_admission="bypass", prefetch_issue="routed", lookahead_layers=1,
                                    expert_bytes=1e6, bandwidth_gbps=1.0, layer_compute_ms=0.5),  # fmt: skip
    "lrfu-latest-per-layer": SimConfig(capacity=9, per_layer=True, eviction="score", crf_weight=0.5, crf_decay=0.5,
                                       expert_bytes=1e6, bandwidth_gbps=1.0, layer_compute_ms=0.4),  # fmt: skip
    "distance-reuse-routed": SimConfig(capacity=7, eviction="score", eviction_scores="reuse", distance_weight=2.0,
                                       prefetch_issue="routed", lookahead_layers=1, expert_bytes=1e6,
                                       bandwidth_gbps=1.0, layer_compute_ms=0.5),  # fmt: skip
    "distance-lrfu-bypass": SimConfig(capacity=7, eviction="score", eviction_scores="reuse", distance_weight=0.7,
                                      crf_weight=0.3, crf_decay=0.8, demand_admission="bypass", lookahead_layers=2,
                                      expert_bytes=1e6, bandwidth_gbps=1.0, layer_compute_ms=0.5),  # fmt: skip
    "full-layer-lookahead": SimConfig(capacity=7, lookahead_layers=3, prefetch_k=3, expert_bytes=1e6,
                                      bandwidth_gbps=2.0, layer_compute_ms=0.2, reset_per_prompt=True,
                                      initial_fill="random", seed=3),  # fmt: skip
}
REFERENCE_KEYS = {
    "accesses": "accesses", "hits": "hits", "timely": "timely_prefetches", "late": "late_prefetches",
    "misses": "demand_misses", "issued": "prefetches_issued", "started": "prefetches_started",
    "used": "prefetches_used", "wasted": "prefetches_wasted", "cancelled": "prefetches_cancelled",
    "demand": "demand_transfers", "tokens": "tokens", "evictions": "evictions", "refused": "prefetches_refused",
    "host": "host_computes", "bypassed": "demand_bypassed",
}  # fmt: skip


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", ["lru", "lfu", "belady", "static-freq", "prev-token", "causal-table", "moe-infinity",
                                  "oracle-prefetch"])  # fmt: skip
def test_kernel_matches_reference(random_traces, name, config_name):
    config = CONFIGS[config_name]
    for seed in range(2):
        traces = random_traces(seed)
        fast = get_predictor(name, ignore_unknown=True, lookahead=config.lookahead_layers)
        slow = get_predictor(name, ignore_unknown=True, lookahead=config.lookahead_layers)
        fast.fit(traces)
        slow.fit(traces)
        got = simulate(traces, fast, config).to_dict()
        want = simulate_reference(traces, slow, config)
        for ref_key, key in REFERENCE_KEYS.items():
            assert got[key] == want[ref_key], (key, got[key], want[ref_key])
        assert got["stall_seconds"] == pytest.approx(want["stall"], rel=1e-9, abs=1e-12)
        assert got["bytes_moved"] == pytest.approx(want["bytes"])
        assert got["host_seconds"] == pytest.approx(want["host_seconds"], rel=1e-9, abs=1e-12)


def test_ranking_and_next_use_match_plain_definitions():
    rng = np.random.default_rng(0)
    scores = rng.integers(-2, 3, (200, 16)).astype(np.float32) / 2
    for m in (1, 6, 16):
        a, av = ranked_experts(scores, m, 0.0)
        b, bv = ranked_experts_reference(scores, m, 0.0)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(av, bv)
    keys = rng.integers(0, 5, (30, 1))
    nxt, first = next_use_table(keys, 6)
    for g in range(30):
        later = [h for h in range(g + 1, 30) if keys[h, 0] == keys[g, 0]]
        assert nxt[g, 0] == (later[0] if later else 2**62)
    assert first[5] == 2**62 and all(first[v] == list(keys[:, 0]).index(v) for v in set(keys[:, 0]))


# -- errors and CLI ---------------------------------------------------------------------


def test_bad_settings_give_clear_errors(sequence):
    traces = sequence(0, 1)
    with pytest.raises(SimConfigError, match="below top-k"):
        simulate(traces, get_predictor("lru"), SimConfig(capacity=0.01))
    with pytest.raises(SimConfigError, match="lookahead"):
        simulate(traces, get_predictor("lru"), SimConfig(capacity=2, lookahead_layers=5))
    with pytest.raises(SimConfigError, match="eviction"):
        simulate(traces, get_predictor("lru"), SimConfig(capacity=2, eviction="fifo"))
    with pytest.raises(SimConfigError, match="no prompts"):
        simulate(traces.select([]), get_predictor("lru"), SimConfig(capacity=2))


def test_split_by_prompt_id_is_contiguous(make_traces):
    traces = make_traces([np.zeros((1, 1, 1), int)] * 10, 4, ids=[9, 3, 5, 1, 7, 2, 8, 4, 6, 10])
    train, val = split_by_prompt_id(traces, 0.2)
    assert sorted(train.prompt_ids) == list(range(1, 9)) and list(val.prompt_ids) == [9, 10]
    with pytest.raises(ValueError, match="fraction"):
        split_by_prompt_id(traces, 1.5)


def test_cli_json_and_errors(random_traces, tmp_path, capsys):
    traces = random_traces(5, prompts=6)
    path = tmp_path / "traces"
    with TraceWriter(path, traces.meta) as w:
        for p in traces:
            w.add(p)
    assert sim_main(["--traces", str(path), "--predictor", "static-freq", "--capacity", "6", "--split", "0.5",
                     "--json", "--no-progress"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert out["predictor"] == "static-freq" and 0 <= out["hit_rate"] <= 1
    assert out["split"]["train_prompts"] == 3 and "recall@2" in out["prediction"]
    assert sim_main(["--traces", str(path), "--predictor", "causal-table", "--capacity", "8", "--split", "0.5",
                     "--eviction", "score", "--demand-admission", "bypass", "--prefetch-issue", "routed",
                     "--lookahead-layers", "0", "--eviction-scores", "reuse", "--crf-weight", "0.1",
                     "--distance-weight", "1.5", "--json", "--no-progress"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["demand_admission"] == "bypass" and out["config"]["prefetch_issue"] == "routed"
    assert out["config"]["eviction_scores"] == "reuse" and out["config"]["crf_weight"] == 0.1
    assert out["config"]["distance_weight"] == 1.5
    assert (out["capacity_experts"], out["scratch_slots"]) == (6, 2) and 0 <= out["hit_rate"] <= 1
    assert sim_main(["--traces", str(path), "--predictor", "nope"]) == 2
    assert "unknown predictor" in capsys.readouterr().err
    assert sim_main(["--traces", str(tmp_path / "missing"), "--predictor", "lru"]) == 2
    assert sim_main(["--traces", str(path), "--predictor", "static-freq", "--capacity", "6", "--no-progress"]) == 2
    assert "fit" in capsys.readouterr().err


# -- per-task breakdown and the CLI's router weights for spec-gating ----------------------


def _with_tasks(traces, tasks):
    from dataclasses import replace

    from emoe_jax.traces import TraceSet

    return TraceSet.from_prompts(traces.meta, [replace(p, task=t) for p, t in zip(traces, tasks)])


@pytest.mark.parametrize("config_name", ["timed", "two-links-lookahead3"])
def test_per_task_counters_sum_to_totals_and_equal_separate_replays(random_traces, config_name):
    traces = _with_tasks(random_traces(11, prompts=7), ["a", "b", "a", "c", "b", "a", "c"])
    config = CONFIGS[config_name]
    res = simulate(traces, get_predictor("prev-token", lookahead=config.lookahead_layers), config).to_dict()
    per = res["per_task"]
    assert sorted(per) == ["a", "b", "c"] and [per[t]["prompts"] for t in "abc"] == [3, 2, 2]
    for key in ("tokens", "accesses", "hits", "timely_prefetches", "late_prefetches", "demand_misses"):
        assert sum(c[key] for c in per.values()) == res[key], key
    assert sum(c["stall_seconds"] for c in per.values()) == pytest.approx(res["stall_seconds"])
    # With a fresh empty cache per prompt, prompts are independent: a task's share equals
    # replaying that task's prompts alone.
    fresh = config.with_(reset_per_prompt=True)
    res = simulate(traces, get_predictor("prev-token", lookahead=config.lookahead_layers), fresh).to_dict()
    for task in "abc":
        alone = simulate(traces.select([i for i, p in enumerate(traces) if p.task == task]),
                         get_predictor("prev-token", lookahead=config.lookahead_layers), fresh).to_dict()  # fmt: skip
        for key in ("tokens", "accesses", "hits", "demand_misses"):
            assert res["per_task"][task][key] == alone[key], (task, key)
        assert res["per_task"][task]["hit_rate"] == pytest.approx(alone["hit_rate"])
        assert res["per_task"][task]["stall_ms_per_token"] == pytest.approx(alone["stall_ms_per_token"])


@pytest.fixture(scope="module")
def tiny_model_checkpoint(tmp_path_factory):
    """A converted tiny qwen3_moe checkpoint (3 MoE layers x 8 experts, top-2, hidden 32)."""
    from emoe_jax.checkpoint import write_checkpoint
    from emoe_jax.config import tiny_config
    from emoe_jax.model.hf_params import nest_for_checkpoint, params_to_hf
    from emoe_jax.model.random_init import random_model

    cfg = tiny_config("qwen3_moe")
    _, params, experts = random_model(cfg, seed=0)
    stacked = {w: np.stack([np.asarray(layer[j]) for layer in experts]) for j, w in enumerate(("gate", "up", "down"))}
    path = tmp_path_factory.mktemp("sim_ckpt") / "ckpt"
    write_checkpoint(path, cfg, nest_for_checkpoint(params_to_hf(cfg, params)), stacked)
    return path, cfg


def test_cli_model_checkpoint_gives_spec_gating_its_routers(tiny_model_checkpoint, tmp_path, capsys):
    """Traces routed by the checkpoint's own routers on depth-constant inputs: spec-gating is exact."""
    from emoe_jax.predict.spec_gating import load_routers
    from emoe_jax.traces import PromptTrace, TraceMeta

    ckpt, cfg = tiny_model_checkpoint
    routers, _, layer_ids = load_routers(ckpt)  # [L, E, H]
    L, E, H = routers.shape
    meta = TraceMeta(model=str(ckpt), num_layers=L, num_experts=E, top_k=cfg.top_k, moe_layer_ids=layer_ids,
                     hidden_size=H, source="test")  # fmt: skip
    rng = np.random.default_rng(0)
    path = tmp_path / "traces"
    with TraceWriter(path, meta) as w:
        for pid in range(4):
            hidden = np.repeat(rng.normal(size=(10, 1, H)), L, axis=1).astype(np.float16)  # [T, L, H]
            logits = np.einsum("leh,tlh->tle", routers, hidden.astype(np.float32))
            experts = np.argsort(-logits, axis=-1)[..., : cfg.top_k].astype(np.int16)  # [T, L, k]
            w.add(PromptTrace(prompt_id=pid, task="t", text="", token_ids=np.arange(10, dtype=np.int32),
                              experts=experts, weights=None, n_prefill=10, hidden=hidden))  # fmt: skip
    args = ["--traces", str(path), "--predictor", "spec-gating", "--capacity", "0.5", "--json", "--no-progress"]
    assert sim_main([*args, "--model-checkpoint", str(ckpt)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["predictor"] == "spec-gating" and out["prediction"]["rows"] > 0
    assert out["prediction"][f"recall@{cfg.top_k}"] == pytest.approx(1.0)
    assert sim_main(args) == 2
    assert "--model-checkpoint" in capsys.readouterr().err
    assert sim_main([*args, "--model-checkpoint", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_layer_time_measurement_reports_consistent_figures(tiny_model_checkpoint, tmp_path, capsys):
    from emoe_jax.bench.layer_time import main as layer_time_main
    from emoe_jax.bench.layer_time import measure_layer_time

    ckpt, cfg = tiny_model_checkpoint
    out = measure_layer_time(ckpt, new_tokens=3, prompt_len=4, repeats=2)
    assert out["num_layers"] == cfg.num_layers and out["batch"] == 1
    for name in ("fused", "engine"):
        r = out[name]
        assert len(r["rates"]) == 2 and r["decode_tokens_per_s"] > 0
        assert r["ms_per_layer"] * cfg.num_layers == pytest.approx(r["ms_per_token"])
        assert r["ms_per_token"] * r["decode_tokens_per_s"] == pytest.approx(1e3)
    assert out["engine"]["device_hit_rate"] == 1.0  # every expert resident: no transfer in the time
    assert layer_time_main(["--model", str(tmp_path / "none")]) == 2
    assert "not a converted checkpoint" in capsys.readouterr().err
    assert layer_time_main(["--model", str(ckpt), "--new-tokens", "1"]) == 2


# -- host compute of misses and cost-aware admission (hand-worked) -------------------


class FixedReuse(BasePredictor):
    """No prefetch; after every step each expert's predicted reuse is ``p``."""

    name = "fixed-reuse"

    def __init__(self, p):
        super().__init__(lookahead=0)
        self.p = p

    def reuse(self, t, l):
        return np.full(8, self.p, np.float32)


# 1 MB experts: copy 1 ms over 1 GB/s; host 2 GB/s -> 0.5 ms + 0.1 ms overhead = 0.6 ms; 0.5 ms compute.
HOST = SimConfig(capacity=4, expert_bytes=1e6, bandwidth_gbps=1.0, layer_compute_ms=0.5, host_bandwidth_gbps=2.0,
                 host_overhead_ms=0.1)  # fmt: skip


def test_one_miss_copied_vs_computed_on_the_host(sequence, make_traces):
    # One token, one layer, expert 0: copy waits 1 ms; the host computes it in 0.6 ms.
    one = sequence(0)
    copy = simulate(one, get_predictor("lru"), HOST).to_dict()
    host = simulate(one, get_predictor("lru"), HOST.with_(miss_mode="host")).to_dict()
    assert copy["stall_seconds"] == pytest.approx(1.0 * MS) and copy["ms_per_token"] == pytest.approx(1.5)
    assert host["stall_seconds"] == pytest.approx(0.6 * MS) and host["ms_per_token"] == pytest.approx(1.1)
    assert (host["host_computes"], host["demand_transfers"], host["bytes_moved"]) == (1, 0, 0.0)
    # Used twice: the copy is paid once (then a hit), the host pays every time: 1 ms vs 1.2 ms.
    twice = sequence(0, 0)
    copy2 = simulate(twice, get_predictor("lru"), HOST)
    host2 = simulate(twice, get_predictor("lru"), HOST.with_(miss_mode="host"))
    assert (copy2.hits, copy2.stall_seconds) == (1, pytest.approx(1.0 * MS))
    assert (host2.hits, host2.host_computes, host2.stall_seconds) == (0, 2, pytest.approx(1.2 * MS))
    # Two misses in one step on the host: one overhead, two experts in series (0.1 + 2 x 0.5 ms).
    pair = make_traces([np.array([[[0, 1]]])], num_experts=8)
    r = simulate(pair, get_predictor("lru"), HOST.with_(miss_mode="host"))
    assert r.stall_seconds == pytest.approx(1.1 * MS) and r.host_seconds == pytest.approx(1.1 * MS)


def test_choose_copies_what_will_be_reused(sequence):
    # copy iff (reuse - victim's reuse) x 0.6 ms > 1 ms - 0.6 ms, with a free slot (victim reuse 0):
    # reuse 1.0 -> 0.6 > 0.4: copy (then a hit); reuse 0.5 -> 0.3 < 0.4: host, twice.
    twice = sequence(0, 0)
    sure = simulate(twice, FixedReuse(1.0), HOST.with_(miss_mode="choose"))
    assert (sure.demand_transfers, sure.host_computes, sure.hits) == (1, 0, 1)
    assert sure.stall_seconds == pytest.approx(1.0 * MS)
    unsure = simulate(twice, FixedReuse(0.5), HOST.with_(miss_mode="choose"))
    assert (unsure.demand_transfers, unsure.host_computes, unsure.hits) == (0, 2, 0)
    assert unsure.stall_seconds == pytest.approx(1.2 * MS)
    with pytest.raises(SimConfigError, match="host compute"):
        simulate(twice, FixedReuse(0.5), ZERO.with_(capacity=2, miss_mode="host"))


def test_demand_bypass_keeps_likelier_experts_by_hand(sequence):
    # One layer, top-1, reuse 0.9 / 0.8 / 0.1 for experts 0 / 1 / 2; accesses 0 1 2 0 1 2; 2 cache slots.
    # Score eviction, capacity 2: 0 miss; 1 miss [0 1]; 2 miss evicts 1 (0.8 < 0.9) [0 2]; 0 hit;
    # 1 miss evicts 2 [0 1]; 2 miss evicts 1 [0 2] -> 5 misses, 1 hit.
    # Bypass, capacity 3 = 2 cache slots + 1 scratch (top-k = 1): 0 and 1 fill the cache; 2 (reuse 0.1 <
    # victim 1's 0.8) is copied into the scratch slot and not cached; 0 hit; 1 hit; 2 missed and bypassed
    # again -> 4 misses (4 x 1 ms copies), 2 hits, 2 bypassed, nothing evicted.
    seq = sequence(0, 1, 2, 0, 1, 2)
    reuse = FixedReuse(np.array([0.9, 0.8, 0.1, 0, 0, 0, 0, 0], np.float32))
    score = simulate(seq, reuse, HOST.with_(capacity=2, eviction="score"))
    assert (score.demand_misses, score.hits, score.evictions, score.demand_bypassed) == (5, 1, 3, 0)
    cfg = HOST.with_(capacity=3, eviction="score", demand_admission="bypass")
    assert cfg.pools(1, 8, 1) == (1, 2) and cfg.scratch_slots(1, 1) == 1
    bypass = simulate(seq, reuse, cfg)
    assert (bypass.demand_misses, bypass.hits, bypass.evictions, bypass.demand_bypassed) == (4, 2, 0, 2)
    assert (bypass.capacity_experts, bypass.scratch_slots) == (2, 1)
    assert bypass.demand_transfers == 4 and bypass.stall_seconds == pytest.approx(4.0 * MS)
    # Per-layer pools hold back ceil(top-k / layers) slots each; the capacity must still hold top-k.
    assert SimConfig(capacity=12, per_layer=True, demand_admission="bypass").pools(3, 6, 2) == (3, 3)
    with pytest.raises(SimConfigError, match="scratch"):
        SimConfig(capacity=3, demand_admission="bypass").pools(1, 8, 2)  # 3 - 2 scratch < top-k 2


def test_bypass_configs_bypass_in_the_kernel_reference_comparison(random_traces):
    # The kernel-vs-reference cases above must exercise the bypass branch, not only pass through it.
    for name in ("bypass", "bypass-per-layer-no-prefetch"):
        config = CONFIGS[name]
        pred = get_predictor("causal-table", lookahead=config.lookahead_layers)
        traces = random_traces(0)
        pred.fit(traces)
        assert simulate(traces, pred, config).demand_bypassed > 0, name


def test_prefetch_issued_after_the_previous_step_routed_moves_during_its_compute(sequence, make_traces):
    # One token, two layers routing e0 then e1, exact predictions for the current step (oracle-prefetch,
    # d = 0); 1 ms copies, 0.5 ms compute. Issued at the step's start (default): each copy starts as its
    # step starts, both late, 1 ms stall each = 2 ms. Issued right after layer 0 routed, e1 queues behind
    # layer 0's copy: it starts at 1 ms (while layer 0 computes), arrives at 2 ms, layer 1 starts at
    # 1.5 ms -> 0.5 ms stall, 1.5 ms in all. With 1 ms compute it arrives as layer 1 starts: a timely hit.
    from dataclasses import replace

    two = make_traces([np.array([[[0], [1]]])], num_experts=8)
    base = SimConfig(capacity=4, expert_bytes=1e6, bandwidth_gbps=1.0, layer_compute_ms=0.5, lookahead_layers=0)
    step = simulate(two, get_predictor("oracle-prefetch", lookahead=0), base)
    assert (step.late_prefetches, step.stall_seconds) == (2, pytest.approx(2.0 * MS))
    routed = simulate(two, get_predictor("oracle-prefetch", lookahead=0), base.with_(prefetch_issue="routed"))
    assert (routed.late_prefetches, routed.prefetches_started, routed.stall_seconds) == (2, 2, pytest.approx(1.5 * MS))
    slow = simulate(two, get_predictor("oracle-prefetch", lookahead=0),
                    base.with_(prefetch_issue="routed", layer_compute_ms=1.0))  # fmt: skip
    assert (slow.timely_prefetches, slow.stall_seconds) == (1, pytest.approx(1.0 * MS))
    # Across a token boundary nothing moves earlier (the next token's id is not known yet): one layer,
    # tokens e0 e1 -> the same 2 ms as issuing at the step's start.
    seq = sequence(0, 1)
    across = simulate(seq, get_predictor("oracle-prefetch", lookahead=0), base.with_(prefetch_issue="routed"))
    assert (across.late_prefetches, across.stall_seconds) == (2, pytest.approx(2.0 * MS))

    # A predictor that reads the current layer's router input cannot be issued that early.
    class ReadsCurrent(BasePredictor):
        name = "reads-current"
        reads_current_router_input = True

    from emoe_jax.traces import TraceSet

    meta = replace(seq.meta, hidden_size=4)
    hidden = TraceSet.from_prompts(meta, [replace(p, hidden=np.zeros((len(p.token_ids), 1, 4), np.float16))
                                          for p in seq])  # fmt: skip
    with pytest.raises(SimConfigError, match="router input"):
        simulate(hidden, ReadsCurrent(), base.with_(prefetch_issue="routed"))
    assert simulate(hidden, ReadsCurrent(), base).accesses == 2
    with pytest.raises(SimConfigError, match="prefetch_issue"):
        simulate(seq, ReadsCurrent(), base.with_(prefetch_issue="early"))


def test_eviction_scores_reuse_ignores_the_prefetch_predictions(sequence):
    # One layer, top-1, capacity 2, no prefetch (the predictions only set eviction scores), zero latency.
    # Predictions for every step: e0 0.0, e1 1.0; reuse after every step: e0 0.9, e1 0.1, e2 0.5.
    # Accesses 0 1 2 0. "latest": at step 2 the prediction (e0 0.0 < e1 1.0) evicts e0 -> 4 misses.
    # "reuse": e1 (0.1 < 0.9) is evicted, step 3 hits e0 -> 3 misses, 1 hit.
    class Disagree(BasePredictor):
        name = "disagree"

        def __init__(self):
            super().__init__(lookahead=0)

        def predict(self, t, l):
            return Prediction(np.array([[0, 0]]), np.array([[0.0, 1.0, 0, 0, 0, 0, 0, 0]], np.float32))

        def reuse(self, t, l):
            return np.array([0.9, 0.1, 0.5, 0, 0, 0, 0, 0], np.float32)

    seq = sequence(0, 1, 2, 0)
    cfg = ZERO.with_(capacity=2, eviction="score", prefetch_k=0)
    latest = simulate(seq, Disagree(), cfg)
    assert (latest.demand_misses, latest.hits) == (4, 0)
    reuse = simulate(seq, Disagree(), cfg.with_(eviction_scores="reuse"))
    assert (reuse.demand_misses, reuse.hits) == (3, 1)
    with pytest.raises(SimConfigError, match="eviction_scores"):
        simulate(seq, Disagree(), cfg.with_(eviction_scores="both"))


def test_distance_aware_score_eviction_by_hand(make_traces):
    # Three layers, top-1, capacity 2 (one pool), zero latency, no prefetch; every token routes expert 0 at
    # every layer (keys 0, 8, 16); every predicted reuse is 0.5, so the score alone ties and recency decides:
    # step 2 evicts key 0, and from then on each step evicts the key needed next -> 6 misses, 0 hits.
    # Distance weight 1: at step 2 (layer 2) key 0's layer runs in 1 layer, key 8's in 2: evict key 8; step 3
    # hits key 0; step 4 (layer 1) misses key 8 and evicts key 0 (2 layers to go, key 16: 1); step 5 hits
    # key 16 -> 4 misses, 2 hits.
    traces = make_traces([np.zeros((2, 3, 1), np.int64)], num_experts=8)
    cfg = ZERO.with_(capacity=2, eviction="score", prefetch_k=0)
    alone = simulate(traces, FixedReuse(0.5), cfg)
    assert (alone.demand_misses, alone.hits) == (6, 0)
    nearest = simulate(traces, FixedReuse(0.5), cfg.with_(distance_weight=1.0))
    assert (nearest.demand_misses, nearest.hits) == (4, 2)
    with pytest.raises(SimConfigError, match="distance_weight"):
        simulate(traces, FixedReuse(0.5), cfg.with_(distance_weight=-1.0))


def test_lrfu_score_eviction_by_hand(sequence):
    # One layer, top-1, capacity 2, zero latency, reuse 0 for every expert; accesses 0 0 1 2 0 (token = step).
    # Score alone: all scores tie, recency decides (LRU): step 3 evicts 0 -> 4 misses, 1 hit.
    # + 1.0 x CRF, decay 0.9: at step 3, CRF(e0) = (0.9 + 1) x 0.9^2 = 1.539 > CRF(e1) = 0.9: evict e1,
    # step 4 hits e0 -> 3 misses, 2 hits.
    seq = sequence(0, 0, 1, 2, 0)
    cfg = ZERO.with_(capacity=2, eviction="score", prefetch_k=0)
    alone = simulate(seq, FixedReuse(0.0), cfg)
    assert (alone.demand_misses, alone.hits) == (4, 1)
    lrfu = simulate(seq, FixedReuse(0.0), cfg.with_(crf_weight=1.0, crf_decay=0.9))
    assert (lrfu.demand_misses, lrfu.hits) == (3, 2)
    with pytest.raises(SimConfigError, match="crf"):
        simulate(seq, FixedReuse(0.0), cfg.with_(crf_weight=1.0, crf_decay=0.0))


def test_cost_aware_admission_refuses_late_prefetches_and_likelier_victims(sequence):
    class NextExpert(BasePredictor):
        """One layer: at step t predicts expert 1 for token t+1 with score 0.5 (and reuse ``p``)."""

        name = "next-expert"

        def __init__(self, p=0.0):
            super().__init__(lookahead=1)
            self.p = p

        def predict(self, t, l):
            return Prediction(np.array([[1, 0]]), 0.5 * np.eye(8, dtype=np.float32)[[1]])

        def reuse(self, t, l):
            return np.full(8, self.p, np.float32)

    seq = sequence(0, 1)
    base = SimConfig(capacity=4, expert_bytes=1e6, bandwidth_gbps=1.0, eviction="score", lookahead_layers=1)
    # 0.5 ms compute: the 1 ms copy cannot arrive before step 1 (expected at 0.5 ms) -> refused;
    # two demand misses, 1 ms stall each. Plain admission starts it at 0, which pushes step 0's
    # demand copy to 1..2 ms (stall 2 ms), then step 1 hits.
    late = simulate(seq, NextExpert(), base.with_(layer_compute_ms=0.5, admission="cost"))
    assert (late.prefetches_refused, late.prefetches_started, late.demand_misses) == (1, 0, 2)
    assert late.stall_seconds == pytest.approx(2.0 * MS)
    plain = simulate(seq, NextExpert(), base.with_(layer_compute_ms=0.5))
    assert (plain.prefetches_started, plain.timely_prefetches) == (1, 1)
    assert plain.stall_seconds == pytest.approx(2.0 * MS)
    # 2 ms compute: it arrives in time -> admitted, a timely hit.
    early = simulate(seq, NextExpert(), base.with_(layer_compute_ms=2.0, admission="cost"))
    assert (early.prefetches_refused, early.timely_prefetches) == (0, 1)
    # The pace estimate is the latest step's duration: after a 1 ms demand stall (step 0 took 1.5 ms)
    # a copy for the next step (issued at 1.5 ms, arriving at 2.5 ms <= 1.5 + 1.5) is admitted.
    class AfterToken0(NextExpert):
        def predict(self, t, l):
            return None if t == 0 else super().predict(t, l)

    paced = simulate(sequence(0, 2, 1), AfterToken0(), base.with_(layer_compute_ms=0.5, admission="cost"))
    assert (paced.prefetches_refused, paced.timely_prefetches) == (0, 1)
    # Capacity 1 expert, accesses e0 e0 e1, predictions from token 1 on (e0: p, e1: 0.5, both requested):
    # at step 1 the cache holds e0. With p = 0.9 it beats the prefetch's 0.5: refused, e0 hits,
    # e1 is a demand miss. With p = 0.1 the prefetch of e1 starts and evicts e0 (which step 1 then
    # waits for: queued behind e1, a late prefetch, and it evicts e1 again).
    class FromToken1(NextExpert):
        def predict(self, t, l):
            if t == 0:
                return None
            return Prediction(np.array([[1, 0]]), np.array([[self.p, 0.5, 0, 0, 0, 0, 0, 0]], np.float32))

    seq3 = sequence(0, 0, 1)
    cfg = base.with_(capacity=0.125, layer_compute_ms=2.0, admission="cost", prefetch_k=2)  # 1 of 8 slots
    full = simulate(seq3, FromToken1(p=0.9), cfg)
    assert (full.prefetches_refused, full.timely_prefetches, full.hits, full.demand_misses) == (1, 0, 1, 2)
    cheap = simulate(seq3, FromToken1(p=0.1), cfg)
    assert (cheap.prefetches_refused, cheap.prefetches_started, cheap.late_prefetches, cheap.hits) == (0, 1, 1, 0)


def test_numba_cache_goes_to_a_user_cache_dir_not_the_source_tree(sequence, monkeypatch, tmp_path):
    from pathlib import Path

    import emoe_jax.sim.kernel as kernel_module
    from emoe_jax import numba_cache

    simulate(sequence(0, 1, 0), get_predictor("lru"), ZERO.with_(capacity=2))  # compiles (or loads) the kernel
    source_dir = Path(kernel_module.__file__).parent
    assert not list(source_dir.rglob("*.nbi")) and not list(source_dir.rglob("*.nbc"))
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert numba_cache.cache_dir() == tmp_path / "emoe_jax" / "numba"
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
    assert numba_cache.cache_dir() == tmp_path / "mine"
