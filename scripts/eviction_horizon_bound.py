"""How far can eviction by predicted reuse go? Hit rates of a zero-latency replay (no prefetch,
one global pool, the sweep's protocol) whose eviction reads an ORACLE reuse score.

    PYTHONPATH=. python scripts/eviction_horizon_bound.py --traces out/puffin_traces --capacity 0.1

Scores (all ORACLE except the causal-table and CRF rows): the causal table's own ``reuse`` (its
chance to be routed by token t+1); 1/h for the nearest use within the next H tokens (H = 1: 1 if
token t+1 routes to it); LRFU-like mixes of the table's reuse with w x CRF (combined
recency-frequency, each past access weighted decay^tokens ago). Eviction drops the lowest score, ties to the least recent; with ``bypass`` a
missed expert whose score is below the victim's is not cached (top-k scratch slots taken from the
capacity). A bound for docs/simulator.md, not part of the library: the kernel has no oracle-reuse
policy, and these figures are hit rates only (stall is roughly (1 - hit rate) x accesses x copy time).
"""

from __future__ import annotations

import argparse

import numba
import numpy as np

from emoe_jax.predict import get_predictor
from emoe_jax.traces import TraceSet
from emoe_jax.traces.split import split_by_prompt_id


@numba.njit(cache=False)
def hit_rate(keys, score, cap, num_layers, num_experts, bypass, w_crf=0.0, decay=1.0):  # keys [S, k], score [S, E]
    num_keys = num_layers * num_experts
    resident = np.zeros(num_keys, np.uint8)
    recency = np.zeros(num_keys, np.int64)
    current = np.zeros(num_keys)  # latest score of each key (set when its layer runs)
    crf = np.zeros(num_keys)  # LRFU's combined recency-frequency: sum of decay^(tokens since each access)
    crf_token = np.zeros(num_keys, np.int64)  # token at which crf was last brought up to date
    size, clock, hits = 0, 0, 0
    num_steps, k = keys.shape
    for s in range(num_steps):
        t = s // num_layers
        for j in range(k):
            hits += resident[keys[s, j]]
        for j in range(k):
            key = keys[s, j]
            if resident[key]:
                continue
            if size < cap:
                resident[key] = 1
                size += 1
                continue
            best, best_score, best_rec = -1, 0.0, 0
            for q in range(num_keys):
                if resident[q] == 0:
                    continue
                pinned = False
                for jj in range(k):
                    pinned = pinned or keys[s, jj] == q
                if pinned:
                    continue
                value = current[q] + w_crf * crf[q] * decay ** (t - crf_token[q])
                if best < 0 or value < best_score or (value == best_score and recency[q] < best_rec):
                    best, best_score, best_rec = q, value, recency[q]
            incoming = score[s, key % num_experts] + w_crf * (crf[key] * decay ** (t - crf_token[key]) + 1.0)
            if bypass and incoming < best_score:
                continue
            resident[best] = 0
            resident[key] = 1
        for j in range(k):
            clock += 1
            key = keys[s, j]
            recency[key] = clock
            crf[key] = crf[key] * decay ** (t - crf_token[key]) + 1.0
            crf_token[key] = t
        base = (s % num_layers) * num_experts
        for e in range(num_experts):
            current[base + e] = score[s, e]
    return hits / (num_steps * k)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", required=True)
    p.add_argument("--capacity", type=float, default=0.1)
    p.add_argument("--split", type=float, default=0.2)
    p.add_argument("--tune", action="store_true",
                   help="choose the LRFU weight and decay on the training prompts only: fit on their first 80 %, "
                   "replay their last 20 % (the test prompts are not read)")
    args = p.parse_args()
    train, test = split_by_prompt_id(TraceSet.load(args.traces), args.split)
    if args.tune:
        train, test = split_by_prompt_id(train, 0.2)
    L, E, k = test.meta.num_layers, test.meta.num_experts, test.meta.top_k
    cap = int(args.capacity * L * E)
    table = get_predictor("causal-table", lookahead=1)
    table.fit(train)
    keys, reuse = [], []
    for trace in test:
        experts = np.asarray(trace.experts).astype(np.int64)
        keys.append((experts + (np.arange(L) * E)[None, :, None]).reshape(-1, k))
        reuse.append(np.asarray(table.predict_prompt(trace, test.meta).reuse, np.float32))
    keys, reuse = np.concatenate(keys), np.concatenate(reuse)  # one running cache over the test prompts
    S = keys.shape[0]
    scores = {"causal-table reuse (causal)": reuse}
    for horizon in (1, 2, 4):
        s = np.zeros((S, E), np.float32)  # 1/h for the nearest use within `horizon` tokens (ORACLE)
        for h in range(horizon, 0, -1):
            rows = np.arange(S - h * L)
            for j in range(k):
                s[rows, keys[h * L:, j] % E] = 1.0 / h
        scores[f"ORACLE next use within {horizon} token(s)"] = s
    print(f"{args.traces}: {len(test)} {'tuning' if args.tune else 'test'} prompts (ids {test.prompt_ids.min()}-"
          f"{test.prompt_ids.max()}), {S} steps, capacity {cap} of {L * E}")
    if args.tune:
        print("| CRF weight | decay | hit rate (reuse + weight x CRF) |")
        for w in (0.0, 0.05, 0.1, 0.2, 0.3):
            for decay in ((0.9,) if w == 0.0 else (0.5, 0.8, 0.9, 0.95)):
                print(f"| {w} | {decay} | {100 * hit_rate(keys, reuse, cap, L, E, False, w, decay):.2f} % |", flush=True)
        return
    print("| eviction score | hit rate | with bypass (capacity - top-k cached) |")
    for name, s in scores.items():
        plain = hit_rate(keys, s, cap, L, E, False)
        bypass = hit_rate(keys, s, cap - k, L, E, True)
        print(f"| {name} | {100 * plain:.1f} % | {100 * bypass:.1f} % |", flush=True)
    # LRFU-like (causal): the table's reuse + w x CRF, CRF decayed per token; w = 1 with zero reuse: CRF alone
    zero = np.zeros_like(reuse)
    for label, s, w, decay in (("CRF alone, decay 0.9", zero, 1.0, 0.9), ("CRF alone, decay 0.5", zero, 1.0, 0.5),
                               ("reuse + 0.1 x CRF, decay 0.9", reuse, 0.1, 0.9),
                               ("reuse + 0.3 x CRF, decay 0.9", reuse, 0.3, 0.9),
                               ("reuse + 0.1 x CRF, decay 0.5", reuse, 0.1, 0.5)):  # fmt: skip
        plain = hit_rate(keys, s, cap, L, E, False, w, decay)
        bypass = hit_rate(keys, s, cap - k, L, E, True, w, decay)
        print(f"| {label} (causal) | {100 * plain:.1f} % | {100 * bypass:.1f} % |", flush=True)


if __name__ == "__main__":
    main()
