"""The predictor ablation runner on a tiny in-memory trace set and a tiny grid."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emoe_jax.bench import predictors as B
from emoe_jax.predict import get_predictor
from emoe_jax.sim import SimConfig, simulate, split_by_prompt_id
from emoe_jax.traces import PromptTrace, TraceMeta, TraceSet

L, E, K = 3, 8, 2


def _traces(num_prompts: int = 6, T: int = 14, seed: int = 0) -> TraceSet:
    rng = np.random.default_rng(seed)
    meta = TraceMeta(model="tiny", num_layers=L, num_experts=E, top_k=K, moe_layer_ids=(1, 2, 3),
                     hidden_size=None, source="test")  # fmt: skip
    prompts = []
    for pid in range(num_prompts):
        # Skewed routing so predictors and caches have something to learn.
        experts = np.stack([[rng.choice(E, K, replace=False, p=np.linspace(2, 0.2, E) / np.linspace(2, 0.2, E).sum())
                             for _ in range(L)] for _ in range(T)]).astype(np.int16)  # [T, L, k]  # fmt: skip
        prompts.append(PromptTrace(prompt_id=10 + pid, task="t", text="x", token_ids=np.arange(T, dtype=np.int32),
                                   experts=experts, weights=None, n_prefill=T))  # fmt: skip
    return TraceSet.from_prompts(meta, prompts)


GRID = dict(capacities=(0.25, 0.5), bandwidths_gbps=(10.0, 40.0), expert_bytes=1e6, layer_compute_ms=0.05,
            val_fraction=0.5, progress=False)  # fmt: skip


def test_grid_cells_match_direct_simulation():
    """Every cell equals a fresh predictor fitted on the same split and replayed alone (memoisation is exact)."""
    traces = _traces()
    res = B.run_grid(traces, predictors=["prev-token", "static-freq"], **GRID)
    names = ["lru", "belady", "oracle-prefetch", "prev-token", "static-freq"]
    assert res["grid"]["predictors"] == names
    assert len(res["rows"]) == len(names) * 2 * 3  # capacities x (zero latency + 2 bandwidths)
    train, val = split_by_prompt_id(traces, 0.5)
    assert res["split"]["train_prompt_ids"] == [10, 12] and res["split"]["val_prompt_ids"] == [13, 15]
    for row in res["rows"]:
        if row["protocol"] == B.ZERO_LATENCY:  # the timed cells' protocol with free transfers
            config = SimConfig(capacity=row["capacity"], expert_bytes=1e6, zero_latency=True, lookahead_layers=0)
        else:
            config = SimConfig(capacity=row["capacity"], bandwidth_gbps=row["bandwidth_gbps"], expert_bytes=1e6,
                               layer_compute_ms=0.05)  # fmt: skip
        pred = get_predictor(row["predictor"], ignore_unknown=True, lookahead=config.lookahead_layers)
        pred.fit(train)
        direct = simulate(val, pred, config).to_dict()
        for key in ("hits", "accesses", "demand_misses", "late_prefetches", "prefetches_started"):
            assert row[key] == direct[key], (row["predictor"], row["protocol"], key)
        assert row["stall_ms_per_token"] == pytest.approx(direct["stall_ms_per_token"])
    # The loss markers agree with the LRU rows.
    lru = {(r["protocol"], r["bandwidth_gbps"], r["capacity"]): r for r in res["rows"] if r["predictor"] == "lru"}
    for r in res["rows"]:
        base = lru[(r["protocol"], r["bandwidth_gbps"], r["capacity"])]
        assert r["loses_to_lru_hit_rate"] == (r["hit_rate"] < base["hit_rate"])
    oracle = [r for r in res["rows"] if r["predictor"] == "oracle-prefetch" and r["protocol"] == B.ZERO_LATENCY]
    assert all(r["hit_rate"] == 1.0 and r["oracle"] for r in oracle)


def test_outputs_and_markdown(tmp_path):
    res = B.run_grid(_traces(), predictors=["prev-token"], **GRID)
    res["rows"][-1]["loses_to_lru_hit_rate"] = True  # force a marker to check it is printed
    paths = B.write_outputs(res, tmp_path / "out")
    loaded = json.loads((tmp_path / "out" / "results.json").read_text())
    assert loaded["rows"] == json.loads(json.dumps(res["rows"]))
    md = (tmp_path / "out" / "table.md").read_text()
    assert md.count("\n## ") == 3  # zero latency + one per bandwidth
    assert "## 10 GB/s" in md and "## 40 GB/s" in md and "validation 3 prompts" in md
    assert "belady (ORACLE)" in md and B.LOSES_HIT in md
    for key in ("hit_rate_plot", "stall_plot"):
        data = open(paths[key], "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporaries left


def test_default_list_leaves_out_predictors_that_cannot_run():
    """spec-gating needs router inputs and weights: left out with the reason, not a crash."""
    res = B.run_grid(_traces(), predictors=None, exclude=("moe-infinity", "learned", "emoe", "emoe-profiles"),
                     **{**GRID, "capacities": (0.5,), "bandwidths_gbps": (40.0,)})  # fmt: skip
    assert "spec-gating" in res["skipped"] and "router" in res["skipped"]["spec-gating"]
    assert "spec-gating" not in {r["predictor"] for r in res["rows"]}
    with pytest.raises(B.AblationError, match="spec-gating"):
        B.run_grid(_traces(), predictors=["spec-gating"], **GRID)


def test_cli_errors_and_json(tmp_path, capsys):
    traces = _traces()
    from emoe_jax.traces import TraceWriter

    path = tmp_path / "tr"
    with TraceWriter(path, traces.meta) as w:
        for p in traces:
            w.add(p)
    assert B.main(["--traces", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert B.main(["--traces", str(path), "--predictors", "nope"]) == 2
    assert "unknown predictor" in capsys.readouterr().err
    assert B.main(["--traces", str(path), "--train-split", "1.5"]) == 2
    assert "--train-split" in capsys.readouterr().err
    rc = B.main(["--traces", str(path), "--predictors", "prev-token", "--capacities", "0.5", "--bandwidths-gbps", "40",
                 "--expert-bytes", "1e6", "--train-split", "0.5", "--max-prompts", "2", "--json", "--no-progress", "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["split"]["val_prompts"] == 2 and out["split"]["train_prompts"] == 3
    assert (tmp_path / "o" / "table.md").exists()


def test_separate_train_and_test_traces_and_zero_latency_protocols(tmp_path, capsys):
    """--train-traces fits, --test-traces is replayed whole; zero-latency cells count what timed cells count."""
    from emoe_jax.traces import TraceWriter

    train, test = _traces(seed=1), _traces(num_prompts=3, seed=2)
    for name, ts in (("train", train), ("test", test)):
        with TraceWriter(tmp_path / name, ts.meta) as w:
            for p in ts:
                w.add(p)
    common = ["--predictors", "prev-token", "--capacities", "0.5", "--bandwidths-gbps", "40", "--expert-bytes", "1e6",
              "--json", "--no-progress"]  # fmt: skip
    assert B.main(["--train-traces", str(tmp_path / "train"), *common]) == 2
    assert "go together" in capsys.readouterr().err
    assert B.main(["--train-traces", str(tmp_path / "train"), "--test-traces", str(tmp_path / "test"), *common]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["split"]["train_prompts"] == 6 and out["split"]["val_prompts"] == 3
    pred = get_predictor("prev-token", lookahead=0)
    pred.fit(train)
    want = simulate(test, pred, SimConfig(capacity=0.5, expert_bytes=1e6, zero_latency=True, lookahead_layers=0))
    zl = [r for r in out["rows"] if r["predictor"] == "prev-token" and r["protocol"] == B.ZERO_LATENCY][0]
    timed = [r for r in out["rows"] if r["predictor"] == "prev-token" and r["protocol"] == B.TIMED][0]
    assert zl["hits"] == want.hits and zl["tokens"] == timed["tokens"] == test.n_tokens
    # MoE-Beyond's protocol leaves its 10 warm-up tokens of each prompt out.
    res = B.run_grid(test, predictors=["prev-token"], capacities=(0.5,), bandwidths_gbps=(40.0,), expert_bytes=1e6,
                     train_traces=train, zero_latency_protocol="moe-beyond", progress=False)  # fmt: skip
    zl_mb = [r for r in res["rows"] if r["predictor"] == "prev-token" and r["protocol"] == B.ZERO_LATENCY][0]
    assert zl_mb["tokens"] == test.n_tokens - 10 * len(test)


def test_per_task_table_and_plot(tmp_path):
    """With several task labels: hit rate per task at the capacity closest to 10%, shares summing to the totals."""
    from dataclasses import replace

    base = _traces(num_prompts=8)
    tasks = ["code", "math"] * 4
    traces = TraceSet.from_prompts(base.meta, [replace(p, task=t) for p, t in zip(base, tasks)])
    grid = dict(GRID, capacities=(0.125, 0.5))
    res = B.run_grid(traces, predictors=["prev-token"], **grid)
    for row in res["rows"]:
        per = row["per_task"]
        assert sorted(per) == ["code", "math"] and sum(c["prompts"] for c in per.values()) == 4
        assert sum(c["hits"] for c in per.values()) == row["hits"]
        assert sum(c["accesses"] for c in per.values()) == row["accesses"]
    lines = B.per_task_markdown(res)
    text = "\n".join(lines)
    assert text.count("## Per task, capacity 0.125") == 3  # zero latency + 2 bandwidths
    zl = next(r for r in res["rows"] if r["predictor"] == "prev-token" and r["protocol"] == B.ZERO_LATENCY
              and r["capacity"] == 0.125)  # fmt: skip
    row = next(line for line in lines if line.startswith("| prev-token |"))
    assert row == ("| prev-token | " + " | ".join(f"{100 * zl['per_task'][t]['hit_rate']:.1f}" for t in ("code", "math"))
                   + f" | {100 * zl['hit_rate']:.1f} |")  # fmt: skip
    assert "| predictor | code (2) | math (2) | all |" in lines
    paths = B.write_outputs(res, tmp_path / "out")
    data = open(paths["per_task_plot"], "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # Chosen capacities: one table per capacity and protocol; a capacity outside the grid is an error.
    res2 = B.run_grid(traces, predictors=["prev-token"], per_task_capacities=(0.125, 0.5), **grid)
    assert "\n".join(B.per_task_markdown(res2)).count("## Per task, capacity 0.5,") == 3
    with pytest.raises(B.AblationError, match="per-task capacities"):
        B.run_grid(traces, predictors=["prev-token"], per_task_capacities=(0.3,), **grid)
    # A single task: no per-task section, no plot.
    res1 = B.run_grid(_traces(), predictors=["prev-token"], **GRID)
    assert B.per_task_markdown(res1) == [] and "per_task_plot" not in B.write_outputs(res1, tmp_path / "one")
