"""eMoE system glue: Eq. 2 selection under the slot budget, periodic forecasts, reload only what changed."""

import numpy as np
import pytest

from emoe_jax.config import tiny_config
from emoe_jax.emoe.system import EMoESystem, EMoESystemError, fit_emoe_predictor
from emoe_jax.model.random_init import random_model
from emoe_jax.predict.emoe_selection import expected_load, select_experts
from emoe_jax.runtime.engine import OffloadedEngine
from emoe_jax.runtime.tiers import InMemoryExperts

SLOTS = 3


def _prompts(task, n, rng):
    lo = 10 if task == "a" else 70  # two tasks on disjoint token ranges: different routing
    return [(task, rng.integers(lo, lo + 50, size=int(rng.integers(4, 9))).tolist()) for _ in range(n)]


@pytest.fixture(scope="module")
def parts():
    cfg = tiny_config("qwen3_moe", num_layers=2)
    g, p, ex = random_model(cfg, seed=1, router_scale=5.0)
    rng = np.random.default_rng(0)
    prompts = _prompts("a", 4, rng) + _prompts("b", 4, rng)  # one batch of 8: one compile
    full = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=cfg.num_experts)
    predictor = fit_emoe_predictor(engine=full, prompts=prompts, max_new_tokens=3, period=4, history=2,
                                   train_steps=20)
    return cfg, g, p, ex, predictor, prompts


def _system(parts, **kw):
    cfg, g, p, ex, predictor, _ = parts
    engine = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=SLOTS, mode="restricted")
    return EMoESystem(engine, predictor, **kw)


def test_plan_is_eq2_top_s_then_filled_to_the_budget(parts):
    system = _system(parts, period=4)
    scheduled = [("a", 6), ("a", 8), ("b", 5)]
    mask = system.plan(scheduled)
    assert mask.shape == (2, 8) and mask.sum(1).tolist() == [SLOTS, SLOTS]
    freq = {t: system.predictor.profiles[t] for t in ("a", "b")}  # no history yet: the profiles
    load = expected_load(freq, scheduled, {t: system.expected_output(t) for t in ("a", "b")})
    eq2 = select_experts(load, SLOTS)
    assert np.all(mask[eq2])  # every Eq. 2 choice is kept
    if eq2.sum() == mask.sum():
        np.testing.assert_array_equal(mask, eq2)


def test_reload_only_what_changed_and_only_every_p_prompts(parts):
    system = _system(parts, period=4)
    cache = system.engine.device_cache
    first = system.prepare([("a", 6)])
    assert first.experts_loaded == 2 * SLOTS and first.bytes_moved == 2 * SLOTS * cache.slot_bytes
    np.testing.assert_array_equal(cache.slot_of_expert >= 0, system.selected)
    assert system.prepare([("b", 6)]) is None  # not due: 0 prompts served since the forecast
    prompts = [ids for _, ids in parts[5][:3]]
    system.generate(prompts, 3, stop_at_eos=False)
    assert system.prompts_served == 3 and len(system.history) == 2
    assert system.prepare([("b", 6)]) is None  # 3 < p = 4
    system.generate(prompts[:1], 2, stop_at_eos=False)
    before = cache.slot_of_expert >= 0
    second = system.prepare([("b", 6)])  # a new eMoE-A invocation: forecast from the history, then Eq. 2
    target = system.selected
    changed = int((target & ~before).sum())
    assert second.experts_loaded == changed and second.bytes_moved == changed * cache.slot_bytes
    np.testing.assert_array_equal(cache.slot_of_expert >= 0, target)
    assert system.reloads.forecasts == 2 and system.reloads.experts_loaded == 2 * SLOTS + changed


def test_insensitive_layer_keeps_its_experts(parts):
    # s = 0 at layer 1 for every task: Eq. 2 gives it no load, so its resident experts stay put.
    system = _system(parts, period=1, sensitivity={"a": np.array([1.0, 0.0]), "b": np.array([1.0, 0.0])})
    system.prepare([("a", 6)])
    layer1 = system.engine.device_cache.slot_of_expert[1].copy()
    system.generate([parts[5][0][1]], 2, stop_at_eos=False)
    stats = system.prepare([("b", 6)])
    np.testing.assert_array_equal(system.engine.device_cache.slot_of_expert[1], layer1)
    assert stats.layers_changed <= 1


def test_restricted_run_uses_only_resident_experts(parts):
    system = _system(parts, period=4)
    system.prepare([("a", 6), ("b", 6)])
    seen = []
    system.engine.routing_hooks.append(lambda s: seen.append((s.moe_layer, s.ids[s.valid])))
    system.generate([ids for _, ids in parts[5][:2]], 3, stop_at_eos=False)
    for layer, ids in seen:
        assert set(np.unique(ids)) <= set(np.flatnonzero(system.selected[layer]))


def test_clear_errors(parts):
    cfg, g, p, ex, predictor, _ = parts
    exact = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=SLOTS)
    with pytest.raises(EMoESystemError, match="restricted"):
        EMoESystem(exact, predictor)
    system = _system(parts)
    with pytest.raises(EMoESystemError, match="prepare"):
        system.generate([[1, 2, 3]], 2)
    with pytest.raises(EMoESystemError, match="extractor"):
        system.task_of("text")
