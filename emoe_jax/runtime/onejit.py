"""The decode step as one donated jitted executable: routing, misses, fetches, mixing, sampling.

Per decode step the host dispatches one executable and reads back one thing, the
next token; routing ids and counters come back asynchronously and are booked one
step behind. Inside, for each decoder layer:
  1. attention with the KV cache, router top-k (restricted mode: over resident experts);
  2. MoE layers: the distinct experts of the step ("needed") are looked up in the
     expert->slot table; each miss is fetched inside the graph, guarded by a
     `lax.cond`: `dynamic_index_in_dim(host_stack, expert)` then at once
     `device_put(..., Space.Device)` (the form XLA's host offloader supports), and a
     donated `dynamic_update_index_in_dim` into the victim slot among those that hold
     no expert of this step: empty slots first, then the least recently used one, or
     (score eviction) the one whose expert the predictor scored lowest, LRU breaking ties;
     when a step needs more distinct experts than slots, they pass through the
     slots in waves (resident ones first) whose float32 partial sums add up;
  3. an in-graph predictor (optional) scores the next MoE layer's experts and their
     top ones are copied into that layer's slots *before* this layer's expert
     compute, so XLA can overlap the copies with it. A prefetch only fills slots; a
     layer still computes with exactly the experts its tokens routed to. With score
     eviction the scores (max over the batch's live rows) are also kept per expert as
     the layer's eviction rank, and with cost-aware admission a prediction is copied
     only if it scores above the expert it would evict; a predictor with reuse rows
     (recency-reuse) books, after each layer's fetches, that layer's chance of each
     expert to be routed again as its rank;
  4. routed experts over the slots + shared experts, residual.
Then the final norm, the vocabulary head and the sampler (greedy, temperature,
top-p), all in the same executable.

Shapes never depend on the routing: slot buffers [S, ...], tables [E] and [S], the
number of waves (a function of batch, top-k and S) and of guarded fetches are
static, so swapping experts never recompiles.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import MoEConfig
from ..model.moe import ExpertSlots, Routing, expert_act, mix_experts
from . import stages
from .engine_config import check_eviction_scores

_NEVER = jnp.iinfo(jnp.int32).max  # eviction score of a slot that may not be evicted
_EMPTY = jnp.iinfo(jnp.int32).min  # eviction score of an empty slot: filled first
UNROLL_FETCHES = 16  # guarded fetches per wave unrolled (flat graph); more go through a fori_loop


class SlotState(NamedTuple):
    """One MoE layer's device slot cache, carried (donated) from step to step."""

    slots: ExpertSlots  # gate/up [S, H, I], down [S, I, H]
    table: jax.Array  # [E] int32: slot of each expert, -1 when not resident
    owner: jax.Array  # [S] int32: expert in each slot, -1 when empty
    last_use: jax.Array  # [S] int32: step clock of the slot's last use (LRU)
    prefetched: jax.Array  # [S] bool: filled by a prefetch and not yet looked at by its layer
    score: jax.Array  # [E] float32: the predictor's latest score of each expert (score eviction's rank)


COUNTERS = ("hits", "misses", "evictions", "prefetched", "timely", "wasted", "waves")


class StepReport(NamedTuple):
    """What the MoE layers did in one step: three arrays, so the host copies three things back."""

    ids: jax.Array  # [Lm, B, k] int32 routed experts
    weights: jax.Array  # [Lm, B, k] float32
    counters: jax.Array  # [Lm, len(COUNTERS)] int32, columns named by COUNTERS


class LayerReport(NamedTuple):
    """What one MoE layer did in one step (packed into a StepReport)."""

    ids: jax.Array  # [B, k] int32 routed experts
    weights: jax.Array  # [B, k] float32
    hits: jax.Array  # () int32: needed experts already in a slot
    misses: jax.Array  # () int32: needed experts fetched now (demand)
    evictions: jax.Array  # () int32: fetches (demand + prefetch) that replaced a resident expert
    prefetched: jax.Array  # () int32: experts copied by predictions issued at this layer (layer 0: also at token start)
    timely: jax.Array  # () int32: needed experts that a prefetch had put in place
    wasted: jax.Array  # () int32: prefetched experts this layer did not need
    waves: jax.Array  # () int32: waves that ran (1 when the step's experts fit the slots)


def num_waves(pairs: int, num_experts: int, slots: int) -> int:
    """Static bound on the waves of a step with `pairs` token-expert pairs."""
    return max(1, math.ceil(min(pairs, num_experts) / slots))


EVICTIONS = ("lru", "score")  # device eviction the step implements
ADMISSIONS = ("all", "cost")  # "cost": a prefetch must score above its victim


def _victim(state: SlotState, protected, eviction: str):
    """The slot a fetch writes into, and whether it is free to take (holds no `protected` [E] expert).

    Empty slots first; then LRU, or with score eviction the lowest score of the slot's expert,
    LRU breaking ties. A locked slot is chosen only when every slot is locked."""
    owner = state.owner
    held = owner >= 0
    safe_owner = jnp.maximum(owner, 0)
    locked = held & protected[safe_owner]
    recency = jnp.where(locked, _NEVER, jnp.where(held, state.last_use, _EMPTY))  # [S]
    if eviction == "score":
        primary = jnp.where(locked, jnp.inf, jnp.where(held, state.score[safe_owner], -jnp.inf))  # [S]
        recency = jnp.where(primary == jnp.min(primary), recency, _NEVER)
    victim = jnp.argmin(recency).astype(jnp.int32)
    return victim, ~locked[victim]


def _fetch(state: SlotState, host: ExpertSlots, expert, victim, clock, prefetch: bool):
    """Copy `expert` from the host stacks into slot `victim` (from `_victim`). Returns the new
    state and whether a resident expert was evicted."""
    owner = state.owner
    old = owner[victim]
    table = state.table.at[jnp.maximum(old, 0)].set(jnp.where(old >= 0, -1, state.table[jnp.maximum(old, 0)]))
    table = table.at[expert].set(victim)

    def put(buf, stack):
        w = jax.device_put(jax.lax.dynamic_index_in_dim(stack, expert, keepdims=False), jax.memory.Space.Device)
        return jax.lax.dynamic_update_index_in_dim(buf, w.astype(buf.dtype), victim, 0)

    slots = ExpertSlots(*(put(b, s) for b, s in zip(state.slots, host)))
    new = state._replace(slots=slots, table=table, owner=owner.at[victim].set(expert),
                         last_use=state.last_use.at[victim].set(clock),
                         prefetched=state.prefetched.at[victim].set(prefetch))
    return new, (old >= 0).astype(jnp.int32)


def _fetch_list(state: SlotState, host: ExpertSlots, experts, protected, clock, prefetch: bool,
                eviction: str = "lru", admission: str = "all"):
    """Guarded fetches of `experts` [F] (-1 = nothing); already-resident ones are skipped.
    Returns (state, fetched count, evictions)."""

    def one(carry, e):
        st, fetched, evicted = carry
        safe = jnp.maximum(e, 0)
        go = (e >= 0) & (st.table[safe] < 0)
        if prefetch:  # a prefetch needs a slot that holds no protected expert
            victim, free = _victim(st, protected, eviction)
            go = go & free
            if admission == "cost":  # and must be worth more than what it evicts
                old = st.owner[victim]
                go = go & ((old < 0) | (st.score[safe] > st.score[jnp.maximum(old, 0)]))
            fetch = lambda s: _fetch(s, host, safe, victim, clock, True)  # noqa: E731
        else:  # the caller guarantees a slot without a needed expert
            fetch = lambda s: _fetch(s, host, safe, _victim(s, protected, eviction)[0], clock, False)  # noqa: E731
        st, ev = jax.lax.cond(go, fetch, lambda s: (s, jnp.int32(0)), st)
        return st, fetched + go.astype(jnp.int32), evicted + ev

    carry = (state, jnp.int32(0), jnp.int32(0))
    if experts.shape[0] <= UNROLL_FETCHES:
        for j in range(experts.shape[0]):
            carry = one(carry, experts[j])
    else:
        carry = jax.lax.fori_loop(0, experts.shape[0], lambda j, c: one(c, experts[j]), carry)
    return carry


def _touch(state: SlotState, used, clock) -> SlotState:
    """Stamp the slots of `used` [E] bool experts with the clock (LRU)."""
    hit = (state.owner >= 0) & used[jnp.maximum(state.owner, 0)]
    return state._replace(last_use=jnp.where(hit, clock, state.last_use))


def _moe_layer(layer, residual, normed, routing: Routing, state: SlotState, host: ExpertSlots, clock, live, *,
               method: str, restricted: bool, eviction: str = "lru"):
    """Make the step's experts resident (waves if needed) and run the layer's FFN. live [B] bool:
    rows that are real (a batch padded up to its bucket has dummy rows, which need no expert:
    their pairs fall on non-resident slots and add 0, and only their own output is affected)."""
    b, t, h = normed.shape
    num_experts = state.table.shape[0]
    num_slots = state.owner.shape[0]
    flat = routing.ids.reshape(-1)  # [N*k]
    pair_live = jnp.repeat(live, flat.shape[0] // b)  # [N*k]
    needed = jnp.zeros(num_experts, bool).at[jnp.where(pair_live, flat, num_experts)].set(True, mode="drop")  # [E]
    resident = state.table >= 0
    held = state.owner >= 0
    used_slot = held & needed[jnp.maximum(state.owner, 0)]  # [S]
    timely = jnp.sum(used_slot & state.prefetched).astype(jnp.int32)
    wasted = jnp.sum(held & ~used_slot & state.prefetched).astype(jnp.int32)
    state = state._replace(prefetched=jnp.zeros_like(state.prefetched))
    hits = jnp.sum(needed & resident).astype(jnp.int32)
    misses = jnp.sum(needed & ~resident).astype(jnp.int32)
    if restricted:  # the router only chose resident experts: nothing moves
        out = layer.ffn(residual, normed, routing, state.slots, state.table, method)
        return out, _touch(state, needed, clock), (hits, jnp.int32(0), jnp.int32(0), timely, wasted, jnp.int32(1))

    waves = num_waves(flat.shape[0], num_experts, num_slots)
    per_wave = min(num_slots, flat.shape[0], num_experts)  # static bound on a wave's misses
    if waves == 1:
        def fetch_misses(st):
            missing = jnp.nonzero(needed & ~resident, size=per_wave, fill_value=-1)[0].astype(jnp.int32)
            st, _, ev = _fetch_list(st, host, missing, needed, clock, prefetch=False, eviction=eviction)
            return st, ev

        # One predicate for the whole layer: with every needed expert resident (the common case at
        # high residency) the step skips all the per-expert guards.
        state, evicted = jax.lax.cond(misses > 0, fetch_misses, lambda st: (st, jnp.int32(0)), state)
        state = _touch(state, needed, clock)
        out = layer.ffn(residual, normed, routing, state.slots, state.table, method)
        return out, state, (hits, misses, evicted, timely, wasted, jnp.int32(1))

    # Waves: rank the needed experts resident-first, wave w takes ranks [w*S, (w+1)*S).
    expert_ids = jnp.arange(num_experts, dtype=jnp.int32)
    key = jnp.where(needed, jnp.where(resident, 0, 1), 2) * num_experts + expert_ids
    rank = jnp.zeros(num_experts, jnp.int32).at[jnp.argsort(key)].set(expert_ids)  # [E]
    wave_of = jnp.where(needed, rank // num_slots, -1)  # [E]
    x = normed.reshape(-1, h)
    acc = jnp.zeros((x.shape[0], h), jnp.float32)
    evictions, ran = jnp.int32(0), jnp.int32(0)
    for w in range(waves):
        in_wave = wave_of == w

        def run(carry, in_wave=in_wave):
            st, acc_, ev_ = carry
            missing = jnp.nonzero(in_wave & (st.table < 0), size=per_wave, fill_value=-1)[0].astype(jnp.int32)
            st, _, ev = _fetch_list(st, host, missing, in_wave, clock, prefetch=False, eviction=eviction)
            st = _touch(st, in_wave, clock)
            wave_map = jnp.where(in_wave, st.table, -1)
            acc_ = acc_ + mix_experts(x, routing, st.slots, wave_map, method, out_dtype=jnp.float32,
                                      act=expert_act(layer.mlp.cfg))
            return st, acc_, ev_ + ev

        state, acc, evictions = jax.lax.cond(jnp.any(in_wave), run, lambda c: c, (state, acc, evictions))
        ran = ran + jnp.any(in_wave).astype(jnp.int32)
    out = layer.mlp.add_shared(x, acc.astype(normed.dtype))
    return residual + out.reshape(b, t, h), state, (hits, misses, evictions, timely, wasted, ran)


def _expert_scores(scores, live):
    """scores [B, E] -> [E] float32: the best over live rows (an expert any row is likely to use is
    kept), finite so that the eviction rank of a held slot always stays below a locked one's."""
    best = jnp.max(jnp.where(live[:, None], scores.astype(jnp.float32), -jnp.inf), axis=0)
    return jnp.nan_to_num(best, nan=0.0, posinf=3e38, neginf=-3e38)


def _prefetch(state: SlotState, host: ExpertSlots, scores, clock, prefetch_k: int, min_score: float, live,
              eviction: str = "lru", admission: str = "all"):
    """Copy the top `prefetch_k` experts per row of scores [B, E] into this layer's slots.
    Highest scores first over the batch; a prefetch never evicts another of the round. Dummy rows
    (live [B] False) prefetch nothing."""
    if prefetch_k <= 0:
        return state, jnp.int32(0), jnp.int32(0)
    scores = jnp.where(live[:, None], scores.astype(jnp.float32), -jnp.inf)
    top_scores, top_ids = jax.lax.top_k(scores, prefetch_k)  # [B, pk]
    flat_scores, flat_ids = top_scores.reshape(-1), top_ids.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(-flat_scores, stable=True)
    candidates = jnp.where(flat_scores[order] > min_score, flat_ids[order], -1)  # [B*pk]
    num_experts = state.table.shape[0]
    wanted = jnp.zeros(num_experts, bool).at[jnp.where(candidates >= 0, candidates, num_experts)].set(
        True, mode="drop")  # [E]
    # Skip every guard at once when all wanted experts are resident already (common for good predictors).
    return jax.lax.cond(jnp.any(wanted & (state.table < 0)),
                        lambda st: _fetch_list(st, host, candidates, wanted, clock, prefetch=True, eviction=eviction,
                                               admission=admission),
                        lambda st: (st, jnp.int32(0), jnp.int32(0)), state)


class StepOut(NamedTuple):
    tokens: jax.Array  # [B] int32 next tokens
    caches: list
    slot_states: list  # per MoE layer SlotState
    predictor_state: Any
    report: StepReport | None  # None for a model without MoE layers
    logits: jax.Array | None  # [B, V] float32 when asked for


# key -> (graphdef, predictor, step); the first two are kept alive so their ids stay unique. Bounded:
# each compiled step holds memory mappings and buffers, and a process may build many engines.
_STEPS: "OrderedDict[tuple, tuple[Any, Any, Any]]" = OrderedDict()
MAX_CACHED_STEPS = 16


def build_decode_step(cfg: MoEConfig, graphdef, *, method: str = "auto", restricted: bool = False,
                      greedy: bool = True, top_p_enabled: bool = False, return_logits: bool = False,
                      predictor=None, prefetch_k: int | None = None, min_score: float = 0.0,
                      eviction: str = "lru", admission: str = "all", eviction_scores: str = "latest"):
    """The jitted decode step for one engine configuration, shared by engines of the same model.

    The graph definition is closed over (hashing an nnx GraphDef as a static jit
    argument on every call costs more than a small layer's compute) and the cache is
    keyed by its identity, so engines built on one (graphdef, params) pair reuse one
    compiled step per shape. eviction: "lru", or "score" (needs a predictor: each slot ranks by its
    expert's latest predicted score, LRU breaking ties); admission: "all", or "cost" (needs score
    eviction: a prediction is copied only if it scores above the expert it would evict). Returns
    step(params, host_layers, caches, slot_states, predictor_params, predictor_state,
         tokens [B] int32, live [B] bool, write_index, pad_len [B], positions [B], clock, key,
         sample_index, temperature, top_p) -> StepOut,
    with caches, slot_states and predictor_state donated."""
    if eviction not in EVICTIONS or admission not in ADMISSIONS:
        raise ValueError(f"the one-jit step evicts by {' or '.join(EVICTIONS)} and admits {' or '.join(ADMISSIONS)}; "
                         f"got eviction={eviction!r}, admission={admission!r}")
    if (eviction == "score" or admission == "cost") and predictor is None:
        raise ValueError("score eviction and cost-aware admission rank experts by a predictor's scores; "
                         "give an in-graph predictor")
    if admission == "cost" and eviction != "score":
        raise ValueError("cost-aware admission compares a prediction with its victim's score: use eviction='score'")
    pkey = None if predictor is None else getattr(predictor, "cache_key", lambda: id(predictor))()
    check_eviction_scores(eviction_scores)
    key = (id(graphdef), cfg, method, restricted, greedy, top_p_enabled, return_logits, pkey, prefetch_k,
           float(min_score), eviction, admission, eviction_scores)
    if key not in _STEPS:
        _STEPS[key] = (graphdef, predictor, _make_step(cfg, graphdef, method, restricted, greedy, top_p_enabled,
                                                       return_logits, predictor, prefetch_k, min_score, eviction,
                                                       admission, eviction_scores))
        while len(_STEPS) > MAX_CACHED_STEPS:
            _STEPS.popitem(last=False)
    _STEPS.move_to_end(key)
    return _STEPS[key][2]


def _make_step(cfg, graphdef, method, restricted, greedy, top_p_enabled, return_logits, predictor, prefetch_k,
               min_score, eviction, admission, eviction_scores):
    moe_of_layer = {layer: moe_layer for moe_layer, layer in enumerate(cfg.moe_layers)}
    num_moe = cfg.num_moe_layers
    pk = cfg.top_k if prefetch_k is None else int(prefetch_k)
    by_score = eviction == "score" and not restricted
    # The predictor runs to prefetch, or only to rank slots for eviction (prefetch_k=0).
    prefetching = predictor is not None and not restricted and (pk > 0 or by_score)
    # A predictor with reuse rows (each expert's chance to be routed again at the layer that just ran)
    # gives them to score eviction, as the staged path's reuse hook and the simulator's reuse scores.
    reuse_rows = by_score and prefetching and hasattr(predictor, "reuse_row")
    book_predictions = by_score and eviction_scores == "latest"

    def predicted(state: SlotState, host, scores, clock, live):
        """Book the scores of one MoE layer's experts and prefetch its top ones."""
        if book_predictions:
            state = state._replace(score=_expert_scores(scores, live))
        return _prefetch(state, host, scores, clock, pk, min_score, live, eviction, admission)

    def step(params, host_layers, caches, slot_states, pparams, pstate, tokens, live, write_index, pad_len,
             positions, clock, key, sample_index, temperature, top_p):
        model = nnx.merge(graphdef, params)
        slot_states, caches = list(slot_states), list(caches)
        b = tokens.shape[0]
        x = model.embed(tokens[:, None])
        # Prefetches into each MoE layer, booked in the report of the layer that issued them
        # (layer 0's own entry holds those issued at the start of the token).
        issued = [(jnp.int32(0), jnp.int32(0)) for _ in range(num_moe)]  # (prefetched, evictions)
        if prefetching and num_moe:
            scores, pstate = predictor.begin_step(model, pparams, pstate, tokens, positions)
            if scores is not None:
                slot_states[0], n0, ev0 = predicted(slot_states[0], host_layers[0], scores, clock, live)
                issued[0] = (n0, ev0)
        reports = []
        for layer, block in enumerate(model.layers):
            moe_layer = moe_of_layer.get(layer)
            resident = (slot_states[moe_layer].table >= 0) if (restricted and moe_layer is not None) else None
            residual, normed, caches[layer], routing = block.attend_and_route(x, caches[layer], write_index, pad_len,
                                                                           resident)
            if moe_layer is None:
                x = block.ffn(residual, normed, None, None, None, method)
                continue
            n_prefetched, pf_evicted = issued[moe_layer]
            if prefetching and moe_layer + 1 < num_moe:
                # Issued before this layer's expert compute, which does not depend on it.
                scores, pstate = predictor.after_routing(model, pparams, pstate, moe_layer, normed[:, 0],
                                                         routing.ids.reshape(b, -1))
                if scores is not None:
                    slot_states[moe_layer + 1], n, ev = predicted(slot_states[moe_layer + 1],
                                                                  host_layers[moe_layer + 1], scores, clock, live)
                    n_prefetched, pf_evicted = n_prefetched + n, pf_evicted + ev
            x, slot_states[moe_layer], (hits, misses, evicted, timely, wasted, waves) = _moe_layer(
                block, residual, normed, routing, slot_states[moe_layer], host_layers[moe_layer], clock, live, method=method,
                restricted=restricted, eviction=eviction if by_score else "lru")
            if reuse_rows:  # after the layer's own fetches, as the staged path books its reuse row
                reuse, pstate = predictor.reuse_row(pparams, pstate, moe_layer, routing.ids.reshape(b, -1))
                slot_states[moe_layer] = slot_states[moe_layer]._replace(score=_expert_scores(reuse, live))
            reports.append(LayerReport(routing.ids.reshape(b, -1), routing.weights.reshape(b, -1), hits, misses,
                                       evicted + pf_evicted, n_prefetched, timely, wasted, waves))
        if prefetching:
            ids = jnp.stack([r.ids for r in reports]) if reports else None  # [Lm, B, k]
            pstate = predictor.end_step(pparams, pstate, ids)
        h = model.norm(x[:, -1])
        logits = (model.embed_tokens.attend(h) if cfg.tie_word_embeddings else model.lm_head(h)).astype(jnp.float32)
        if greedy:
            nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            nxt = stages.sample(logits, jax.random.fold_in(key, sample_index), temperature, top_p,
                                top_p_enabled=top_p_enabled)
        report = None
        if reports:
            counters = jnp.stack([jnp.stack([getattr(r, c) for c in COUNTERS]) for r in reports])  # [Lm, C]
            report = StepReport(jnp.stack([r.ids for r in reports]), jnp.stack([r.weights for r in reports]),
                                counters.astype(jnp.int32))
        return StepOut(nxt, caches, slot_states, pstate, report, logits if return_logits else None)

    return jax.jit(step, donate_argnums=(2, 3, 5))


__all__ = ["SlotState", "StepReport", "COUNTERS", "StepOut", "build_decode_step", "num_waves", "EVICTIONS",
           "ADMISSIONS"]
