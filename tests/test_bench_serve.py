"""The request-stream driver on a tiny model: every request served once, consistent clocks, eMoE configs run."""

import json

import numpy as np
import pytest

from emoe_jax.bench.serve import MIXES, ServeError, build_workload, main, markdown, run_benchmark, task_sequence
from emoe_jax.config import tiny_config
from emoe_jax.emoe.system import fit_emoe_predictor
from emoe_jax.model.random_init import random_model
from emoe_jax.runtime.engine import OffloadedEngine
from emoe_jax.runtime.tiers import InMemoryExperts


def test_workload_is_poisson_ordered_and_mixes_are_as_specified():
    prompts = {t: [(t, [1, 2, 3])] for t in ("a", "b", "c")}
    items = build_workload(prompts, "uniform", 50, rate=4.0, output_tokens={"a": 1, "b": 2, "c": 3}, seed=1)
    arrivals = np.array([w.arrival for w in items])
    assert np.all(np.diff(arrivals) > 0) and 2.0 < len(items) / arrivals[-1] < 8.0
    assert items == build_workload(prompts, "uniform", 50, 4.0, {"a": 1, "b": 2, "c": 3}, seed=1)
    seq = task_sequence("multitenant", ["a", "b", "c"], 12, np.random.default_rng(0), session=3)
    # Two tenants alternate for a session (3 requests each), then two tenants take over.
    assert seq[:6:2] == [seq[0]] * 3 and seq[1:6:2] == [seq[1]] * 3 and seq[0] != seq[1]
    with pytest.raises(ServeError, match="unknown mix"):
        task_sequence("zipf", ["a"], 3, np.random.default_rng(0))
    with pytest.raises(ServeError, match="output length"):
        build_workload(prompts, "uniform", 5, 1.0, {"a": 1})


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config("qwen3_moe", num_layers=2)
    g, p, ex = random_model(cfg, seed=2, router_scale=5.0)
    rng = np.random.default_rng(0)
    prompts = {t: [(t, rng.integers(lo, lo + 40, size=int(rng.integers(5, 9))).tolist()) for _ in range(3)]
               for t, lo in (("a", 10), ("b", 70))}
    full = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=cfg.num_experts)
    spec = [(t, ids) for t, v in prompts.items() for _, ids in v]
    predictor = fit_emoe_predictor(engine=full, prompts=spec, max_new_tokens=2, period=3, train_steps=10)

    def make_engine(mode):
        return OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=3, mode=mode)

    return prompts, make_engine, predictor


def test_driver_serves_every_request_once_with_consistent_times(tiny):
    prompts, make_engine, predictor = tiny
    res = run_benchmark(prompts, make_engine, predictor, classify=lambda text: text, mixes=("uniform",),
                        requests=8, loads=(3.0,), period=3, max_batch=2, token_cap=64,
                        output_tokens={"a": 2, "b": 4}, seed=0, warmup_repeats=1)
    json.dumps(res)  # serialisable as --json prints it
    runs = {r["config"]: r for r in res["runs"]}
    assert set(runs) == {"fcfs-lru", "slo-lru", "emoe-fcfs", "emoe-slo"} and len(res["runs"]) == 4
    for name, r in runs.items():
        reqs = r["per_request"]
        assert sorted(x["rid"] for x in reqs) == list(range(8))
        for x in reqs:
            assert x["start"] >= x["arrival"] - 1e-9 and 0 < x["ttft"] <= x["e2e"]
            assert len(x["tokens"]) == {"a": 2, "b": 4}[x["task"]]
        assert 0.0 <= r["slo_attainment"] <= 1.0
        assert r["generated_tokens"] == sum(len(x["tokens"]) for x in reqs)
        if name.startswith("emoe"):
            assert r["forecasts"] >= 2 and r["experts_loaded"] >= 2 * 3  # cold start + a re-forecast
    # Exact mode is exact under any schedule: the SLO scheduler's outputs equal FCFS's.
    assert runs["fcfs-lru"]["agreement_vs_exact"] == 1.0 and runs["slo-lru"]["agreement_vs_exact"] == 1.0
    assert runs["emoe-slo"]["forecasts"] >= 2
    # FCFS batches start in arrival order.
    fcfs = sorted(runs["emoe-fcfs"]["per_request"], key=lambda x: x["rid"])
    starts = [x["start"] for x in fcfs]
    assert starts == sorted(starts)
    assert "| uniform | 3 | emoe-slo |" in markdown(res)


def test_cli_clear_errors(tmp_path, capsys):
    assert main(["--corpus", str(tmp_path / "nope"), "--json"]) == 2
    assert "python -m emoe_jax.data build" in capsys.readouterr().err
    assert main(["--mix", "zipf"]) == 2
    assert "unknown mix" in capsys.readouterr().err
    assert main(["--load", "fast"]) == 2
    assert "--load" in capsys.readouterr().err
    assert set(MIXES) == {"uniform", "multitenant"}
