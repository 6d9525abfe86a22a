"""The one-jit decode step computes exactly what the all-resident model computes, never recompiles
while experts swap, and books the same kind of stats as the staged engine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from emoe_jax.runtime.compile_count import compile_count
from emoe_jax.runtime.engine import GenerationError, OffloadedEngine
from emoe_jax.runtime.ingraph_predictors import PrevTokenInGraph, SpecGatingInGraph
from emoe_jax.runtime.tiers import InMemoryExperts



class RandomInGraph:
    """Random scores: prefetches land anywhere (tests that predictions never change outputs)."""

    name = "random"

    def __init__(self, cfg):
        self.cfg = cfg

    def cache_key(self):
        return (self.name, self.cfg)

    def params(self):
        return ()

    def init_state(self, prefill):
        return jax.random.PRNGKey(int(prefill.tokens.sum()))

    def _scores(self, key, batch):
        key, sub = jax.random.split(key)
        return jax.random.uniform(sub, (batch, self.cfg.num_experts)), key

    def begin_step(self, model, pparams, pstate, tokens, positions):
        return self._scores(pstate, tokens.shape[0])

    def after_routing(self, model, pparams, pstate, ml, normed, ids):
        return self._scores(pstate, normed.shape[0])

    def end_step(self, pparams, pstate, ids):
        return pstate


class AdversarialInGraph(SpecGatingInGraph):
    """Scores the experts the next router likes least highest: prefetches evict what is needed."""

    name = "adversarial"

    def after_routing(self, model, pparams, pstate, ml, normed, ids):
        scores, pstate = super().after_routing(model, pparams, pstate, ml, normed, ids)
        return 1.0 - scores, pstate


PREDICTORS = {"none": None, "spec-gating": SpecGatingInGraph, "prev-token": PrevTokenInGraph,
              "random": RandomInGraph, "adversarial": AdversarialInGraph}


@pytest.fixture(scope="module")
def _engine(tiny_model):
    def _engine(family, slots, predictor="none", **kw):
        cfg, g, p, ex, resident = tiny_model(family)
        make = PREDICTORS[predictor]
        engine = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_experts=slots,
                                 predictor=None if make is None else make(cfg), **kw)
        return engine, resident

    return _engine


prompt_lists = st.lists(st.lists(st.integers(3, 120), min_size=1, max_size=9), min_size=1, max_size=3)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(["mixtral", "deepseek_v2", "qwen3_moe"]), data=st.data(),
       predictor=st.sampled_from(sorted(PREDICTORS)), prompts=prompt_lists)
def test_onejit_equals_all_resident(_engine, tiny_model, assert_equals_resident, family, data, predictor, prompts):
    cfg = tiny_model(family)[0]
    slots = data.draw(st.integers(1, cfg.num_experts), label="slots")
    engine, resident = _engine(family, slots, predictor)
    new = 6
    out = engine.generate(prompts, new, stop_at_eos=False, return_logits=True)
    assert out.stats["decode_path"] == "onejit"
    assert_equals_resident(resident, prompts, out, new)
    if predictor != "none":
        pf = out.stats["prefetch"]
        # Every prefetch targets a layer of the same step, so each is settled by the end of it.
        assert pf["completed"] == pf["timely"] + pf["wasted"] and pf["in_graph"]


def test_onejit_logits_are_bit_equal_to_the_staged_engine(_engine):
    prompts = [[5, 9, 13, 22, 7], [3, 17, 8, 99]]
    for family in ("mixtral", "deepseek_v2"):
        outs = [_engine(family, 3, decode_path=path)[0].generate(prompts, 6, stop_at_eos=False, return_logits=True)
                for path in ("staged", "onejit")]
        assert [o.stats["decode_path"] for o in outs] == ["staged", "onejit"]
        assert outs[0].tokens == outs[1].tokens
        np.testing.assert_array_equal(outs[0].logits[:, 0], outs[1].logits[:, 0])  # same prefill
        np.testing.assert_allclose(outs[0].logits, outs[1].logits, atol=2e-6)


def test_no_compilation_after_warmup_while_experts_swap(_engine):
    engine, _ = _engine("mixtral", 1, "random")
    engine.generate([[5, 9, 13, 22, 7], [3, 17, 8, 99]], 8, stop_at_eos=False)  # warm-up
    before = compile_count()
    out = engine.generate([[7, 8, 9, 10, 11], [40, 41, 42, 43]], 8, stop_at_eos=False)
    assert compile_count() == before and out.stats["compiles"] == 0
    assert out.stats["decode_path"] == "onejit"
    assert out.stats["device"]["misses"] > 10 and out.stats["device"]["evictions"] > 10
    assert out.stats["waves"] > 0  # 2 rows x top-2 > 1 slot: waves inside the step


def test_stats_count_misses_bytes_and_host_hits(_engine):
    engine, _ = _engine("qwen3_moe", 2)
    out = engine.generate([[4, 5, 6, 7]], 8, stop_at_eos=False)
    s = out.stats
    assert s["h2d_bytes"] == s["device"]["misses"] * engine.device_cache.slot_bytes
    # The host stacks were filled from the disk tier once, charged to the first call.
    assert s["host"]["misses"] == engine.cfg.num_experts * engine.cfg.num_moe_layers
    again = engine.generate([[4, 5, 6, 7]], 8, stop_at_eos=False).stats
    assert again["host"]["misses"] == 0 and again["host"]["hits"] >= again["device"]["misses"]


def test_sampling_matches_the_staged_engine(_engine):
    prompts = [[5, 9, 13], [7, 7]]
    outs = [_engine("qwen3_moe", 2, decode_path=path)[0].generate(prompts, 8, temperature=0.8, top_p=0.9, seed=3,
                                                                    stop_at_eos=False).tokens
            for path in ("staged", "onejit")]
    assert outs[0] == outs[1]


def test_restricted_mode_and_teacher_forcing_on_onejit(_engine):
    engines = []
    for path in ("staged", "onejit"):
        engine, _ = _engine("mixtral", 3, mode="restricted", decode_path=path)
        for ml in range(engine.cfg.num_moe_layers):
            engine.preload(ml, [0, 2, 5])
        engines.append(engine)
    teacher = [[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]]
    outs = [e.generate([[5, 9, 13], [7, 7]], 6, teacher_tokens=teacher, return_logits=True) for e in engines]
    assert outs[1].stats["decode_path"] == "onejit"
    assert outs[0].tokens == outs[1].tokens
    np.testing.assert_allclose(outs[0].logits, outs[1].logits, atol=2e-6)
    assert outs[1].stats["device"]["misses"] == 0 and outs[1].stats["h2d_bytes"] == 0


def test_routing_hooks_see_the_same_routing_one_step_behind(_engine):
    seen = {}
    for path in ("staged", "onejit"):
        engine, _ = _engine("deepseek_v2", 2, decode_path=path)
        rows = seen[path] = []
        engine.routing_hooks.append(lambda r, rows=rows: rows.append((r.moe_layer, r.ids.copy(), r.positions.copy())))
        engine.generate([[5, 9, 13], [7, 7, 8, 9]], 5, stop_at_eos=False)
    assert len(seen["staged"]) == len(seen["onejit"])
    for (la, ia, pa), (lb, ib, pb) in zip(seen["staged"], seen["onejit"]):
        assert la == lb and np.array_equal(ia, ib) and np.array_equal(pa, pb)


def test_fallback_is_chosen_in_one_place_and_reported(_engine):
    engine, _ = _engine("mixtral", 2, host_experts=3)
    out = engine.generate([[5, 6, 7]], 4, stop_at_eos=False)
    assert out.stats["decode_path"] == "staged" and "host tier" in out.stats["decode_path_reason"]
    engine, _ = _engine("mixtral", 2, policy="lfu")
    assert engine.decode_path_for()[0] == "staged"
    engine, _ = _engine("mixtral", 2)
    engine.routing_override = lambda step: None
    assert engine.decode_path_for() == ("staged", "a routing override replaces the router's choice on the host")
    with pytest.raises(GenerationError, match="onejit"):
        _engine("mixtral", 2, host_experts=3, decode_path="onejit")[0].generate([[5, 6, 7]], 4)


def test_bfloat16_onejit_agrees_with_staged(tiny_model):
    cfg, g, p, ex, _ = tiny_model("qwen3_moe")
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, p)
    ex16 = [type(e)(*(a.astype(jnp.bfloat16) for a in e)) for e in ex]
    outs = [OffloadedEngine(cfg, g, p16, InMemoryExperts(ex16), device_experts=2, dtype=jnp.bfloat16,
                            decode_path=path).generate([[4, 5, 6, 7], [9, 9]], 8, stop_at_eos=False,
                                                       return_logits=True)
            for path in ("staged", "onejit")]
    assert outs[0].tokens == outs[1].tokens
    np.testing.assert_array_equal(outs[0].logits, outs[1].logits)


def test_observers_and_override_are_per_call(_engine):
    engine, _ = _engine("qwen3_moe", 2)
    seen = []
    out = engine.generate([[5, 9, 13]], 4, stop_at_eos=False, observers=[seen.append])
    assert out.stats["decode_path"] == "onejit" and len(seen) == 4 * engine.cfg.num_moe_layers  # prefill + 3 steps
    assert engine.routing_hooks == []
    forced = engine.generate([[5, 9, 13]], 4, stop_at_eos=False, routing_override=lambda step: None)
    assert forced.stats["decode_path"] == "staged" and engine.routing_override is None
    assert forced.tokens == out.tokens


def test_engine_config_is_one_frozen_value(tiny_model):
    import dataclasses

    from emoe_jax import EngineConfig

    cfg, g, p, ex, _ = tiny_model("mixtral")
    base = EngineConfig(device_experts=2, decode_path="staged")
    engine = OffloadedEngine(cfg, g, p, InMemoryExperts(ex), base, host_experts=5)
    assert engine.config == dataclasses.replace(base, host_experts=5) and engine.slots == [2, 2]
    with pytest.raises(dataclasses.FrozenInstanceError):
        engine.config.mode = "restricted"
    with pytest.raises(TypeError, match="unknown engine option"):
        OffloadedEngine(cfg, g, p, InMemoryExperts(ex), device_expert=2)
    with pytest.raises(ValueError, match="decode_path"):
        EngineConfig(decode_path="fast")
    with pytest.raises(ValueError, match="nothing scores the host tier"):
        EngineConfig(host_policy="score")


def _slot_state(owner, last_use, score, num_experts=6):
    """A hand-built SlotState whose slot s holds weights filled with its expert id (H = I = 1)."""
    from emoe_jax.model.moe import ExpertSlots
    from emoe_jax.runtime.onejit import SlotState

    owner = np.asarray(owner, np.int32)
    table = np.full(num_experts, -1, np.int32)
    table[owner[owner >= 0]] = np.flatnonzero(owner >= 0)
    w = jnp.asarray(np.maximum(owner, 0), jnp.float32).reshape(-1, 1, 1)
    return SlotState(ExpertSlots(w, w, w), jnp.asarray(table), jnp.asarray(owner), jnp.asarray(last_use, jnp.int32),
                     jnp.zeros(len(owner), bool), jnp.asarray(score, jnp.float32))


def test_score_eviction_evicts_the_lowest_scored_expert_and_admission_compares_with_it():
    from emoe_jax.model.moe import ExpertSlots
    from emoe_jax.runtime.onejit import _fetch_list

    host = ExpertSlots(*[jnp.arange(6, dtype=jnp.float32).reshape(6, 1, 1)] * 3)  # expert e's weights = e
    #        slot:    0    1    2        experts 0, 1, 2 resident; 0 is the least recently used
    owner, last_use = [0, 1, 2], [1, 5, 3]
    score = [0.9, 0.1, 0.5, 0.0, 0.0, 0.3]

    def fetch(state, expert, protect=(), prefetch=False, eviction="score", admission="all"):
        protected = np.zeros(6, bool)
        protected[[expert, *protect]] = True
        st, n, ev = jax.jit(lambda s: _fetch_list(s, host, jnp.array([expert], jnp.int32), jnp.asarray(protected),
                                                  jnp.int32(9), prefetch, eviction, admission))(state)
        return np.asarray(st.owner).tolist(), int(n), float(st.slots.gate[int(np.asarray(st.table)[expert])].item()) \
            if int(n) else None

    state = _slot_state(owner, last_use, score)
    assert fetch(state, 4, eviction="lru")[0] == [4, 1, 2]  # LRU: expert 0, the oldest
    assert fetch(state, 4) == ([0, 4, 2], 1, 4.0)  # score: expert 1, the lowest score (its slot now holds 4)
    assert fetch(state, 4, protect=[1])[0] == [0, 1, 4]  # a needed expert is never evicted: next lowest, 2
    tied = _slot_state(owner, last_use, [0.5, 0.5, 0.5, 0, 0, 0])
    assert fetch(tied, 4)[0] == [4, 1, 2]  # equal scores: LRU decides
    assert fetch(_slot_state([0, -1, 2], last_use, score), 4)[0] == [0, 4, 2]  # an empty slot first
    # Cost-aware admission: expert 5 (0.3) is worth more than the victim, expert 1 (0.1); expert 3 (0.0) is not.
    assert fetch(state, 5, prefetch=True, admission="cost")[:2] == ([0, 5, 2], 1)
    assert fetch(state, 3, prefetch=True, admission="cost")[:2] == ([0, 1, 2], 0)
    assert fetch(state, 3, prefetch=True)[:2] == ([0, 3, 2], 1)  # admission "all" takes it


@pytest.mark.parametrize("predictor,slots,admission,prefetch_k", [
    ("spec-gating", 2, "all", None), ("random", 1, "cost", None), ("prev-token", 3, "cost", None),
    ("spec-gating", 3, "all", 0),  # the predictor only ranks the slots: nothing is prefetched
])
def test_score_eviction_on_onejit_equals_all_resident(_engine, assert_equals_resident, predictor, slots, admission,
                                                      prefetch_k):
    prompts = [[5, 9, 13, 22, 7], [3, 17, 8, 99]]
    engine, resident = _engine("mixtral", slots, predictor, policy="score", admission=admission,
                               prefetch_k=prefetch_k)
    out = engine.generate(prompts, 6, stop_at_eos=False, return_logits=True)
    assert out.stats["decode_path"] == "onejit" and engine._onejit_ranking()["eviction"] == "score"
    assert out.stats["device"]["evictions"] > 0
    assert (out.stats["prefetch"]["completed"] == 0) == (prefetch_k == 0)
    assert_equals_resident(resident, prompts, out, 6)
    # The step hands its latest scores back to the staged path's ScorePolicy.
    assert engine.device_cache.policies[1].scores


def test_score_policy_needs_a_predictor(_engine):
    with pytest.raises(ValueError, match="predictor's scores"):
        _engine("mixtral", 2, policy="score")
    with pytest.raises(ValueError, match="policy='score'"):
        _engine("mixtral", 2, "spec-gating", admission="cost")
