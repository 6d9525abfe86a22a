"""The largest routing shapes of the families people run today (DeepSeek-V3/R1: 58 MoE layers x 256
experts, top-8) through the trace importer, the simulator and the forced-routing replay model, on
synthetic traces (real routing of these models cannot be traced here: no weights)."""

import numpy as np
import pytest

from emoe_jax.config import get_preset
from emoe_jax.predict import get_predictor
from emoe_jax.sim import SimConfig, simulate
from sim_reference import simulate_reference
from emoe_jax.traces import TraceSet, import_moe_beyond

V3 = get_preset("deepseek-v3")
L, E, K = V3.num_moe_layers, V3.num_experts, V3.top_k  # 58, 256, 8
HEADER = "Layer ID,Batch Number,Token,Activated Expert IDs\n"


def _synthetic_csvs(folder, prompts=3, tokens=5, seed=0):
    """MoE-Beyond-format CSVs (layer-major rows, one expert set per token) of a V3-shaped model."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    routes = {}
    for pid in range(1, prompts + 1):
        experts = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(tokens)])
        routes[pid] = experts  # [T, L, k]
        rows = [f'{V3.moe_layers[layer]},0,t{t},"[{", ".join(map(str, experts[t, layer]))}]"'
                for layer in range(L) for t in range(tokens)]
        (folder / f"prompt_{pid}_data.csv").write_text(HEADER + "\n".join(rows) + "\n", encoding="utf-8")
    return routes


def test_importer_takes_deepseek_v3_shape(tmp_path):
    routes = _synthetic_csvs(tmp_path / "csv")
    summary = import_moe_beyond(tmp_path / "csv", tmp_path / "set", prompts_txt=None, tokenizer=None,
                                progress=False, num_experts=E, model="deepseek-v3-synthetic")
    assert (summary.layers, summary.top_k, summary.moe_layer_ids) == (L, K, list(V3.moe_layers))
    traces = TraceSet.load(tmp_path / "set")
    assert (traces.meta.num_layers, traces.meta.num_experts, traces.meta.top_k) == (L, E, K)
    for p in traces:
        np.testing.assert_array_equal(p.experts, routes[p.prompt_id])
    # The DeepSeek-V2-Lite default (64 experts) refuses ids >= 64 instead of storing them silently.
    with pytest.raises(Exception, match="64"):
        import_moe_beyond(tmp_path / "csv", tmp_path / "set64", prompts_txt=None, tokenizer=None, progress=False)


@pytest.fixture(scope="module")
def v3_traces(tmp_path_factory):
    root = tmp_path_factory.mktemp("v3")
    _synthetic_csvs(root / "csv", prompts=2, tokens=4, seed=1)
    import_moe_beyond(root / "csv", root / "set", prompts_txt=None, tokenizer=None, progress=False, num_experts=E)
    return TraceSet.load(root / "set")


def test_simulator_at_deepseek_v3_shape(v3_traces):
    # 10% of V3's 14,848 routed experts (88 MB each in bf16) on the device, real transfer times.
    config = SimConfig(capacity=0.1, expert_bytes=V3.expert_params * 2, bandwidth_gbps=25.0, layer_compute_ms=0.5)
    results = {}
    for name in ("lru", "belady", "prev-token"):
        predictor = get_predictor(name, ignore_unknown=True, lookahead=1)
        predictor.fit(v3_traces)
        results[name] = simulate(v3_traces, predictor, config).to_dict()
    for name, r in results.items():
        assert r["accesses"] == 2 * 4 * L * K and r["hits"] + r["demand_misses"] <= r["accesses"], name
    assert results["belady"]["hits"] >= results["lru"]["hits"]  # MIN is optimal for demand caching
    # The compiled kernel against the plain reference at this shape (ids up to 255, 1,485 slots);
    # the pure-Python reference is slow here, so on one prompt only.
    one = v3_traces.select([0])
    got = simulate(one, get_predictor("lru"), config).to_dict()
    want = simulate_reference(one, get_predictor("lru"), config)
    assert (got["hits"], got["demand_misses"], got["evictions"]) == (want["hits"], want["misses"], want["evictions"])
    assert got["stall_seconds"] == pytest.approx(want["stall"], rel=1e-9)


def test_forced_replay_builds_a_deepseek_v3_shaped_model():
    from emoe_jax.bench.replay import forced_replay_model
    from emoe_jax.traces.forced_routing import check_trace_shape

    model = forced_replay_model("deepseek-v3", scale=1 / 128, vocab_size=256)
    cfg = model.cfg
    assert (cfg.num_moe_layers, cfg.num_experts, cfg.top_k, cfg.n_group, cfg.topk_group) == (L, E, K, 8, 4)
    assert (cfg.attention, cfg.score_correction_bias, cfg.hidden_size, cfg.moe_intermediate_size) == ("mla", True, 64, 32)
    assert model.expert_bytes_total == L * E * 3 * 64 * 32 * 2
    check_trace_shape(cfg, L, E, K)  # synthetic V3 traces fit it
    w = model.source.read(L - 1, E - 1)
    assert w["gate"].shape == (64, 32) and np.isfinite(w["down"].astype(np.float32)).all()
