"""The policy/lookahead sweep and its paired bootstrap, on tiny traces."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emoe_jax.predict import get_predictor
from emoe_jax.sim import SimConfig, simulate
from emoe_jax.sim.sweep import main, paired_bootstrap, run_sweep, to_markdown_by_task


@pytest.fixture(scope="module")
def _traces(make_traces):
    def _traces(seed, prompts=4, T=12, L=3, E=8, k=2):
        rng = np.random.default_rng(seed)
        w = np.linspace(2, 0.2, E) / np.linspace(2, 0.2, E).sum()
        return make_traces([np.stack([[rng.choice(E, k, replace=False, p=w) for _ in range(L)] for _ in range(T)])
                            for _ in range(prompts)], E)  # fmt: skip

    return _traces


def test_sweep_cells_equal_direct_simulation(_traces):
    train, test = _traces(0), _traces(1)
    kw = dict(bandwidth_gbps=2.0, layer_compute_ms=0.3, expert_bytes=1e6, zero_latency=False, host_overhead_ms=0.05)
    rows, per_prompt = run_sweep(train, test, predictors=["causal-table"], lookaheads=[2], capacities=[0.5],
                                 policies=["lru", "cost"], miss_modes=["copy", "choose"], host_gbps=[4.0], **kw)  # fmt: skip
    # lru x (copy, choose@4) + belady (copy only) + causal-table x (lru copy, cost copy, cost choose)
    assert len(rows) == 2 + 1 + 3
    row = [r for r in rows if r["predictor"] == "causal-table" and r["policy"] == "cost" and r["miss_mode"] == "choose"][0]
    pred = get_predictor("causal-table", lookahead=2)
    pred.fit(train)
    cfg = SimConfig(capacity=0.5, lookahead_layers=2, eviction="score", admission="cost", miss_mode="choose",
                    host_bandwidth_gbps=4.0, **kw)  # fmt: skip
    direct = simulate(test, pred, cfg)
    assert row["hit_rate"] == direct.hit_rate and row["stall_ms_per_token"] == pytest.approx(direct.to_dict()["stall_ms_per_token"])
    counters = per_prompt["causal-table|2|cost|choose|4.0|0.5"]
    assert counters["hits"].sum() == direct.hits and counters["accesses"].sum() == direct.accesses


def test_paired_bootstrap_brackets_the_difference():
    a = {"prompt_id": np.arange(50), "accesses": np.full(50, 10), "hits": np.full(50, 6), "stall_seconds": np.full(50, 1.0)}
    b = {"prompt_id": np.arange(50), "accesses": np.full(50, 10), "hits": np.full(50, 4), "stall_seconds": np.full(50, 2.0)}
    out = paired_bootstrap(a, b)
    assert out["hit_rate_diff"] == pytest.approx(0.2) and out["hit_rate_diff_ci95"] == pytest.approx([0.2, 0.2])
    assert out["stall_reduction"] == pytest.approx(0.5)
    noisy = dict(a, hits=np.random.default_rng(0).integers(0, 11, 50))
    lo, hi = paired_bootstrap(noisy, b)["hit_rate_diff_ci95"]
    assert lo < paired_bootstrap(noisy, b)["hit_rate_diff"] < hi
    with pytest.raises(ValueError, match="same prompts"):
        paired_bootstrap(a, dict(b, prompt_id=np.arange(1, 51)))


def test_cli_writes_rows_and_comparisons(_traces, tmp_path, capsys):
    from emoe_jax.traces import TraceWriter

    for name, seed in (("train", 0), ("test", 1)):
        ts = _traces(seed)
        with TraceWriter(tmp_path / name, ts.meta) as w:
            for p in ts:
                w.add(p)
    rc = main(["--train-traces", str(tmp_path / "train"), "--test-traces", str(tmp_path / "test"), "--zero-latency",
               "--predictors", "causal-table,prev-token", "--capacities", "0.5", "--policies", "lru",
               "--compare", "causal-table:prev-token,causal-table:lru", "--out", str(tmp_path / "o.json")])  # fmt: skip
    assert rc == 0
    assert "| causal-table | 0 | lru | copy |" in capsys.readouterr().out
    out = json.loads((tmp_path / "o.json").read_text())
    assert len(out["comparisons"]) == 2 and out["test_prompts"] == 4
    assert main(["--test-traces", str(tmp_path / "test")]) == 2


def test_by_task_table_shows_each_tasks_share(_traces, tmp_path, capsys):
    from dataclasses import replace

    from emoe_jax.traces import TraceSet, TraceWriter

    train, test = _traces(0), _traces(1)
    test = TraceSet.from_prompts(test.meta, [replace(p, task=t) for p, t in zip(test, ["qa", "code", "qa", "code"])])
    kw = dict(bandwidth_gbps=2.0, layer_compute_ms=0.3, expert_bytes=1e6, zero_latency=False, host_overhead_ms=0.05)
    rows, _ = run_sweep(train, test, predictors=["causal-table"], lookaheads=[1], capacities=[0.5],
                        policies=["bypass"], miss_modes=["copy"], host_gbps=[], baselines=("lru",), **kw)  # fmt: skip
    text = to_markdown_by_task(rows).splitlines()
    assert text[0] == "| predictor | lookahead | policy | misses | capacity | code | qa |"
    cfg = SimConfig(capacity=0.5, lookahead_layers=1, eviction="score", demand_admission="bypass", **kw)
    pred = get_predictor("causal-table", lookahead=1)
    pred.fit(train)
    qa = simulate(test, pred, cfg).to_dict()["per_task"]["qa"]
    assert text[3].startswith("| causal-table | 1 | bypass | copy | 0.5 | ")
    assert text[3].endswith(f" {100 * qa['hit_rate']:.1f} / {qa['stall_ms_per_token']:.2f} |")
    assert to_markdown_by_task([dict(r, per_task={}) for r in rows]) == ""
    # the CLI prints it with --by-task
    for name, ts in (("train", train), ("test", test)):
        with TraceWriter(tmp_path / name, ts.meta) as w:
            for p in ts:
                w.add(p)
    assert main(["--train-traces", str(tmp_path / "train"), "--test-traces", str(tmp_path / "test"),
                 "--capacities", "0.5", "--policies", "score", "--baselines", "lru", "--by-task"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "By task" in out and "| causal-table | 1 | score | copy | 0.5 | " in out.split("By task")[1]


def test_policy_overrides_replace_a_named_policys_settings(_traces):
    train, test = _traces(0), _traces(1)
    kw = dict(bandwidth_gbps=2.0, layer_compute_ms=0.3, expert_bytes=1e6, zero_latency=False, host_overhead_ms=0.05)
    rows, _ = run_sweep(train, test, predictors=["causal-table"], lookaheads=[0], capacities=[0.5], policies=["lrfu-routed"],
                        miss_modes=["copy"], host_gbps=[], baselines=(), **kw,
                        policy_overrides={"lrfu-routed": {"crf_weight": 0.5, "crf_decay": 0.7}})  # fmt: skip
    pred = get_predictor("causal-table", lookahead=0)
    pred.fit(train)
    cfg = SimConfig(capacity=0.5, lookahead_layers=0, eviction="score", eviction_scores="reuse", prefetch_issue="routed",
                    crf_weight=0.5, crf_decay=0.7, **kw)  # fmt: skip
    direct = simulate(test, pred, cfg)
    assert rows[0]["hit_rate"] == direct.hit_rate
    assert rows[0]["stall_ms_per_token"] == pytest.approx(direct.to_dict()["stall_ms_per_token"])
    # reuse-dist-routed: reuse-routed with a distance weight (2 by default, or the override)
    for override, weight in (({}, 2.0), ({"distance_weight": 0.7}, 0.7)):
        rows, _ = run_sweep(train, test, predictors=["causal-table"], lookaheads=[0], capacities=[0.5],
                            policies=["reuse-dist-routed"], miss_modes=["copy"], host_gbps=[], baselines=(), **kw,
                            policy_overrides={"reuse-dist-routed": override})  # fmt: skip
        direct = simulate(test, pred, cfg.with_(crf_weight=0.0, distance_weight=weight)).to_dict()
        assert (rows[0]["hit_rate"], rows[0]["stall_ms_per_token"]) == (direct["hit_rate"],
                                                                        pytest.approx(direct["stall_ms_per_token"]))
