"""The simulator's hot loop: replay one prompt against a cache with a transfer model.

Compiled with numba when it is installed (about 1 s per million token-layer
steps); otherwise the same code runs as plain Python, correct but some 100x
slower. ``tests/sim_reference.py`` is an independent, readable version of
the same model that the tests compare this against.

Model (times in seconds; see docs/simulator.md):

Per token-major step g (token t, layer l), at time ``now``:
1. ``advance(now)``: queued prefetches start in FIFO order on the link that is
   free first, if they can start by ``now``. A prefetch whose target step has
   already run is cancelled. Starting a transfer claims a cache slot: if the
   pool is full, the eviction policy picks a victim among resident experts that
   are not in transfer; with none, the prefetch is cancelled.
2. Score updates (``score`` eviction) and, unless the token is in warm-up, the
   step's prefetch requests: a resident expert is refreshed (LRU recency, like
   MoE-Beyond's "insert at MRU"), a queued one is left alone, any other is
   queued; after each, ``advance(now)`` so an idle link starts it at once.
3. Demand: for each routed expert of (t, l): resident and arrived -> hit
   (timely prefetch if it came by prefetch and is unused); resident but still
   in transfer -> late prefetch, wait for it; queued -> late prefetch, taken
   out of the queue and fetched now ahead of every queued prefetch; absent ->
   demand miss, fetched now. Demand fetches never evict the step's own experts.
   With demand bypass (``prm.bypass``), a copied miss whose predicted reuse is below
   the score of the victim it would evict is copied into a scratch slot (held back
   from the capacity by the caller) and not cached: the link time is charged, nothing
   is evicted.
4. stall = (latest arrival among the step's experts) - now, at least 0;
   now += stall + layer_compute.
Transfers take ``xfer`` seconds each on one of ``n_links`` serial links.
Score eviction ranks each expert's latest score (+ ``crf_weight`` x its CRF,
LRFU's recency-frequency: the sum over its accesses of ``crf_decay`` ** tokens since);
with ``distance_weight`` > 0, by expected wait to next use (``_rank_value``).
With ``prm.issue_after_routing`` step 2 for step s+1 (its score updates and prefetch
requests, which read the routing of steps <= s only) runs at the end of step s's
demand instead of at the start of step s+1: the requests queue behind step s's
demand fetches and can move while step s computes. Not when s+1 is a token's first
layer: its predictions read that token's id, known only once token t ends.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from emoe_jax.numba_cache import configure as _configure_numba_cache
from emoe_jax.predict.base import EVICTION_POLICIES

_configure_numba_cache()  # compiled code is cached in a user cache directory, not beside this file

try:  # numba is optional: without it the kernel runs as plain (slow) Python.
    import numba

    njit = numba.njit(cache=True, nogil=True)
    # Helpers are inlined into run_prompt: they run per slot or per request, and a call
    # costs more than their own work.
    njit_inline = numba.njit(cache=True, nogil=True, inline="always")
    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is absent
    HAVE_NUMBA = False

    def njit(f):
        return f

    njit_inline = njit


POLICY_IDS = {name: i for i, name in enumerate(EVICTION_POLICIES)}
LRU, LFU, BELADY, SCORE = (POLICY_IDS[name] for name in ("lru", "lfu", "belady", "score"))
MISS_MODES = {"copy": 0, "host": 1, "choose": 2}
MISS_COPY, MISS_HOST, MISS_CHOOSE = (MISS_MODES[name] for name in ("copy", "host", "choose"))
NEVER = np.int64(2**62)  # next use of an expert that is never used again
ABSENT, QUEUED, RESIDENT = 0, 1, 2  # CacheState.status of a key

# Counters: the kernel adds to CacheState.counts (int64) and .floats (float64) by these indices;
# `read_counters` turns them into named figures, the only place that reads them by index.
INT_COUNTERS = ("accesses", "hits", "timely_prefetches", "late_prefetches", "demand_misses",
                "prefetches_issued", "prefetches_started", "prefetches_used", "prefetches_wasted",
                "prefetches_cancelled", "demand_transfers", "tokens", "evictions", "steps",
                "prefetches_refused",  # refused by cost-aware admission
                "host_computes",  # misses computed on the host
                "demand_bypassed")  # copied misses computed from a scratch slot, not cached  # fmt: skip
(C_ACCESSES, C_HITS, C_TIMELY, C_LATE, C_MISSES, C_PF_ISSUED, C_PF_STARTED, C_PF_USED, C_PF_WASTED,
 C_PF_CANCELLED, C_DEMAND_XFERS, C_TOKENS, C_EVICTIONS, C_STEPS, C_PF_REFUSED, C_HOST,
 C_BYPASS) = range(len(INT_COUNTERS))
FLOAT_COUNTERS = ("stall_seconds", "bytes_moved",
                  "now",  # the replay clock
                  "host_seconds",  # host compute seconds of counted steps
                  "last_step")  # duration of the latest step (stall + compute): cost-aware admission's pace  # fmt: skip
F_STALL, F_BYTES, F_NOW, F_HOST, F_LAST_STEP = range(len(FLOAT_COUNTERS))


class CacheState(NamedTuple):
    """All mutable simulator state: the cache, the prefetch queue, the links, the clock, the counters."""

    status: np.ndarray  # [K] int8 ABSENT / QUEUED / RESIDENT
    ready: np.ndarray  # [K] float64 arrival time of a resident expert
    last_use: np.ndarray  # [K] int64 recency stamp (larger = more recent)
    freq: np.ndarray  # [K] int64 accesses (LFU)
    crf: np.ndarray  # [K] float64 LRFU's combined recency-frequency, as of token crf_tok
    crf_tok: np.ndarray  # [K] int64 global token at which crf was last brought up to date
    next_use: np.ndarray  # [K] int64 next step that routes to it (Belady)
    score: np.ndarray  # [K] float32 latest predicted score (score eviction, admission)
    prefetched: np.ndarray  # [K] uint8 1: arrived by prefetch, not used yet
    pinned: np.ndarray  # [K] uint8 1: needed by the current step
    qseq: np.ndarray  # [K] int64 sequence number of its live queue entry
    slots: np.ndarray  # [P, cap] int32 keys per pool (-1: empty)
    pool_size: np.ndarray  # [P] int64
    slot_pos: np.ndarray  # [K] int64 position in its pool's slots (-1: absent)
    link_free: np.ndarray  # [links] float64 time each link is free
    q_key: np.ndarray  # [Q] int32 ring buffer of queued prefetches
    q_seq: np.ndarray  # [Q] int64
    q_issue: np.ndarray  # [Q] float64 time the prefetch was requested
    q_target: np.ndarray  # [Q] int64 step it is for
    q_score: np.ndarray  # [Q] float32 predicted chance its target routes to it
    q_ptr: np.ndarray  # [2] int64 head, tail (monotonic)
    ints: np.ndarray  # [4] int64 recency clock, queue sequence counter, current global token, current layer
    counts: np.ndarray  # [len(INT_COUNTERS)] int64
    floats: np.ndarray  # [len(FLOAT_COUNTERS)] float64


def new_cache_state(num_keys: int, num_pools: int, pool_capacity: int, n_links: int) -> CacheState:
    """An empty cache of ``num_pools`` pools of ``pool_capacity`` slots over ``num_keys`` (layer, expert) keys."""
    qcap = 2 * num_keys + 16  # live entries <= K; stale ones are compacted away
    return CacheState(
        status=np.zeros(num_keys, np.int8), ready=np.zeros(num_keys, np.float64),
        last_use=np.zeros(num_keys, np.int64), freq=np.zeros(num_keys, np.int64),
        crf=np.zeros(num_keys, np.float64), crf_tok=np.zeros(num_keys, np.int64),
        next_use=np.full(num_keys, NEVER, np.int64), score=np.zeros(num_keys, np.float32),
        prefetched=np.zeros(num_keys, np.uint8), pinned=np.zeros(num_keys, np.uint8),
        qseq=np.zeros(num_keys, np.int64), slots=np.full((num_pools, pool_capacity), -1, np.int32),
        pool_size=np.zeros(num_pools, np.int64), slot_pos=np.full(num_keys, -1, np.int64),
        link_free=np.zeros(n_links, np.float64), q_key=np.zeros(qcap, np.int32), q_seq=np.zeros(qcap, np.int64),
        q_issue=np.zeros(qcap, np.float64), q_target=np.zeros(qcap, np.int64), q_score=np.zeros(qcap, np.float32),
        q_ptr=np.zeros(2, np.int64), ints=np.zeros(4, np.int64),
        counts=np.zeros(len(INT_COUNTERS), np.int64), floats=np.zeros(len(FLOAT_COUNTERS), np.float64),
    )  # fmt: skip


def read_counters(state: CacheState) -> dict[str, int | float]:
    """The counters by name (ints and floats), as Python numbers."""
    out: dict[str, int | float] = {name: int(state.counts[i]) for i, name in enumerate(INT_COUNTERS)}
    out.update({name: float(state.floats[i]) for i, name in enumerate(FLOAT_COUNTERS)})
    return out


class ReplayParams(NamedTuple):
    """The settings of one replay, fixed across its prompts."""

    num_layers: int
    num_experts: int
    per_layer: bool  # one pool per layer (else one shared pool)
    capacity: int  # slots per pool
    policy: int  # LRU / LFU / BELADY / SCORE
    xfer: float  # seconds per expert over one link
    compute: float  # seconds of compute per layer
    expert_bytes: float
    admit_cost: bool  # cost-aware admission of prefetches
    miss_mode: int  # MISS_COPY / MISS_HOST / MISS_CHOOSE
    host_xfer: float  # seconds to compute one missed expert on the host
    host_overhead: float  # seconds once per step with host work
    warmup_tokens: int  # tokens at the start of each prompt that are not counted
    bypass: bool  # demand admission: a copied miss that would be the next victim goes to a scratch slot
    issue_after_routing: bool  # step s's predictions are issued right after step s-1 routed, behind its demand
    crf_weight: float  # score eviction ranks score + crf_weight x CRF (LRFU-like; 0: the score alone)
    crf_decay: float  # CRF = sum over past accesses of crf_decay ** (tokens since the access)
    distance_weight: float  # score eviction: > 0 ranks by expected wait (layers to go + odds against reuse)


class PromptInput(NamedTuple):
    """One prompt's accesses, prefetch requests and score updates, by local step s (token-major)."""

    keys: np.ndarray  # [S, k] int32 layer*E + expert of each routed expert
    access_next: np.ndarray  # [S, k] int64 next global step routing to the same key (Belady)
    req_ptr: np.ndarray  # [S+1] int64 CSR offsets of each step's prefetch requests
    req_key: np.ndarray  # [R] int32
    req_target: np.ndarray  # [R] int64 global target step
    req_score: np.ndarray  # [R] float32
    upd_ptr: np.ndarray  # [S+1] int64 CSR offsets of each step's score updates
    upd_layer: np.ndarray  # [U] int64
    upd_scores: np.ndarray  # [U, E] float32
    reuse: np.ndarray  # [S, E] float32 predicted reuse of step s's layer after s ran ([0, E]: none)


@njit_inline
def _crf_now(key, prm, st):
    """The key's CRF decayed to the current token (a float exponent: C pow, as in the reference)."""
    return st.crf[key] * prm.crf_decay ** np.float64(st.ints[2] - st.crf_tok[key])


@njit_inline
def _score_value(key, score, prm, st):
    """What score eviction ranks: the predicted score, plus crf_weight x CRF when that is on."""
    if prm.crf_weight == 0.0:
        return np.float64(score)
    return np.float64(score) + prm.crf_weight * _crf_now(key, prm, st)


@njit_inline
def _rank_value(key, score, prm, st):
    """What score eviction ranks (lowest goes first). With ``distance_weight`` w > 0: minus the expected
    wait to the key's next use, w x (layers until its layer runs again) / L + (1 - v) / v tokens, v its
    score value. Why: a score is the expert's chance of reuse over the next tokens, booked when its layer
    last ran; of two experts with the same chance, the one whose layer runs sooner is needed sooner
    (Belady keeps the nearest next use)."""
    v = _score_value(key, score, prm, st)
    if prm.distance_weight == 0.0:
        return v
    p = max(v, 1e-4)
    layers_to_go = (key // prm.num_experts - st.ints[3]) % prm.num_layers  # 0: the layer running now
    return -(prm.distance_weight * layers_to_go / prm.num_layers + (1.0 - p) / p)


@njit_inline
def _find_victim(pool, by_time, only_arrived, policy, prm, st):
    """The key the policy evicts first among unpinned residents of ``pool`` (-1: none).

    ``only_arrived``: skip experts still in transfer at ``by_time``. Every policy
    breaks ties by recency, and recency stamps are unique, so the victim does not
    depend on slot order. One flat loop (no helper call per slot: numba would not
    inline it, and the call costs more than the comparison).
    """
    best = -1
    best_primary = 0.0
    best_recency = 0
    for i in range(st.pool_size[pool]):
        key = st.slots[pool, i]
        if st.pinned[key] != 0:
            continue
        if only_arrived and st.ready[key] > by_time:
            continue
        if policy == LFU:  # fewest accesses first
            primary = float(st.freq[key])
        elif policy == BELADY:  # furthest next use first
            primary = -float(st.next_use[key])
        elif policy == SCORE:  # lowest predicted score first (+ weighted CRF, LRFU-like)
            primary = _rank_value(key, st.score[key], prm, st)
        else:  # LRU: recency alone
            primary = 0.0
        recency = st.last_use[key]
        if best < 0 or primary < best_primary or (primary == best_primary and recency < best_recency):
            best = key
            best_primary = primary
            best_recency = recency
    return best


@njit_inline
def _evict(key, counted, pool, st):
    # swap-remove from the pool's slot list
    pos = st.slot_pos[key]
    last = st.pool_size[pool] - 1
    moved = st.slots[pool, last]
    st.slots[pool, pos] = moved
    st.slot_pos[moved] = pos
    st.slots[pool, last] = -1
    st.slot_pos[key] = -1
    st.pool_size[pool] = last
    st.status[key] = ABSENT
    if counted:
        st.counts[C_EVICTIONS] += 1
        if st.prefetched[key] != 0:
            st.counts[C_PF_WASTED] += 1
    st.prefetched[key] = 0


@njit_inline
def _insert(key, pool, st):
    st.slots[pool, st.pool_size[pool]] = key
    st.slot_pos[key] = st.pool_size[pool]
    st.pool_size[pool] += 1


@njit_inline
def _start_transfer(key, pool, link, start, by_prefetch, prm, st):
    """Claim a slot of ``pool`` for ``key`` and send it over ``link`` from ``start``; returns its arrival."""
    _insert(key, pool, st)
    arrival = start + prm.xfer
    st.status[key] = RESIDENT
    st.ready[key] = arrival
    st.link_free[link] = arrival
    st.prefetched[key] = 1 if by_prefetch else 0
    return arrival


@njit_inline
def _touch(key, st):
    """Make ``key`` the most recently used."""
    st.ints[0] += 1
    st.last_use[key] = st.ints[0]


@njit_inline
def _free_link(link_free):
    j = 0
    for i in range(1, link_free.shape[0]):
        if link_free[i] < link_free[j]:
            j = i
    return j


@njit_inline
def _pool_of(key, prm):
    return key // prm.num_experts if prm.per_layer else 0


@njit_inline
def _advance(until, step, counted, prm, st):
    """Start queued prefetches that can start by time ``until`` (FIFO, first free link).

    Cost-aware admission (``prm.admit_cost``): a prefetch starts only if it arrives by the
    time its target step is expected to run (``until`` + steps to go x the latest step's
    duration, at least ``compute``: the replay's current pace, stalls and host compute
    included) and its predicted score beats the victim's (the victim's own predicted
    reuse); otherwise it is refused (counted in C_PF_REFUSED) and nothing is evicted.
    """
    qcap = st.q_key.shape[0]
    while st.q_ptr[0] < st.q_ptr[1]:
        i = st.q_ptr[0] % qcap
        key = st.q_key[i]
        if st.status[key] != QUEUED or st.qseq[key] != st.q_seq[i]:  # stale: bumped by demand or cancelled
            st.q_ptr[0] += 1
            continue
        j = _free_link(st.link_free)
        start = max(st.link_free[j], st.q_issue[i])
        if start > until:
            break
        st.q_ptr[0] += 1
        if st.q_target[i] < step:  # its target already ran: a late start is useless
            st.status[key] = ABSENT
            if counted:
                st.counts[C_PF_CANCELLED] += 1
            continue
        if prm.admit_cost and start + prm.xfer > until + (st.q_target[i] - step) * max(prm.compute,
                                                                                      st.floats[F_LAST_STEP]):
            st.status[key] = ABSENT  # cannot arrive before its layer runs: the link is better left to demand
            if counted:
                st.counts[C_PF_REFUSED] += 1
            continue
        pool = _pool_of(key, prm)
        if st.pool_size[pool] >= prm.capacity:
            victim = _find_victim(pool, start, True, prm.policy, prm, st)
            if victim < 0:  # every slot is in transfer
                st.status[key] = ABSENT
                if counted:
                    st.counts[C_PF_CANCELLED] += 1
                continue
            if prm.admit_cost and st.score[victim] >= st.q_score[i]:
                st.status[key] = ABSENT  # the victim is as likely to be used again as the prefetch is
                if counted:
                    st.counts[C_PF_REFUSED] += 1
                continue
            _evict(victim, counted, pool, st)
        _start_transfer(key, pool, j, start, True, prm, st)
        _touch(key, st)
        if counted:
            st.counts[C_PF_STARTED] += 1
            st.floats[F_BYTES] += prm.expert_bytes


@njit_inline
def _push(key, target, sc, now, st):
    qcap = st.q_key.shape[0]
    if st.q_ptr[1] - st.q_ptr[0] >= qcap:  # full of stale entries: compact the live ones
        head, tail, w = st.q_ptr[0], st.q_ptr[1], st.q_ptr[0]
        for r in range(head, tail):
            i = r % qcap
            k = st.q_key[i]
            if st.status[k] == QUEUED and st.qseq[k] == st.q_seq[i]:
                o = w % qcap
                st.q_key[o], st.q_seq[o], st.q_issue[o], st.q_target[o] = (st.q_key[i], st.q_seq[i], st.q_issue[i],
                                                                           st.q_target[i])  # fmt: skip
                st.q_score[o] = st.q_score[i]
                w += 1
        st.q_ptr[1] = w
    st.ints[1] += 1
    i = st.q_ptr[1] % qcap
    st.q_key[i] = key
    st.q_seq[i] = st.ints[1]
    st.q_issue[i] = now
    st.q_target[i] = target
    st.q_score[i] = sc
    st.qseq[key] = st.ints[1]
    st.status[key] = QUEUED
    st.q_ptr[1] += 1


@njit_inline
def _issue(prompt, r_step, now, step, counted, prm, st):
    """Apply the score updates and queue the prefetch requests of row ``r_step`` at time ``now``
    (``step``: the global step running, for ``_advance``)."""
    num_experts = prm.num_experts
    # Nearest targets are listed first; apply in reverse so the nearest wins.
    for u in range(prompt.upd_ptr[r_step + 1] - 1, prompt.upd_ptr[r_step] - 1, -1):
        base = prompt.upd_layer[u] * num_experts
        for e in range(num_experts):
            st.score[base + e] = prompt.upd_scores[u, e]
    if counted:
        for r in range(prompt.req_ptr[r_step], prompt.req_ptr[r_step + 1]):
            key = prompt.req_key[r]
            status = st.status[key]
            if status == RESIDENT:
                _touch(key, st)
                continue
            if status == QUEUED:
                continue
            _push(key, prompt.req_target[r], prompt.req_score[r], now, st)
            st.counts[C_PF_ISSUED] += 1
            _advance(now, step, counted, prm, st)


@njit
def run_prompt(prompt, step_offset, prm, st):
    """Replay one prompt (``PromptInput``) from global step ``step_offset`` with settings ``prm``
    (``ReplayParams``) against the running ``CacheState`` ``st``.

    Misses (``prm.miss_mode``): MISS_COPY over the link; MISS_HOST compute on the host
    (``host_xfer`` seconds per expert, serial, plus ``host_overhead`` once per step that has
    host work, in parallel with the link; nothing is cached); MISS_CHOOSE per expert: copy iff
    (reuse - victim score) x host cost > the extra wait copying costs now."""
    keys, reuse = prompt.keys, prompt.reuse
    num_steps = keys.shape[0]
    k = keys.shape[1]
    num_layers, num_experts = prm.num_layers, prm.num_experts
    wait_keys = np.empty(k, np.int64)
    has_reuse = reuse.shape[0] > 0
    for s in range(num_steps):
        g = step_offset + s
        t = s // num_layers
        counted = t >= prm.warmup_tokens
        st.ints[2] = g // num_layers  # the global token (prompts hold whole tokens)
        st.ints[3] = s % num_layers  # the layer of this step (prompts start at a token's first layer)
        now = st.floats[F_NOW]
        _advance(now, g, counted, prm, st)
        if not prm.issue_after_routing or s % num_layers == 0:  # a token's first layer: its id is news
            _issue(prompt, s, now, g, counted, prm, st)
        # Demand, pass 1: classify and pin.
        n_wait = 0
        latest = now
        for j in range(k):
            key = keys[s, j]
            st.pinned[key] = 1
            status = st.status[key]
            if status == RESIDENT:
                if st.ready[key] <= now:
                    if counted:
                        st.counts[C_HITS] += 1
                        if st.prefetched[key] != 0:
                            st.counts[C_TIMELY] += 1
                else:
                    if counted:
                        st.counts[C_LATE] += 1
                    latest = max(latest, st.ready[key])
            else:
                if counted:
                    if status == QUEUED:
                        st.counts[C_LATE] += 1
                    else:
                        st.counts[C_MISSES] += 1
                st.status[key] = ABSENT  # a queued entry goes stale: it is fetched now instead
                wait_keys[n_wait] = key
                n_wait += 1
        # Demand, pass 2: fetch what is missing, ahead of queued prefetches (or compute it on the host).
        n_host = 0
        for w in range(n_wait):
            key = wait_keys[w]
            j = _free_link(st.link_free)
            start = max(st.link_free[j], now)
            pool = _pool_of(key, prm)
            if prm.miss_mode == MISS_HOST:
                n_host += 1
                continue
            if prm.miss_mode == MISS_CHOOSE:
                p_reuse = np.float64(reuse[s, key % num_experts]) if has_reuse else 0.0
                q_victim = 0.0
                if st.pool_size[pool] >= prm.capacity:
                    v = _find_victim(pool, start, True, prm.policy, prm, st)
                    if v >= 0:
                        q_victim = np.float64(st.score[v])
                host_cost = prm.host_xfer + prm.host_overhead
                if not (p_reuse - q_victim) * host_cost > (start + prm.xfer - now) - host_cost:
                    n_host += 1
                    continue
            if st.pool_size[pool] >= prm.capacity:
                victim = _find_victim(pool, start, True, prm.policy, prm, st)
                if prm.bypass and victim >= 0:
                    # the score the expert would hold once the step ran (its predicted reuse)
                    p_after = reuse[s, key % num_experts] if has_reuse else st.score[key]
                    v_after = np.float64(p_after)
                    if prm.crf_weight != 0.0:  # its CRF once this access counts
                        v_after += prm.crf_weight * (_crf_now(key, prm, st) + 1.0)
                    if v_after < _score_value(victim, st.score[victim], prm, st):  # it would go before the victim
                        arrival = start + prm.xfer
                        st.link_free[j] = arrival
                        latest = max(latest, arrival)
                        if counted:
                            st.counts[C_DEMAND_XFERS] += 1
                            st.counts[C_BYPASS] += 1
                            st.floats[F_BYTES] += prm.expert_bytes
                        continue
                if victim < 0:  # all unpinned slots in transfer: abandon one
                    victim = _find_victim(pool, start, False, prm.policy, prm, st)
                    if counted:
                        st.counts[C_PF_CANCELLED] += 1
                _evict(victim, counted, pool, st)
            latest = max(latest, _start_transfer(key, pool, j, start, False, prm, st))
            if counted:
                st.counts[C_DEMAND_XFERS] += 1
                st.floats[F_BYTES] += prm.expert_bytes
        if n_host > 0:  # host work of this step: one overhead, then the experts one after another
            host_time = prm.host_overhead + n_host * prm.host_xfer
            latest = max(latest, now + host_time)
            if counted:
                st.counts[C_HOST] += n_host
                st.floats[F_HOST] += host_time
        # Touch in routing order (recency, frequency, next use), unpin.
        for j in range(k):
            key = keys[s, j]
            if st.prefetched[key] != 0:
                if counted:
                    st.counts[C_PF_USED] += 1
                st.prefetched[key] = 0
            _touch(key, st)
            st.freq[key] += 1
            if prm.crf_weight != 0.0:  # only LRFU-like score eviction reads the CRF
                st.crf[key] = _crf_now(key, prm, st) + 1.0
                st.crf_tok[key] = st.ints[2]
            st.next_use[key] = prompt.access_next[s, j]
            st.pinned[key] = 0
        if has_reuse:  # the layer that just ran: each expert's predicted use by the next token
            base = (s % num_layers) * num_experts
            for e in range(num_experts):
                st.score[base + e] = reuse[s, e]
        if prm.issue_after_routing and s + 1 < num_steps and (s + 1) % num_layers != 0:
            # step s+1's predictions need the routing of steps <= s only: issue them now, behind this
            # step's demand fetches, so they move while this step computes (not across a token
            # boundary: the next token's id, which predictors read, exists only after this token ends)
            _issue(prompt, s + 1, now, g, (s + 1) // num_layers >= prm.warmup_tokens, prm, st)
        stall = latest - now
        if counted:
            st.counts[C_ACCESSES] += k
            st.counts[C_STEPS] += 1
            if s % num_layers == 0:
                st.counts[C_TOKENS] += 1
            st.floats[F_STALL] += stall
        st.floats[F_NOW] = now + stall + prm.compute
        st.floats[F_LAST_STEP] = stall + prm.compute


@njit
def reset_cache(fill_keys, prm, st):
    """Empty the cache and queue, then make ``fill_keys`` resident (first = least recent)."""
    for key in range(st.status.shape[0]):
        st.status[key] = ABSENT
        st.prefetched[key] = 0
        st.pinned[key] = 0
        st.freq[key] = 0
        st.crf[key] = 0.0
        st.slot_pos[key] = -1
    for p in range(st.pool_size.shape[0]):
        st.pool_size[p] = 0
        for i in range(st.slots.shape[1]):
            st.slots[p, i] = -1
    st.q_ptr[0] = st.q_ptr[1]
    for j in range(st.link_free.shape[0]):
        st.link_free[j] = st.floats[F_NOW]
    for i in range(fill_keys.shape[0]):
        key = fill_keys[i]
        _insert(key, _pool_of(key, prm), st)
        st.status[key] = RESIDENT
        st.ready[key] = -1e300
        _touch(key, st)


@njit
def top_m(scores, m, min_score, out_ids, out_valid):
    """Per row of ``scores`` [R, E]: the m best expert ids (score descending, ties to the
    lower id) into ``out_ids`` [R, m], and whether each score is above ``min_score``."""
    num_rows, num_experts = scores.shape
    for r in range(num_rows):
        n = 0
        for e in range(num_experts):
            v = scores[r, e]
            # insertion into the sorted prefix; strict '>' keeps lower ids ahead on ties
            pos = n
            while pos > 0 and v > scores[r, out_ids[r, pos - 1]]:
                pos -= 1
            if pos >= m:
                continue
            last = n if n < m else m - 1
            for q in range(last, pos, -1):
                out_ids[r, q] = out_ids[r, q - 1]
            out_ids[r, pos] = e
            if n < m:
                n += 1
        for q in range(m):
            out_valid[r, q] = scores[r, out_ids[r, q]] > min_score
