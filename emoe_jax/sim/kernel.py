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
4. stall = (latest arrival among the step's experts) - now, at least 0;
   now += stall + layer_compute.
Transfers take ``xfer`` seconds each on one of ``n_links`` serial links.
"""

from __future__ import annotations

import numpy as np

from emoe_jax.numba_cache import configure as _configure_numba_cache

_configure_numba_cache()  # compiled code is cached in a user cache directory, not beside this file

try:  # numba is optional: without it the kernel runs as plain (slow) Python.
    import numba

    njit = numba.njit(cache=True, nogil=True)
    # Helpers are inlined into run_prompt: a call passing ~30 arrays costs more
    # (reference counting of every argument) than the helper's own work.
    njit_inline = numba.njit(cache=True, nogil=True, inline="always")
    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is absent
    HAVE_NUMBA = False

    def njit(f):
        return f

    njit_inline = njit


POLICY_IDS = {"lru": 0, "lfu": 1, "belady": 2, "score": 3}
NEVER = np.int64(2**62)  # next use of an expert that is never used again
ABSENT, QUEUED, RESIDENT = 0, 1, 2

# Integer counters (index into the int64 `counts` array).
C_ACCESSES, C_HITS, C_TIMELY, C_LATE, C_MISSES = 0, 1, 2, 3, 4
C_PF_ISSUED, C_PF_STARTED, C_PF_USED, C_PF_WASTED, C_PF_CANCELLED = 5, 6, 7, 8, 9
C_DEMAND_XFERS, C_TOKENS, C_EVICTIONS, C_STEPS = 10, 11, 12, 13
C_PF_REFUSED, C_HOST = 14, 15  # prefetches refused by cost-aware admission; misses computed on the host
N_COUNTS = 16
# Float counters.
F_STALL, F_BYTES, F_NOW, F_HOST = 0, 1, 2, 3  # F_HOST: host compute seconds (counted steps)
F_LAST_STEP = 4  # duration of the latest step (stall + compute): cost-aware admission's pace estimate
N_FLOATS = 5
MISS_MODES = {"copy": 0, "host": 1, "choose": 2}


class CacheState:
    """All mutable simulator state, as flat arrays the kernel can take."""

    def __init__(self, num_keys: int, num_pools: int, pool_capacity: int, n_links: int) -> None:
        self.status = np.zeros(num_keys, np.int8)  # [K] ABSENT / QUEUED / RESIDENT
        self.ready = np.zeros(num_keys, np.float64)  # [K] arrival time of a resident expert
        self.last_use = np.zeros(num_keys, np.int64)  # [K] recency stamp (larger = more recent)
        self.freq = np.zeros(num_keys, np.int64)  # [K] accesses (LFU)
        self.next_use = np.full(num_keys, NEVER, np.int64)  # [K] next step that routes to it (Belady)
        self.score = np.zeros(num_keys, np.float32)  # [K] latest predicted score (score eviction)
        self.prefetched = np.zeros(num_keys, np.uint8)  # [K] 1: arrived by prefetch, not used yet
        self.pinned = np.zeros(num_keys, np.uint8)  # [K] 1: needed by the current step
        self.qseq = np.zeros(num_keys, np.int64)  # [K] sequence number of its live queue entry
        self.slots = np.full((num_pools, pool_capacity), -1, np.int32)  # [P, cap] keys per pool
        self.pool_size = np.zeros(num_pools, np.int64)  # [P]
        self.slot_pos = np.full(num_keys, -1, np.int64)  # [K] position in its pool's slots
        self.link_free = np.zeros(n_links, np.float64)  # [links] time each link is free
        qcap = 2 * num_keys + 16  # live entries <= K; stale ones are compacted away
        self.q_key = np.zeros(qcap, np.int32)  # [Q] ring buffer of queued prefetches
        self.q_seq = np.zeros(qcap, np.int64)
        self.q_issue = np.zeros(qcap, np.float64)
        self.q_target = np.zeros(qcap, np.int64)
        self.q_score = np.zeros(qcap, np.float32)  # predicted chance its target routes to it
        self.q_ptr = np.zeros(2, np.int64)  # head, tail (monotonic)
        self.ints = np.zeros(2, np.int64)  # recency clock, queue sequence counter
        self.counts = np.zeros(N_COUNTS, np.int64)
        self.floats = np.zeros(N_FLOATS, np.float64)

    def arrays(self) -> tuple:
        return (
            self.status, self.ready, self.last_use, self.freq, self.next_use, self.score,
            self.prefetched, self.pinned, self.qseq, self.slots, self.pool_size, self.slot_pos,
            self.link_free, self.q_key, self.q_seq, self.q_issue, self.q_target, self.q_score, self.q_ptr,
            self.ints, self.counts, self.floats,
        )  # fmt: skip


@njit_inline
def _find_victim(pool, by_time, only_arrived, policy, status, ready, last_use, freq, next_use, score,
                 pinned, slots, pool_size):  # fmt: skip
    """The key the policy evicts first among unpinned residents of ``pool`` (-1: none).

    ``only_arrived``: skip experts still in transfer at ``by_time``. Every policy
    breaks ties by recency, and recency stamps are unique, so the victim does not
    depend on slot order. One flat loop (no helper call per slot: numba would not
    inline it, and the call costs more than the comparison).
    """
    best = -1
    best_primary = 0.0
    best_recency = 0
    for i in range(pool_size[pool]):
        key = slots[pool, i]
        if pinned[key] != 0:
            continue
        if only_arrived and ready[key] > by_time:
            continue
        if policy == 1:  # LFU: fewest accesses first
            primary = float(freq[key])
        elif policy == 2:  # Belady: furthest next use first
            primary = -float(next_use[key])
        elif policy == 3:  # lowest predicted score first
            primary = float(score[key])
        else:  # LRU: recency alone
            primary = 0.0
        recency = last_use[key]
        if best < 0 or primary < best_primary or (primary == best_primary and recency < best_recency):
            best = key
            best_primary = primary
            best_recency = recency
    return best


@njit_inline
def _evict(key, counted, prefetched, status, slots, pool_size, slot_pos, pool, counts):
    # swap-remove from the pool's slot list
    pos = slot_pos[key]
    last = pool_size[pool] - 1
    moved = slots[pool, last]
    slots[pool, pos] = moved
    slot_pos[moved] = pos
    slots[pool, last] = -1
    slot_pos[key] = -1
    pool_size[pool] = last
    status[key] = 0
    if counted:
        counts[C_EVICTIONS] += 1
        if prefetched[key] != 0:
            counts[C_PF_WASTED] += 1
    prefetched[key] = 0


@njit_inline
def _insert(key, pool, slots, pool_size, slot_pos):
    slots[pool, pool_size[pool]] = key
    slot_pos[key] = pool_size[pool]
    pool_size[pool] += 1


@njit_inline
def _free_link(link_free):
    j = 0
    for i in range(1, link_free.shape[0]):
        if link_free[i] < link_free[j]:
            j = i
    return j


@njit_inline
def _advance(until, step, counted, link_cfg, num_experts, per_layer, capacity, policy, status, ready, last_use, freq, next_use, score, prefetched, pinned, qseq, slots,
             pool_size, slot_pos, link_free, q_key, q_seq, q_issue, q_target, q_score, q_ptr, ints, counts,
             floats):  # fmt: skip
    """Start queued prefetches that can start by time ``until`` (FIFO, first free link).

    ``admit_cost``: a prefetch starts only if it arrives by the time its target step is
    expected to run (``until`` + steps to go x the latest step's duration, at least
    ``compute``: the replay's current pace, stalls and host compute included) and
    its predicted score beats the victim's (the victim's own predicted reuse); otherwise
    it is refused (counted in C_PF_REFUSED) and nothing is evicted.
    ``link_cfg`` = (xfer seconds, compute seconds per layer, expert bytes, admit_cost 0/1): packed
    because CPython 3.11 compiles calls of over 30 arguments to a form numba cannot inline.
    """
    xfer, compute, expert_bytes, admit_cost = link_cfg[0], link_cfg[1], link_cfg[2], link_cfg[3] != 0.0
    qcap = q_key.shape[0]
    while q_ptr[0] < q_ptr[1]:
        i = q_ptr[0] % qcap
        key = q_key[i]
        if status[key] != 1 or qseq[key] != q_seq[i]:  # stale: bumped by demand or cancelled
            q_ptr[0] += 1
            continue
        j = _free_link(link_free)
        start = max(link_free[j], q_issue[i])
        if start > until:
            break
        q_ptr[0] += 1
        if q_target[i] < step:  # its target already ran: a late start is useless
            status[key] = 0
            if counted:
                counts[C_PF_CANCELLED] += 1
            continue
        if admit_cost and start + xfer > until + (q_target[i] - step) * max(compute, floats[F_LAST_STEP]):
            status[key] = 0  # cannot arrive before its layer runs: the link is better left to demand
            if counted:
                counts[C_PF_REFUSED] += 1
            continue
        pool = key // num_experts if per_layer else 0
        if pool_size[pool] >= capacity:
            victim = _find_victim(pool, start, True, policy, status, ready, last_use, freq, next_use,
                                  score, pinned, slots, pool_size)  # fmt: skip
            if victim < 0:  # every slot is in transfer
                status[key] = 0
                if counted:
                    counts[C_PF_CANCELLED] += 1
                continue
            if admit_cost and score[victim] >= q_score[i]:
                status[key] = 0  # the victim is as likely to be used again as the prefetch is
                if counted:
                    counts[C_PF_REFUSED] += 1
                continue
            _evict(victim, counted, prefetched, status, slots, pool_size, slot_pos, pool, counts)
        _insert(key, pool, slots, pool_size, slot_pos)
        status[key] = 2
        ready[key] = start + xfer
        link_free[j] = start + xfer
        prefetched[key] = 1
        ints[0] += 1
        last_use[key] = ints[0]
        if counted:
            counts[C_PF_STARTED] += 1
            floats[F_BYTES] += expert_bytes


@njit_inline
def _push(key, target, sc, now, status, qseq, q_key, q_seq, q_issue, q_target, q_score, q_ptr, ints):
    qcap = q_key.shape[0]
    if q_ptr[1] - q_ptr[0] >= qcap:  # full of stale entries: compact the live ones
        head, tail, w = q_ptr[0], q_ptr[1], q_ptr[0]
        for r in range(head, tail):
            i = r % qcap
            k = q_key[i]
            if status[k] == 1 and qseq[k] == q_seq[i]:
                o = w % qcap
                q_key[o], q_seq[o], q_issue[o], q_target[o] = q_key[i], q_seq[i], q_issue[i], q_target[i]
                q_score[o] = q_score[i]
                w += 1
        q_ptr[1] = w
    ints[1] += 1
    i = q_ptr[1] % qcap
    q_key[i] = key
    q_seq[i] = ints[1]
    q_issue[i] = now
    q_target[i] = target
    q_score[i] = sc
    qseq[key] = ints[1]
    status[key] = 1
    q_ptr[1] += 1


@njit
def run_prompt(keys, access_next, req_ptr, req_key, req_target, req_score, upd_ptr, upd_layer, upd_scores,
               reuse, step_offset, warmup_tokens, num_layers, num_experts, per_layer, capacity, policy,
               xfer, compute, expert_bytes, admit_cost, miss_mode, host_xfer, host_overhead,
               status, ready, last_use, freq, next_use, score, prefetched, pinned, qseq, slots,
               pool_size, slot_pos, link_free, q_key, q_seq, q_issue, q_target, q_score, q_ptr, ints, counts,
               floats):  # fmt: skip
    """Replay one prompt. ``keys`` [S, k] int32 = layer*E + expert of each routed expert;
    ``access_next`` [S, k] int64 next global step routing to the same key (Belady);
    requests in CSR form by local step (``req_ptr`` [S+1]) with their scores ``req_score``;
    score updates likewise; ``reuse`` [S, E] (or [0, E]: none) the predicted reuse of step
    s's layer after s ran, written into ``score`` after the step.

    Misses (``miss_mode``): 0 copy over the link; 1 compute on the host (``host_xfer``
    seconds per expert, serial, plus ``host_overhead`` once per step that has host
    work, in parallel with the link; nothing is cached); 2 choose per expert: copy iff
    (reuse - victim score) x host cost > the extra wait copying costs now."""
    num_steps = keys.shape[0]
    k = keys.shape[1]
    link_cfg = np.array([xfer, compute, expert_bytes, 1.0 if admit_cost else 0.0])
    wait_keys = np.empty(k, np.int64)
    for s in range(num_steps):
        g = step_offset + s
        t = s // num_layers
        counted = t >= warmup_tokens
        now = floats[F_NOW]
        _advance(now, g, counted, link_cfg, num_experts, per_layer, capacity, policy, status, ready, last_use, freq, next_use, score, prefetched, pinned, qseq, slots,
                 pool_size, slot_pos, link_free, q_key, q_seq, q_issue, q_target, q_score, q_ptr, ints,
                 counts, floats)  # fmt: skip
        # Nearest targets are listed first; apply in reverse so the nearest wins.
        for u in range(upd_ptr[s + 1] - 1, upd_ptr[s] - 1, -1):
            base = upd_layer[u] * num_experts
            for e in range(num_experts):
                score[base + e] = upd_scores[u, e]
        if counted:
            for r in range(req_ptr[s], req_ptr[s + 1]):
                key = req_key[r]
                st = status[key]
                if st == 2:
                    ints[0] += 1
                    last_use[key] = ints[0]
                    continue
                if st == 1:
                    continue
                _push(key, req_target[r], req_score[r], now, status, qseq, q_key, q_seq, q_issue, q_target,
                      q_score, q_ptr, ints)  # fmt: skip
                counts[C_PF_ISSUED] += 1
                _advance(now, g, counted, link_cfg, num_experts, per_layer, capacity, policy, status, ready, last_use, freq, next_use, score, prefetched,
                         pinned, qseq, slots, pool_size, slot_pos, link_free, q_key, q_seq, q_issue,
                         q_target, q_score, q_ptr, ints, counts, floats)  # fmt: skip
        # Demand, pass 1: classify and pin.
        n_wait = 0
        latest = now
        for j in range(k):
            key = keys[s, j]
            pinned[key] = 1
            st = status[key]
            if st == 2:
                if ready[key] <= now:
                    if counted:
                        counts[C_HITS] += 1
                        if prefetched[key] != 0:
                            counts[C_TIMELY] += 1
                else:
                    if counted:
                        counts[C_LATE] += 1
                    latest = max(latest, ready[key])
            else:
                if counted:
                    if st == 1:
                        counts[C_LATE] += 1
                    else:
                        counts[C_MISSES] += 1
                status[key] = 0  # a queued entry goes stale: it is fetched now instead
                wait_keys[n_wait] = key
                n_wait += 1
        # Demand, pass 2: fetch what is missing, ahead of queued prefetches (or compute it on the host).
        has_reuse = reuse.shape[0] > 0
        n_host = 0
        for w in range(n_wait):
            key = wait_keys[w]
            j = _free_link(link_free)
            start = max(link_free[j], now)
            pool = key // num_experts if per_layer else 0
            if miss_mode == 1:
                n_host += 1
                continue
            if miss_mode == 2:
                p_reuse = np.float64(reuse[s, key % num_experts]) if has_reuse else 0.0
                q_victim = 0.0
                if pool_size[pool] >= capacity:
                    v = _find_victim(pool, start, True, policy, status, ready, last_use, freq, next_use,
                                     score, pinned, slots, pool_size)  # fmt: skip
                    if v >= 0:
                        q_victim = np.float64(score[v])
                host_cost = host_xfer + host_overhead
                if not (p_reuse - q_victim) * host_cost > (start + xfer - now) - host_cost:
                    n_host += 1
                    continue
            if pool_size[pool] >= capacity:
                victim = _find_victim(pool, start, True, policy, status, ready, last_use, freq,
                                      next_use, score, pinned, slots, pool_size)  # fmt: skip
                if victim < 0:  # all unpinned slots in transfer: abandon one
                    victim = _find_victim(pool, start, False, policy, status, ready, last_use, freq,
                                          next_use, score, pinned, slots, pool_size)  # fmt: skip
                    if counted:
                        counts[C_PF_CANCELLED] += 1
                _evict(victim, counted, prefetched, status, slots, pool_size, slot_pos, pool, counts)
            _insert(key, pool, slots, pool_size, slot_pos)
            status[key] = 2
            ready[key] = start + xfer
            link_free[j] = start + xfer
            prefetched[key] = 0
            latest = max(latest, start + xfer)
            if counted:
                counts[C_DEMAND_XFERS] += 1
                floats[F_BYTES] += expert_bytes
        if n_host > 0:  # host work of this step: one overhead, then the experts one after another
            host_time = host_overhead + n_host * host_xfer
            latest = max(latest, now + host_time)
            if counted:
                counts[C_HOST] += n_host
                floats[F_HOST] += host_time
        # Touch in routing order (recency, frequency, next use), unpin.
        for j in range(k):
            key = keys[s, j]
            if prefetched[key] != 0:
                if counted:
                    counts[C_PF_USED] += 1
                prefetched[key] = 0
            ints[0] += 1
            last_use[key] = ints[0]
            freq[key] += 1
            next_use[key] = access_next[s, j]
            pinned[key] = 0
        if has_reuse:  # the layer that just ran: each expert's predicted use by the next token
            base = (s % num_layers) * num_experts
            for e in range(num_experts):
                score[base + e] = reuse[s, e]
        stall = latest - now
        if counted:
            counts[C_ACCESSES] += k
            counts[C_STEPS] += 1
            if s % num_layers == 0:
                counts[C_TOKENS] += 1
            floats[F_STALL] += stall
        floats[F_NOW] = now + stall + compute
        floats[F_LAST_STEP] = stall + compute


@njit
def reset_cache(fill_keys, num_experts, per_layer, status, ready, last_use, freq, prefetched,
                pinned, slots, pool_size, slot_pos, link_free, q_ptr, ints, floats):  # fmt: skip
    """Empty the cache and queue, then make ``fill_keys`` resident (first = least recent)."""
    for key in range(status.shape[0]):
        status[key] = 0
        prefetched[key] = 0
        pinned[key] = 0
        freq[key] = 0
        slot_pos[key] = -1
    for p in range(pool_size.shape[0]):
        pool_size[p] = 0
        for i in range(slots.shape[1]):
            slots[p, i] = -1
    q_ptr[0] = q_ptr[1]
    for j in range(link_free.shape[0]):
        link_free[j] = floats[F_NOW]
    for i in range(fill_keys.shape[0]):
        key = fill_keys[i]
        pool = key // num_experts if per_layer else 0
        _insert(key, pool, slots, pool_size, slot_pos)
        status[key] = 2
        ready[key] = -1e300
        ints[0] += 1
        last_use[key] = ints[0]


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
