"""A plain, slow, readable re-implementation of the simulator, for tests only.

It shares no code with the compiled path beyond the predictor driver: its own
top-m ranking (stable argsort), its own next-use search, dicts and a deque for
the cache and the link queue. The tests replay random traces through both and
require identical counters. The model is the one in ``kernel.py``'s docstring.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from emoe_jax.predict.drive import prompt_predictions
from emoe_jax.sim.config import SimConfig


@dataclass
class _Expert:
    ready: float
    prefetched: bool


def simulate_reference(traces: Any, predictor: Any, config: SimConfig) -> dict:
    meta = traces.meta
    L, E, k = meta.num_layers, meta.num_experts, meta.top_k
    config.validate(L, E, k)
    policy = config.eviction or predictor.eviction
    pools, cap = config.pools(L, E, k)
    m = k if config.prefetch_k is None else config.prefetch_k
    xfer, compute = config.transfer_seconds(), config.compute_seconds()
    host_xfer, host_overhead = config.host_seconds()
    rng = np.random.default_rng(config.seed)

    # Every access of the replay as (global step, key), for Belady's next use.
    sequence = []
    for trace in traces:
        for t in range(trace.experts.shape[0]):
            for l in range(L):
                sequence.append([l * E + int(e) for e in trace.experts[t, l]])

    def next_use_after(key: int, step: int) -> int:
        for g in range(step + 1, len(sequence)):
            if key in sequence[g]:
                return g
        return 2**62

    cache: list[dict[int, _Expert]] = [dict() for _ in range(pools)]  # pool -> key -> state
    recency: dict[int, int] = {}
    freq: dict[int, int] = {}
    crf: dict[int, tuple[float, int]] = {}  # key -> (CRF, token it is as of)
    score: dict[int, float] = {}
    queue: deque = deque()  # [key, issue time, target step]; removed entries are dropped on pop
    queued: dict[int, int] = {}  # key -> id of its live queue entry (older entries of the key are stale)
    entry_ids = [0]
    after_routing = config.prefetch_issue == "routed"
    last_step = [0.0]  # duration of the latest step: cost-aware admission's pace
    links = [0.0] * config.links
    clock = [0]
    now = 0.0
    c = dict(accesses=0, hits=0, timely=0, late=0, misses=0, issued=0, started=0, used=0, wasted=0,
             cancelled=0, demand=0, tokens=0, evictions=0, stall=0.0, bytes=0.0, refused=0, host=0,
             host_seconds=0.0, bypassed=0)  # fmt: skip

    def crf_now(key: int, token: int) -> float:
        value, at = crf.get(key, (0.0, 0))
        return value * config.crf_decay ** float(token - at)

    def score_value(key: int, token: int) -> float:
        if config.crf_weight == 0.0:
            return score.get(key, 0.0)
        return score.get(key, 0.0) + config.crf_weight * crf_now(key, token)

    def pool_of(key: int) -> int:
        return key // E if pools > 1 else 0

    def stamp(key: int) -> None:
        clock[0] += 1
        recency[key] = clock[0]

    def victim(pool: int, by_time: float, only_arrived: bool, pinned: set[int], g: int) -> int | None:
        candidates = [
            key for key, x in cache[pool].items() if key not in pinned and (not only_arrived or x.ready <= by_time)
        ]
        if not candidates:
            return None

        def priority(key: int):
            if policy == "lfu":
                return (freq.get(key, 0), recency[key])
            if policy == "belady":
                return (-next_use_after(key, g - 1), recency[key])
            if policy == "score" and config.distance_weight > 0:  # expected wait to the next use, negated
                p = max(score_value(key, g // L), 1e-4)
                layers_to_go = (key // E - g % L) % L
                return (-(config.distance_weight * layers_to_go / L + (1.0 - p) / p), recency[key])
            if policy == "score":
                return (score_value(key, g // L), recency[key])
            return (0, recency[key])

        return min(candidates, key=priority)

    def evict(key: int, counted: bool) -> None:
        x = cache[pool_of(key)].pop(key)
        if counted:
            c["evictions"] += 1
            c["wasted"] += int(x.prefetched)

    def free_link() -> int:
        return min(range(len(links)), key=lambda j: (links[j], j))

    def advance(until: float, g: int, counted: bool) -> None:
        while queue:
            key, issued_at, target, p, entry = queue[0]
            if queued.get(key) != entry:
                queue.popleft()
                continue
            j = free_link()
            start = max(links[j], issued_at)
            if start > until:
                break
            queue.popleft()
            del queued[key]
            if target < g:
                c["cancelled"] += counted
                continue
            if config.admission == "cost" and start + xfer > until + (target - g) * max(compute, last_step[0]):
                c["refused"] += counted
                continue
            pool = pool_of(key)
            if len(cache[pool]) >= cap:
                v = victim(pool, start, True, set(), g)
                if v is None:
                    c["cancelled"] += counted
                    continue
                if config.admission == "cost" and score.get(v, 0.0) >= p:
                    c["refused"] += counted
                    continue
                evict(v, counted)
            cache[pool][key] = _Expert(ready=start + xfer, prefetched=True)
            links[j] = start + xfer
            stamp(key)
            if counted:
                c["started"] += 1
                c["bytes"] += config.expert_bytes

    g0 = 0
    for i, trace in enumerate(traces):
        T = trace.experts.shape[0]
        S = T * L
        if i == 0 or config.reset_per_prompt:
            for p in cache:
                p.clear()
            queue.clear()
            queued.clear()
            freq.clear()
            crf.clear()
            links = [now] * config.links
            if config.initial_fill == "random":
                if pools == 1:
                    fill = rng.permutation(L * E)[:cap]
                else:
                    fill = rng.permutation(
                        np.concatenate([l * E + rng.permutation(E)[:cap] for l in range(L)])
                    )
                for key in fill:
                    cache[pool_of(int(key))][int(key)] = _Expert(ready=-1e300, prefetched=False)
                    stamp(int(key))
        preds = prompt_predictions(predictor, trace, meta)
        by_step: dict[int, list[tuple[int, np.ndarray]]] = {}
        for r in range(len(preds)):
            issue, target = int(preds.issue_step[r]), int(preds.target_step[r])
            if target - issue <= config.lookahead_layers and target < S:
                by_step.setdefault(issue, []).append((target, preds.scores[r]))
        reuse = preds.reuse

        def issue(step: int, now: float, g: int, counted: bool) -> None:
            rows = sorted(by_step.get(step, []), key=lambda row: row[0])
            for target, scores in reversed(rows if config.eviction_scores == "latest" else []):  # nearest wins
                for e in range(E):
                    score[(target % L) * E + e] = float(scores[e])
            if counted:
                for target, scores in rows:
                    order = np.argsort(-scores, kind="stable")[:m]
                    for e in order:
                        if not scores[e] > config.min_score:
                            continue
                        key = (target % L) * E + int(e)
                        if key in cache[pool_of(key)]:
                            stamp(key)
                        elif key not in queued:
                            entry_ids[0] += 1
                            queue.append((key, now, g0 + target, float(np.float32(scores[e])), entry_ids[0]))
                            queued[key] = entry_ids[0]
                            c["issued"] += 1
                            advance(now, g, counted)

        for s in range(S):
            g = g0 + s
            t, l = divmod(s, L)
            counted = t >= config.warmup_tokens
            advance(now, g, counted)
            if not after_routing or l == 0:
                issue(s, now, g, counted)
            keys = [l * E + int(e) for e in trace.experts[t, l]]
            pinned = set(keys)
            latest = now
            to_fetch = []
            for key in keys:
                x = cache[pool_of(key)].get(key)
                if x is not None:
                    if x.ready <= now:
                        c["hits"] += counted
                        c["timely"] += counted and x.prefetched
                    else:
                        c["late"] += counted
                        latest = max(latest, x.ready)
                else:
                    if key in queued:
                        c["late"] += counted
                        del queued[key]
                    else:
                        c["misses"] += counted
                    to_fetch.append(key)
            n_host = 0
            for key in to_fetch:
                j = free_link()
                start = max(links[j], now)
                pool = pool_of(key)
                if config.miss_mode == "host":
                    n_host += 1
                    continue
                if config.miss_mode == "choose":
                    p_reuse = 0.0 if reuse is None else float(reuse[s, key % E])
                    q = 0.0
                    if len(cache[pool]) >= cap:
                        v = victim(pool, start, True, pinned, g)
                        q = 0.0 if v is None else score.get(v, 0.0)
                    cost = host_xfer + host_overhead
                    if not (p_reuse - q) * cost > (start + xfer - now) - cost:  # copying does not pay
                        n_host += 1
                        continue
                if len(cache[pool]) >= cap:
                    v = victim(pool, start, True, pinned, g)
                    if config.demand_admission == "bypass" and v is not None:
                        after = float(reuse[s, key % E]) if reuse is not None else score.get(key, 0.0)
                        if config.crf_weight != 0.0:
                            after += config.crf_weight * (crf_now(key, g // L) + 1.0)
                        if after < score_value(v, g // L):  # would be the next victim: scratch slot, not cached
                            links[j] = start + xfer
                            latest = max(latest, start + xfer)
                            if counted:
                                c["demand"] += 1
                                c["bypassed"] += 1
                                c["bytes"] += config.expert_bytes
                            continue
                    if v is None:
                        v = victim(pool, start, False, pinned, g)
                        c["cancelled"] += counted
                    evict(v, counted)
                cache[pool][key] = _Expert(ready=start + xfer, prefetched=False)
                links[j] = start + xfer
                latest = max(latest, start + xfer)
                if counted:
                    c["demand"] += 1
                    c["bytes"] += config.expert_bytes
            if n_host:
                latest = max(latest, now + host_overhead + n_host * host_xfer)
                c["host"] += counted * n_host
                c["host_seconds"] += counted * (host_overhead + n_host * host_xfer)
            for key in keys:
                x = cache[pool_of(key)].get(key)
                if x is not None and x.prefetched:
                    c["used"] += counted
                    x.prefetched = False
                stamp(key)
                freq[key] = freq.get(key, 0) + 1
                crf[key] = (crf_now(key, g // L) + 1.0, g // L)
            if reuse is not None:
                for e in range(E):
                    score[l * E + e] = float(reuse[s, e])
            if after_routing and s + 1 < S and l + 1 < L:  # step s+1's predictions, behind this step's demand
                issue(s + 1, now, g, (s + 1) // L >= config.warmup_tokens)
            if counted:
                c["accesses"] += k
                c["tokens"] += l == 0
                c["stall"] += latest - now
            last_step[0] = (latest - now) + compute  # stall + compute
            now = latest + compute
        g0 += S
    return c
