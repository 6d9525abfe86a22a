"""Predictive prefetching: never changes exact-mode outputs, and a late prefetch is a stall, not a hit."""

import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from emoe_jax.predict import get_predictor
from emoe_jax.predict.base import BasePredictor, Prediction
import emoe_jax.runtime.residency as residency_mod  # where the engine waits for late prefetches
from emoe_jax.runtime.engine import OffloadedEngine
from emoe_jax.runtime.tiers import InMemoryExperts




class RandomPredictor(BasePredictor):
    """Random scores for random targets up to one token ahead; `adversarial` scores every expert
    the step will NOT use highest (it reads the true routing only to be wrong on purpose)."""

    name = "random-test"

    def __init__(self, seed, lookahead, adversarial=None):
        super().__init__(lookahead)
        self.rng = np.random.default_rng(seed)
        self.adversarial = adversarial  # {(t, l): experts} of a reference run, or None

    def predict(self, t, l):
        info = self.info
        targets = self.target_list(t, l, info.num_layers)
        scores = self.rng.random((len(targets), info.num_experts)).astype(np.float32)
        if self.adversarial is not None:
            for i, (dt, lt) in enumerate(targets):
                used = self.adversarial.get((t + int(dt), int(lt)), [])
                scores[i, list(used)] = 0.0
                scores[i] += 1.0
                scores[i, list(used)] = 0.0
        return Prediction(targets, scores)


def reference_routing(engine, prompts, new):
    """{(row, position, moe layer): experts} of a plain run."""
    seen = {}

    def hook(step):
        for b in range(step.ids.shape[0]):
            for j in range(step.ids.shape[1]):
                if step.positions[b, j] >= 0:
                    seen[(b, int(step.positions[b, j]), step.moe_layer)] = set(step.ids[b, j].tolist())

    engine.routing_hooks.append(hook)
    out = engine.generate(prompts, new, stop_at_eos=False)
    engine.routing_hooks.clear()
    return seen, out


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(["mixtral", "deepseek_v2", "qwen3_moe"]), slots=st.integers(1, 8),
       host=st.one_of(st.none(), st.integers(1, 12)), lookahead=st.integers(0, 6),
       prefetch_k=st.integers(1, 8), adversarial=st.booleans(), seed=st.integers(0, 1000),
       prompt=st.lists(st.integers(3, 120), min_size=1, max_size=7))
def test_prefetching_never_changes_exact_outputs(tiny_model, assert_equals_resident, family, slots, host, lookahead, prefetch_k, adversarial, seed,
                                                 prompt):
    cfg, g, p, ex, resident = tiny_model(family)
    new = 6
    wrong = None
    if adversarial:
        plain = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=cfg.num_experts)
        seen, _ = reference_routing(plain, [prompt], new)
        wrong = {(t, l): e for (_, t, l), e in seen.items()}
    predictor = RandomPredictor(seed, lookahead, wrong)
    engine = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=slots, host_experts=host,
                             predictor=predictor, prefetch_k=prefetch_k)
    out = engine.generate([prompt], new, stop_at_eos=False, return_logits=True)
    assert_equals_resident(resident, [prompt], out, new)
    pf = out.stats["prefetch"]
    assert pf["completed"] <= pf["started"] <= pf["issued"]
    assert pf["timely"] + pf["wasted"] <= pf["completed"]


@pytest.mark.parametrize("policy", ["lru", "score"])
def test_batched_prefetching_with_a_real_predictor_is_exact(tiny_model, policy):
    cfg, g, p, ex, resident = tiny_model("qwen3_moe")
    prompts = [[5, 9, 13, 22, 7], [3, 17, 8], [40, 41]]
    ref = resident.generate(prompts, 8)
    engine = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=2, host_experts=4,
                             predictor=get_predictor("prev-token"), policy=policy)
    out = engine.generate(prompts, 8, stop_at_eos=False)
    assert out.stats["decode_path"] == "staged"
    assert out.tokens == [r.tolist() for r in ref]
    assert out.stats["predictor"] == "prev-token" and out.stats["prefetch"]["completed"] > 0
    if policy == "score":  # the driver's latest scores rank the device slots: prev-token's multi-hot rows
        scores = engine.device_cache.policies[1].scores
        assert set(scores) == set(range(cfg.num_experts)) and set(scores.values()) <= {0.0, 1.0}
        assert 0 < sum(scores.values()) <= len(prompts) * cfg.top_k



@pytest.mark.parametrize("name", ["causal-reuse", "cross-reuse", "recency-reuse"])
def test_learned_reuse_eviction_on_the_staged_path_is_exact(tiny_model, make_traces, name):
    """Learned reuse rows rank the device slots (eviction_scores="reuse"); outputs unchanged."""
    cfg, g, p, ex, resident = tiny_model("qwen3_moe")
    rng = np.random.default_rng(0)
    L, E, k = cfg.num_moe_layers, cfg.num_experts, cfg.top_k
    train = make_traces([np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(L)])
                                   for _ in range(int(rng.integers(3, 9)))]) for _ in range(6)], E)  # fmt: skip
    predictor = get_predictor(name, ignore_unknown=True, lookahead=1)
    predictor.fit(train)
    prompts = [[5, 9, 13, 22, 7], [3, 17, 8]]
    engine = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=2, host_experts=4,
                             predictor=predictor, policy="score", eviction_scores="reuse")
    out = engine.generate(prompts, 6, stop_at_eos=False)
    assert out.stats["decode_path"] == "staged"
    assert out.tokens == [r.tolist() for r in resident.generate(prompts, 6)]
    scores = engine.device_cache.policies[L - 1].scores  # the last layer's reuse row, best over the rows
    assert set(scores) == set(range(E)) and all(0.0 < v < 1.0 for v in scores.values())
    assert set(engine.driver.scores) == {L - 1}  # the next token's layer 0, predicted, does not rank slots


def test_driver_scores_are_the_nearest_target_per_layer_best_over_rows():
    from emoe_jax.runtime.predictor_driver import PredictorDriver

    class Fixed(BasePredictor):
        """Row r predicts layer 1 of this token (r, then 0) and of the next token (0.9)."""

        name = "fixed"

        def __init__(self):
            super().__init__(lookahead=1)

        def predict(self, t, l):
            r = float(self.info.prompt_id)
            near, far = np.array([0.0, r, 0.0, 0.0], np.float32), np.full(4, 0.9, np.float32)
            return Prediction(np.array([[0, 1], [1, 1]]), np.stack([near, far]))

    driver = PredictorDriver(Fixed(), num_moe_layers=2, num_experts=4, top_k=1, prefetch_k=0)
    driver.begin([[3], [4]], None, None)
    ids, weights = np.zeros((2, 1, 1), np.int32), np.ones((2, 1, 1), np.float32)
    assert driver.layer(0, 0, ids, weights, None, np.zeros(2, bool)) == []  # prefetch_k=0: no requests
    np.testing.assert_array_equal(driver.scores[1], [0.0, 1.0, 0.0, 0.0])  # rows 0 and 1: the best, 1.0
    driver.layer(0, 0, ids, weights, None, np.array([False, True]))
    np.testing.assert_array_equal(driver.scores[1], [0.0, 0.0, 0.0, 0.0])  # row 1 is done


def test_driver_takes_each_layers_reuse_row_once_it_ran_and_reuse_mode_ignores_predictions():
    from emoe_jax.runtime.predictor_driver import PredictorDriver

    class WithReuse(BasePredictor):
        """Predicts layer 1 (expert 2: 0.8); after a layer runs its reuse row names the row's prompt id."""

        name = "with-reuse"

        def __init__(self):
            super().__init__(lookahead=1)

        def predict(self, t, l):
            return Prediction(np.array([[0, 1]]), np.array([[0.0, 0.0, 0.8, 0.0]], np.float32)) if l == 0 else None

        def reuse(self, t, l):
            row = np.zeros(4, np.float32)
            row[self.info.prompt_id] = 0.5 + l
            return row

    ids, weights, live = np.zeros((2, 1, 1), np.int32), np.ones((2, 1, 1), np.float32), np.zeros(2, bool)
    latest = PredictorDriver(WithReuse(), num_moe_layers=2, num_experts=4, top_k=1, prefetch_k=0)
    latest.begin([[3], [4]], None, None)
    latest.layer(0, 0, ids, weights, None, live)
    np.testing.assert_array_equal(latest.scores[0], [0.5, 0.5, 0.0, 0.0])  # layer 0 ran: reuse, best over rows
    np.testing.assert_array_equal(latest.scores[1], np.float32([0.0, 0.0, 0.8, 0.0]))  # layer 1: the prediction
    latest.layer(0, 1, ids, weights, None, live)
    assert set(latest.scores) == {1}
    np.testing.assert_array_equal(latest.scores[1], [1.5, 1.5, 0.0, 0.0])  # its reuse replaced the prediction
    only_reuse = PredictorDriver(WithReuse(), num_moe_layers=2, num_experts=4, top_k=1, prefetch_k=0,
                                 eviction_scores="reuse")
    only_reuse.begin([[3], [4]], None, None)
    only_reuse.layer(0, 0, ids, weights, None, live)
    assert set(only_reuse.scores) == {0}  # the prediction for layer 1 ranks nothing
    with pytest.raises(ValueError, match="unknown eviction_scores 'nope'"):
        PredictorDriver(WithReuse(), num_moe_layers=2, num_experts=4, top_k=1, eviction_scores="nope")


def test_engine_config_eviction_scores_needs_score_policy():
    from emoe_jax.runtime.engine_config import EngineConfig

    assert EngineConfig(policy="score", eviction_scores="reuse").eviction_scores == "reuse"
    with pytest.raises(ValueError, match="use policy='score'"):
        EngineConfig(eviction_scores="reuse")
    with pytest.raises(ValueError, match="unknown eviction_scores"):
        EngineConfig(policy="score", eviction_scores="recent")

class ExactNextLayer(BasePredictor):
    """Test fixture: at (t, 0) it names exactly the experts layer 1 of token t will use."""

    name = "exact-next-layer"

    def __init__(self, routing):
        super().__init__(lookahead=1)
        self.routing = routing

    def predict(self, t, l):
        if l != 0 or (t, 1) not in self.routing:
            return None
        scores = np.zeros((1, self.info.num_experts), np.float32)
        scores[0, list(self.routing[(t, 1)])] = 1.0
        return Prediction(np.array([[0, 1]]), scores)


def gate_transfers(cache):
    """Host->device copies made by the prefetch thread wait for the returned event: the test
    decides when a prefetch lands."""
    gate = threading.Event()
    gate.set()
    to_device = cache.to_device

    def gated(weights, demand=True):
        if threading.current_thread().name == "emoe-prefetch":
            gate.wait()
        return to_device(weights, demand)

    cache.to_device = gated
    return gate


@pytest.fixture(scope="module")
def _run_gated(tiny_model):
    def _run_gated(late: bool):
        cfg, g, p, ex, _ = tiny_model("mixtral")
        prompt, new = [5, 9, 13, 22, 7], 7
        plain = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=cfg.num_experts)
        seen, _ = reference_routing(plain, [prompt], new)
        routing = {(t, l): e for (_, t, l), e in seen.items()}
        k = cfg.top_k
        # Layer 1 has exactly top-k slots, so every new expert of layer 1 must move; host holds all.
        engine = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=f"{cfg.num_experts},{k}",
                                 host_experts=cfg.num_experts * 2, predictor=ExactNextLayer(routing))
        pf = engine.prefetcher
        gate = gate_transfers(engine.device_cache)

        def idle():
            return not pf._inflight and not pf._queue

        def hook(step):
            if step.positions[0, -1] < len(prompt):
                return  # prefill
            if step.moe_layer == 0:
                gate.clear()  # this step's prefetches for layer 1 will hang until released
            elif not late:
                gate.set()
                with pf._cond:  # the worker notifies it as each prefetch lands
                    assert pf._cond.wait_for(idle, timeout=60), "prefetch never landed"

        # Late: release layer 1's prefetches only once the engine is already waiting for them (no
        # timer: the order is forced, so the arrival is late by construction).
        real_wait_for = residency_mod.wait_for

        def release_then_wait(events):
            gate.set()
            return real_wait_for(events)

        engine.routing_hooks.append(hook)
        if late:
            residency_mod.wait_for = release_then_wait
        try:
            out = engine.generate([prompt], new, stop_at_eos=False)
        finally:
            residency_mod.wait_for = real_wait_for
            gate.set()
        return out.stats

    return _run_gated


def test_timely_prefetch_is_a_hit_and_late_prefetch_is_a_stall(_run_gated):
    timely, late = _run_gated(late=False), _run_gated(late=True)
    assert timely["prefetch"]["timely"] > 0 and timely["prefetch"]["late"] == 0
    assert late["prefetch"]["timely"] == 0 and late["prefetch"]["late"] > 0
    # The same experts arrive in the same order; only their timing differs. Every timely arrival
    # of the first run is a late one in the second: a miss, not a hit, and waited-for time.
    assert late["prefetch"]["late"] == timely["prefetch"]["timely"]
    # Same accesses; the late run's hits gain nothing from its prefetches (victims may differ by
    # one or two as arrivals interleave differently with on-demand loads).
    total = lambda s: s["device"]["hits"] + s["device"]["misses"]  # noqa: E731
    assert total(late) == total(timely)
    assert late["device"]["hits"] <= timely["device"]["hits"] - timely["prefetch"]["timely"] + 2
    waits = late["prefetch"]["late_wait_s"]
    assert waits > 0 and late["stall_s"] >= waits  # waited-for time is a stall


def test_oracles_and_restricted_mode_are_refused(tiny_model):
    cfg, g, p, ex, _ = tiny_model("mixtral")
    with pytest.raises(ValueError, match="oracle"):
        OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=2, predictor=get_predictor("oracle"))
    with pytest.raises(ValueError, match="restricted"):
        OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=2, mode="restricted",
                        predictor=get_predictor("prev-token"))


def test_no_reuse_is_on_demand_offloading(tiny_model):
    cfg, g, p, ex, resident = tiny_model("mixtral")
    prompt = [5, 9, 13, 22, 7]
    engine = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=cfg.num_experts, reuse=False)
    out = engine.generate([prompt], 6, stop_at_eos=False)
    assert out.tokens[0] == resident.generate([prompt], 6)[0].tolist()
    # Nothing survives a step: every decode access is a miss (hits only within one prefill step).
    assert out.stats["device"]["hits"] == 0
    assert out.stats["reuse"] is False


def test_emulated_link_is_serial_and_serves_demand_fetches_first(monkeypatch):
    """Events, not sleeps: each emulated transfer blocks until the test releases it, and the
    link's condition variable reports each thread that starts waiting for the link."""
    import queue
    import time as real_time

    from emoe_jax.runtime import tiers
    from emoe_jax.runtime.tiers import DeviceSlotCache

    cache = DeviceSlotCache(1, 4, 2, 8, 8, np.float32)
    cache.link_gbps = 1.0  # any value: the transfer time is replaced below
    weights = {w: np.zeros((8, 8), np.float32) for w in ("gate", "up", "down")}
    on_link: queue.Queue = queue.Queue()  # names, in the order they hold the link
    release = {n: threading.Event() for n in ("prefetch-1", "prefetch-2", "demand")}

    class Transfer:  # stands in for `time` in tiers: sleep = hold the link until released
        def __getattr__(self, name):
            return getattr(real_time, name)

        def sleep(self, seconds):
            name = threading.current_thread().name
            on_link.put(name)
            assert release[name].wait(60)

    class WatchedLink(threading.Condition):
        waits = threading.Semaphore(0)

        def wait(self, timeout=None):
            self.waits.release()
            return super().wait(timeout)

    monkeypatch.setattr(tiers, "time", Transfer())
    cache._link = WatchedLink()

    def copy(name, demand):
        t = threading.Thread(target=cache.to_device, args=(weights,), kwargs={"demand": demand}, name=name)
        t.start()
        return t

    threads = [copy("prefetch-1", False)]
    assert on_link.get(timeout=60) == "prefetch-1"  # holds the link
    threads.append(copy("prefetch-2", False))
    assert cache._link.waits.acquire(timeout=60)  # queued behind it
    threads.append(copy("demand", True))
    assert cache._link.waits.acquire(timeout=60)  # the demand fetch waits too: the link is serial
    assert on_link.empty()
    release["prefetch-1"].set()
    assert on_link.get(timeout=60) == "demand"  # ahead of the prefetch queued before it
    release["demand"].set()
    assert on_link.get(timeout=60) == "prefetch-2"
    release["prefetch-2"].set()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
