"""python -m emoe_jax.sim.sweep: predictors x lookahead x cache policy x miss handling, with paired bootstraps.

    python -m emoe_jax.sim.sweep --traces out/puffin_traces --split 0.2 \
        --predictors causal-table,learned --lookaheads 1,2,4,8 --capacities 0.1,0.2 \
        --policies lru,score,cost --bandwidth-gbps 25 --out out/sweep_puffin.json
    python -m emoe_jax.sim.sweep --traces out/puffin_traces --split 0.2 --zero-latency \
        --predictors causal-table,learned --capacities 0.05,0.1,0.2,0.3,0.5 --compare learned:causal-table

Steps:
1. Split (or load train and test sets); fit each predictor once per lookahead.
2. Every cell replays the test prompts with ``simulate``: the protocol is the same
   for every cell (one running cache, empty at the start, every token counted);
   ``--zero-latency`` makes transfers free (lookahead 0 unless given).
   Policies (``POLICIES``): ``lru`` (prefetch, LRU eviction, every prefetch
   admitted), ``score`` (evict the lowest predicted reuse/score), ``cost`` (score
   eviction + cost-aware admission); ``-np``: no prefetch; ``bypass*``: demand
   bypass into top-k scratch slots; ``*-routed``: predictions issued right after
   the previous step routed; ``reuse-*``: eviction reads reuse scores only;
   ``lrfu-*``: reuse + CRF (``--crf-weight``, ``--crf-decay``); ``reuse-dist-*``: reuse scores
   ranked by expected wait to next use (``--distance-weight``); ``belady-routed``
   (ORACLE). ``--per-layer``: one pool per layer. Miss handling: ``copy``, ``host``, ``choose``
   (``--miss-modes``, host bandwidths ``--host-gbps``).
   Baselines LRU and Belady (ORACLE) run in every grid, without prediction.
3. ``--compare A:B``: paired bootstrap over test prompts of hit rate (A - B) and of
   stall per token (B - A, so positive = A better) per capacity: 95 % interval.
4. Print a markdown table (``--by-task``: and one of hit % / stall per task); ``--out`` writes the rows as JSON (temp name, then renamed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from emoe_jax.cli import USER_ERRORS, fail
from emoe_jax.atomic_io import write_json_atomic
from emoe_jax.predict import get_predictor
from emoe_jax.predict.drive import MemoisedPredictor
from emoe_jax.sim.config import SimConfig
from emoe_jax.sim.simulate import simulate
from emoe_jax.traces.split import split_by_prompt_id

# Named policies: SimConfig fields each one sets. "-np": no prefetch at all (the predictor only scores,
# for eviction and bypass); "bypass": a demand miss that would be the next victim is computed from a
# scratch slot and not cached (top-k scratch slots come out of the capacity).
POLICIES = {"lru": dict(eviction="lru", admission="all"), "score": dict(eviction="score", admission="all"),
            "cost": dict(eviction="score", admission="cost"),
            "score-np": dict(eviction="score", admission="all", prefetch_k=0),
            "bypass": dict(eviction="score", admission="all", demand_admission="bypass"),
            "bypass-np": dict(eviction="score", admission="all", demand_admission="bypass", prefetch_k=0),
            "bypass-cost": dict(eviction="score", admission="cost", demand_admission="bypass")}  # fmt: skip
# "-routed": the same, with step s's predictions issued right after step s-1 routed (behind its demand
# fetches) instead of at the start of step s
POLICIES.update({f"{name}-routed": dict(pol, prefetch_issue="routed") for name, pol in list(POLICIES.items())
                 if name in ("lru", "score", "cost", "bypass", "bypass-cost")})  # fmt: skip
# "reuse-*": score eviction that reads the predictor's reuse scores only (never its prefetch predictions)
POLICIES["reuse-np"] = dict(POLICIES["score-np"], eviction_scores="reuse")
POLICIES["reuse-routed"] = dict(POLICIES["score-routed"], eviction_scores="reuse")
# "lrfu-*": reuse-only score eviction + 0.05 x CRF (each past access weighted 0.9 ** tokens since), LRFU-like;
# 0.05 and 0.9 were chosen on Puffin training prompts only (scripts/eviction_horizon_bound.py --tune)
POLICIES["lrfu-np"] = dict(POLICIES["reuse-np"], crf_weight=0.05, crf_decay=0.9)
POLICIES["lrfu-routed"] = dict(POLICIES["reuse-routed"], crf_weight=0.05, crf_decay=0.9)
# "reuse-dist-*": reuse-only score eviction ranked by expected wait to the next use, 2 x (layers until the
# expert's layer runs again) / L + (1 - reuse) / reuse; 2 was chosen on Puffin training prompts only (cross-reuse
# fitted on ids 1-1280, replayed on 1281-1600 at 10 %: weights 0 / 0.25 / 0.5 / 1 / 2 / 4 -> 64.67 / 64.42 /
# 64.29 / 64.17 / 64.14 / 64.31 ms stall per token)
POLICIES["reuse-dist-np"] = dict(POLICIES["reuse-np"], distance_weight=2.0)
POLICIES["reuse-dist-routed"] = dict(POLICIES["reuse-routed"], distance_weight=2.0)
POLICIES["belady-routed"] = dict(eviction="belady", admission="all", prefetch_issue="routed")  # ORACLE eviction


def paired_bootstrap(a: dict, b: dict, samples: int = 2000, seed: int = 0) -> dict[str, list[float]]:
    """95 % intervals over prompts of hit rate (a - b) and stall ms/token (b - a); same prompts in both."""
    if not np.array_equal(a["prompt_id"], b["prompt_id"]):
        raise ValueError("paired bootstrap needs both runs over the same prompts")
    rng = np.random.default_rng(seed)
    n = len(a["prompt_id"])
    idx = rng.integers(0, n, size=(samples, n))  # [B, n]
    acc = a["accesses"][idx].sum(1)  # same accesses in both runs
    tokens = np.maximum(acc, 1)  # per-access normalisation: stall per access is proportional to stall per token
    hit = (a["hits"][idx].sum(1) - b["hits"][idx].sum(1)) / tokens
    point_hit = (a["hits"].sum() - b["hits"].sum()) / max(a["accesses"].sum(), 1)
    out = {"hit_rate_diff": float(point_hit), "hit_rate_diff_ci95": np.percentile(hit, [2.5, 97.5]).tolist()}
    stall = (b["stall_seconds"][idx].sum(1) - a["stall_seconds"][idx].sum(1)) / np.maximum(b["stall_seconds"][idx].sum(1), 1e-12)
    out["stall_reduction"] = float((b["stall_seconds"].sum() - a["stall_seconds"].sum()) / max(b["stall_seconds"].sum(), 1e-12))
    out["stall_reduction_ci95"] = np.percentile(stall, [2.5, 97.5]).tolist()
    return out


def run_sweep(train: Any, test: Any, *, predictors: list[str], lookaheads: list[int], capacities: list[float],
              policies: list[str], miss_modes: list[str], host_gbps: list[float], bandwidth_gbps: float,
              layer_compute_ms: float, expert_bytes: float, zero_latency: bool, host_overhead_ms: float,
              predictor_kwargs: dict | None = None, log: Any = None,
              baselines: tuple[str, ...] = ("lru", "belady"), per_layer: bool = False,
              policy_overrides: dict[str, dict] | None = None) -> tuple[list[dict], dict]:  # fmt: skip
    """Rows (one per cell) and per-prompt counters keyed by the row's label. ``policy_overrides``: SimConfig
    fields that replace a named policy's own (e.g. the LRFU weight)."""
    rows, per_prompt = [], {}
    base = SimConfig(bandwidth_gbps=bandwidth_gbps, layer_compute_ms=layer_compute_ms, expert_bytes=expert_bytes,
                     zero_latency=zero_latency, host_overhead_ms=host_overhead_ms, per_layer=per_layer)  # fmt: skip
    modes = [("copy", None)] + [(m, h) for m in miss_modes if m != "copy" for h in host_gbps]
    if "copy" not in miss_modes:
        modes = modes[1:]

    def cell(name: str, pred: Any, la: int, policy: str, mode: str, host: float | None, cap: float) -> None:
        pol = dict(POLICIES[policy]) if policy in POLICIES else dict(eviction=policy, admission="all")
        pol.update((policy_overrides or {}).get(policy, {}))
        cfg = base.with_(capacity=cap, lookahead_layers=la, miss_mode=mode, **pol,
                         **({} if host is None else {"host_bandwidth_gbps": host}))  # fmt: skip
        t0 = time.perf_counter()
        r = simulate(test, pred, cfg)
        d = r.to_dict()
        row = {k: d[k] for k in ("hit_rate", "stall_ms_per_token", "ms_per_token", "timely_prefetches", "late_prefetches",
                                 "demand_misses", "prefetches_started", "prefetches_refused", "prefetch_accuracy",
                                 "host_compute_rate", "bytes_per_token", "tokens", "accesses", "oracle",
                                 "demand_bypassed", "capacity_experts", "scratch_slots")}  # fmt: skip
        row.update(predictor=name, lookahead=la, policy=policy, miss_mode=mode, host_gbps=host, capacity=cap,
                   eviction=r.eviction, recall=d["prediction"].get(f"recall@{test.meta.top_k}"),
                   seconds=round(time.perf_counter() - t0, 1),
                   per_task={t: {"hit_rate": c["hit_rate"], "stall_ms_per_token": c["stall_ms_per_token"]}
                             for t, c in d["per_task"].items()})  # fmt: skip
        label = f"{name}|{la}|{policy}|{mode}|{host}|{cap}"
        rows.append(row)
        per_prompt[label] = r.per_prompt
        if log:
            print(f"{label}: hit {100 * row['hit_rate']:.2f} % stall {row['stall_ms_per_token']:.2f} ms/token "
                  f"({row['seconds']} s)", file=log, flush=True)  # fmt: skip

    for name in baselines:
        for mode, host in modes if name == "lru" else modes[:1]:  # Belady: the copy-only bound
            for cap in capacities:
                cell(name, get_predictor(name), 0, name, mode, host, cap)
    for name in predictors:
        for la in lookaheads:
            pred = get_predictor(name, ignore_unknown=True, lookahead=la, **(predictor_kwargs or {}))
            pred.fit(train)
            memo = MemoisedPredictor(pred)
            for policy in policies:
                for mode, host in modes:
                    if mode == "choose" and policy == "lru":
                        continue  # the per-expert choice reads predicted reuse: pair it with a score policy
                    for cap in capacities:
                        cell(name, memo, la, policy, mode, host, cap)
            del memo
    return rows, per_prompt


def to_markdown(rows: list[dict]) -> str:
    out = ["| predictor | lookahead | policy | misses | capacity | hit rate % | stall ms/token | ms/token | "
           "timely | late | refused | recall@k |", "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        mode = r["miss_mode"] + ("" if r["host_gbps"] is None else f" @{r['host_gbps']:g} GB/s")
        rec = "" if r["recall"] is None or r["predictor"] in ("lru", "belady") else f"{100 * r['recall']:.1f}"
        out.append(f"| {r['predictor']}{' (ORACLE)' if r['oracle'] else ''} | {r['lookahead']} | {r['policy']} | {mode} | "
                   f"{r['capacity']:g} | {100 * r['hit_rate']:.2f} | {r['stall_ms_per_token']:.2f} | {r['ms_per_token']:.2f} | "
                   f"{r['timely_prefetches']} | {r['late_prefetches']} | {r['prefetches_refused']} | {rec} |")  # fmt: skip
    return "\n".join(out) + "\n"


def to_markdown_by_task(rows: list[dict]) -> str:
    """One row per cell, one column per task label: "hit % / stall ms per token" of that task's prompts
    (their share of the cell's one replay; see SimResult.per_task)."""
    tasks = sorted({t for r in rows for t in r.get("per_task", {})})
    if not tasks:
        return ""
    out = ["| predictor | lookahead | policy | misses | capacity | " + " | ".join(t or "(none)" for t in tasks) + " |",
           "|---|---:|---|---|---:|" + "---:|" * len(tasks)]  # fmt: skip
    for r in rows:
        mode = r["miss_mode"] + ("" if r["host_gbps"] is None else f" @{r['host_gbps']:g} GB/s")
        cells = []
        for t in tasks:
            c = r.get("per_task", {}).get(t)
            cells.append("-" if c is None else f"{100 * c['hit_rate']:.1f} / {c['stall_ms_per_token']:.2f}")
        out.append(f"| {r['predictor']}{' (ORACLE)' if r['oracle'] else ''} | {r['lookahead']} | {r['policy']} | {mode} | "
                   f"{r['capacity']:g} | " + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(out) + "\n"


def _list(cast):
    return lambda text: [cast(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m emoe_jax.sim.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--traces", type=Path, help="trace set split by prompt id (--split)")
    p.add_argument("--split", type=float, default=0.2, help="validation fraction of --traces (highest prompt ids)")
    p.add_argument("--train-traces", type=Path, help="fit on this set (with --test-traces)")
    p.add_argument("--test-traces", type=Path, help="replay this set (with --train-traces)")
    p.add_argument("--predictors", type=_list(str), default=["causal-table"])
    p.add_argument("--lookaheads", type=_list(int), default=None, help="default 1 (0 with --zero-latency)")
    p.add_argument("--capacities", type=_list(float), default=[0.1, 0.2])
    p.add_argument("--policies", type=_list(str), default=["lru", "score", "cost"])
    p.add_argument("--miss-modes", type=_list(str), default=["copy"])
    p.add_argument("--host-gbps", type=_list(float), default=[50.0, 200.0])
    p.add_argument("--host-overhead-ms", type=float, default=0.05)
    p.add_argument("--bandwidth-gbps", type=float, default=25.0)
    p.add_argument("--layer-compute-ms", type=float, default=0.5)
    p.add_argument("--expert-bytes", type=float, default=17.3e6)
    p.add_argument("--zero-latency", action="store_true")
    p.add_argument("--crf-weight", type=float, default=None, help="CRF weight of the lrfu-* policies (default 0.05)")
    p.add_argument("--crf-decay", type=float, default=None, help="CRF decay per token of the lrfu-* policies (default 0.9)")
    p.add_argument("--distance-weight", type=float, default=None,
                   help="distance weight of the reuse-dist-* policies (default 2)")
    p.add_argument("--per-layer", action="store_true", help="one pool per layer (default: one pool over all layers)")
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument("--baselines", type=_list(str), default=["lru", "belady"], help="no-prediction rows (lru, belady)")
    p.add_argument("--compare", type=_list(str), default=[], help="A:B pairs for paired bootstraps")
    p.add_argument("--predictor-checkpoint", type=Path, default=None, help="learned-predictor checkpoint")
    p.add_argument("--out", type=Path, default=None, help="write rows (and comparisons) as JSON")
    p.add_argument("--by-task", action="store_true",
                   help="also print a table of hit %% / stall ms per token per task label, per cell")
    args = p.parse_args(argv)
    from emoe_jax.traces import TraceSet

    try:
        if args.test_traces is not None:
            if args.train_traces is None:
                raise ValueError("--test-traces needs --train-traces")
            train, test = TraceSet.load(args.train_traces), TraceSet.load(args.test_traces)
        elif args.traces is not None:
            train, test = split_by_prompt_id(TraceSet.load(args.traces), args.split)
        else:
            raise ValueError("give --traces DIR or --train-traces DIR --test-traces DIR")
        if args.max_prompts:
            test = test.select(slice(0, args.max_prompts))
        lrfu = {k: v for k, v in (("crf_weight", args.crf_weight), ("crf_decay", args.crf_decay)) if v is not None}
        dist = {} if args.distance_weight is None else {"distance_weight": args.distance_weight}
        bad = [x for x in args.policies if x not in POLICIES]
        if bad:
            raise ValueError(f"unknown policies {bad}; choose from {list(POLICIES)}")
        lookaheads = args.lookaheads or ([0] if args.zero_latency else [1])
        kwargs = {} if args.predictor_checkpoint is None else {"checkpoint": str(args.predictor_checkpoint)}
        rows, per_prompt = run_sweep(
            train, test, predictors=args.predictors, lookaheads=lookaheads, capacities=args.capacities,
            policies=args.policies, miss_modes=args.miss_modes, host_gbps=args.host_gbps,
            bandwidth_gbps=args.bandwidth_gbps, layer_compute_ms=args.layer_compute_ms, expert_bytes=args.expert_bytes,
            zero_latency=args.zero_latency, host_overhead_ms=args.host_overhead_ms, predictor_kwargs=kwargs,
            log=sys.stderr, baselines=tuple(b for b in args.baselines if b in ("lru", "belady")), per_layer=args.per_layer,
            policy_overrides={"lrfu-np": lrfu, "lrfu-routed": lrfu, "reuse-dist-np": dist, "reuse-dist-routed": dist},
        )  # fmt: skip
    except (*USER_ERRORS, RuntimeError) as exc:
        return fail(exc)
    comparisons = []
    for pair in args.compare:
        a_name, b_name = pair.split(":")
        for label, counters in per_prompt.items():
            name, la, policy, mode, host, cap = label.split("|")
            if name != a_name:
                continue
            # a baseline (no prediction) is run once per miss mode and capacity
            other = (f"{b_name}|0|{b_name}|{mode}|{host}|{cap}" if b_name in ("lru", "belady")
                     else f"{b_name}|{la}|{policy}|{mode}|{host}|{cap}")  # fmt: skip
            if other in per_prompt:
                comparisons.append({"a": label, "b": other, **paired_bootstrap(counters, per_prompt[other])})
    print(to_markdown(rows), end="")
    if args.by_task:
        print("\nBy task (hit % / stall ms per token):\n")
        print(to_markdown_by_task(rows), end="")
    for c in comparisons:
        lo, hi = c["hit_rate_diff_ci95"]
        print(f"{c['a']} vs {c['b']}: hit rate {100 * c['hit_rate_diff']:+.2f} points (95 % CI {100 * lo:+.2f}..{100 * hi:+.2f}); "
              f"stall reduction {100 * c['stall_reduction']:+.1f} % (CI {100 * c['stall_reduction_ci95'][0]:+.1f}..{100 * c['stall_reduction_ci95'][1]:+.1f})")  # fmt: skip
    if args.out is not None:
        write_json_atomic(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "train_prompts": len(train),
                                     "test_prompts": len(test), "rows": rows, "comparisons": comparisons},
                          indent=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
