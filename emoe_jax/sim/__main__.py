"""python -m emoe_jax.sim: replay routing traces for one predictor and one cache size.

Examples:
  python -m emoe_jax.sim --traces out/puffin_traces --predictor lru --capacity 0.1
  python -m emoe_jax.sim --traces out/puffin_traces --predictor static-freq --split --json
  python -m emoe_jax.sim --traces out/puffin_traces --predictor moe-infinity-beyond --split --zero-latency
  python -m emoe_jax.sim --traces out/embedded_traces --predictor spec-gating --split \
      --model-checkpoint checkpoints/embedded
  python -m emoe_jax.sim --list
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from emoe_jax.cli import fail
from emoe_jax.predict import available_predictors, get_predictor
from emoe_jax.predict.base import EVICTION_POLICIES
from emoe_jax.sim.config import SimConfig
from emoe_jax.sim.simulate import simulate
from emoe_jax.traces.split import split_by_prompt_id


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m emoe_jax.sim",
        description=(
            "Replay expert-routing traces token by token (token-major: all layers of a token, then the "
            "next) against an expert cache fed by a predictor, charging transfer time over a limited "
            "link. Reports hit rate, timely/late prefetches, stall and bytes per token, prefetch waste, "
            "and the predictor's recall/precision@k. See docs/simulator.md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--traces", type=Path, help="trace-set directory to replay (python -m emoe_jax.traces makes one)")
    p.add_argument("--predictor", help="predictor name (see --list)")
    p.add_argument("--list", action="store_true", help="list predictors and exit")
    g = p.add_argument_group("cache")
    g.add_argument("--capacity", type=float, default=0.1, help="<= 1: fraction of all layer-experts; > 1: a count")
    scope = g.add_mutually_exclusive_group()
    scope.add_argument("--per-layer", action="store_true", help="split the capacity evenly over layers")
    scope.add_argument("--global", dest="per_layer", action="store_false", help="one pool shared by all layers")
    g.add_argument("--eviction", choices=EVICTION_POLICIES, help="override the predictor's eviction policy")
    g.add_argument("--eviction-scores", choices=("latest", "reuse"), default="latest",
                   help="score eviction reads the latest prediction or reuse score of each expert, or reuse scores only")
    g.add_argument("--crf-weight", type=float, default=0.0,
                   help="score eviction ranks score + this x CRF (LRFU-like; each past access weighted decay^tokens)")
    g.add_argument("--crf-decay", type=float, default=0.9, help="CRF decay per token")
    g.add_argument("--distance-weight", type=float, default=0.0,
                   help="score eviction evicts the longest expected wait to next use: this x (layers until the "
                        "expert's layer runs again) / L + (1 - score) / score tokens (0: the score alone)")
    g.add_argument("--reset-per-prompt", action="store_true", help="fresh cache for every prompt")
    g.add_argument("--initial-fill", choices=("empty", "random"), default=None, help="initial cache content")
    g.add_argument("--seed", type=int, default=0, help="seed of the random initial fill")
    c = p.add_argument_group("cost model")
    c.add_argument("--bandwidth-gbps", type=float, default=25.0, help="per-link bandwidth, GB/s (1 GB = 1e9 bytes)")
    c.add_argument("--expert-bytes", type=float, default=17.3e6, help="bytes per expert (DeepSeek-V2-Lite bf16)")
    c.add_argument("--layer-compute-ms", type=float, default=0.5, help="compute time per layer with experts resident")
    c.add_argument("--links", type=int, default=1, help="serial transfer links working in parallel")
    c.add_argument(
        "--zero-latency", action="store_true",
        help="MoE-Beyond's protocol: zero transfer time, fresh random cache per prompt, "
        "10 warm-up tokens per prompt, prefetch for layer l right before layer l",
    )  # fmt: skip
    c.add_argument("--miss-mode", choices=("copy", "host", "choose"), default="copy",
                   help="a miss is copied over the link, computed on the host (not cached), or chosen per expert "
                   "(copy what the predictor expects to be reused)")  # fmt: skip
    c.add_argument("--demand-admission", choices=("all", "bypass"), default="all",
                   help="bypass: a copied miss that would be the next victim is computed from one of top-k scratch "
                   "slots (taken from the capacity) and not cached")  # fmt: skip
    c.add_argument("--host-bandwidth-gbps", type=float, default=50.0, help="host memory bandwidth for host compute")
    c.add_argument("--host-overhead-ms", type=float, default=0.05, help="fixed cost of a step with host compute")
    pr = p.add_argument_group("prefetch")
    pr.add_argument("--admission", choices=("all", "cost"), default="all",
                    help="cost: prefetch only what can arrive in time and beats the victim's predicted reuse")
    pr.add_argument("--prefetch-issue", choices=("step", "routed"), default="step",
                    help="routed: issue step s's predictions right after step s-1 routed, behind its demand copies")
    pr.add_argument("--lookahead-layers", type=int, default=None, help="furthest target in layers ahead (default 1; 0 with --zero-latency)")
    pr.add_argument("--prefetch-k", type=int, default=None, help="experts prefetched per target layer (default: top-k)")
    pr.add_argument("--min-score", type=float, default=0.0, help="prefetch only scores above this")
    pr.add_argument("--warmup-tokens", type=int, default=None, help="per-prompt uncounted warm-up tokens (default 0; 10 with --zero-latency)")
    pr.add_argument("--metric-k", type=int, nargs="+", default=None, help="k values for recall/precision@k (default: top-k)")
    d = p.add_argument_group("data")
    src = d.add_mutually_exclusive_group()
    src.add_argument("--train-traces", type=Path, help="trace set to fit the predictor on")
    src.add_argument(
        "--split", nargs="?", type=float, const=0.2, default=None, metavar="VAL_FRACTION",
        help="fit on the prompts with the lowest ids, replay the last VAL_FRACTION (by prompt id)",
    )  # fmt: skip
    d.add_argument("--max-prompts", type=int, default=None, help="replay only the first N prompts (quick runs)")
    m = p.add_argument_group("predictor inputs")
    m.add_argument(
        "--model-checkpoint", type=Path, default=None,
        help="converted model checkpoint (python -m emoe_jax.convert) whose router weights spec-gating applies; "
        "the traces must be of that model and carry router inputs",
    )  # fmt: skip
    m.add_argument(
        "--predictor-checkpoint", type=Path, default=None,
        help="learned-predictor checkpoint (default: the one in checkpoints/predictors that matches the traces' "
        "layers, experts and top-k)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for name, desc in available_predictors().items():
            print(f"{name:22s} {desc}")
        return 0
    if args.traces is None or args.predictor is None:
        return fail("--traces and --predictor are required (or --list)")
    from emoe_jax.traces import TraceSet

    try:
        traces = TraceSet.load(args.traces)
        train = None
        if args.train_traces is not None:
            train = TraceSet.load(args.train_traces)
        elif args.split is not None:
            train, traces = split_by_prompt_id(traces, args.split)
        if args.max_prompts is not None:
            traces = traces.select(slice(0, args.max_prompts))
        base = SimConfig.moe_beyond() if args.zero_latency else SimConfig()
        overrides = dict(
            capacity=args.capacity,
            per_layer=args.per_layer,
            expert_bytes=args.expert_bytes,
            bandwidth_gbps=args.bandwidth_gbps,
            layer_compute_ms=args.layer_compute_ms,
            links=args.links,
            prefetch_k=args.prefetch_k,
            min_score=args.min_score,
            eviction=args.eviction,
            seed=args.seed,
            admission=args.admission,
            miss_mode=args.miss_mode,
            demand_admission=args.demand_admission,
            prefetch_issue=args.prefetch_issue,
            eviction_scores=args.eviction_scores,
            crf_weight=args.crf_weight,
            crf_decay=args.crf_decay,
            distance_weight=args.distance_weight,
            host_bandwidth_gbps=args.host_bandwidth_gbps,
            host_overhead_ms=args.host_overhead_ms,
        )
        if args.lookahead_layers is not None:
            overrides["lookahead_layers"] = args.lookahead_layers
        if args.warmup_tokens is not None:
            overrides["warmup_tokens"] = args.warmup_tokens
        if args.reset_per_prompt:
            overrides["reset_per_prompt"] = True
        if args.initial_fill is not None:
            overrides["initial_fill"] = args.initial_fill
        if args.metric_k:
            overrides["metric_k"] = tuple(args.metric_k)
        config = base.with_(**overrides)
        inputs = {}
        if args.model_checkpoint is not None:
            if not args.model_checkpoint.exists():
                raise FileNotFoundError(f"--model-checkpoint {args.model_checkpoint} does not exist")
            inputs["model_checkpoint"] = str(args.model_checkpoint)
        if args.predictor_checkpoint is not None:
            inputs["checkpoint"] = str(args.predictor_checkpoint)
        predictor = get_predictor(args.predictor, ignore_unknown=True, lookahead=config.lookahead_layers, **inputs)
        if train is not None:
            predictor.fit(train)
        result = simulate(traces, predictor, config, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        return fail(str(exc))
    out = result.to_dict()
    out["split"] = (
        {"train_prompts": len(train), "eval_prompts": len(traces),
         "train_prompt_ids": [int(np.min(train.prompt_ids)), int(np.max(train.prompt_ids))] if len(train) else [],
         "eval_prompt_ids": [int(np.min(traces.prompt_ids)), int(np.max(traces.prompt_ids))]}
        if train is not None else None
    )  # fmt: skip
    if args.json:
        print(json.dumps(out))
        return 0
    flag = "  [ORACLE: reads the future]" if result.oracle else ""
    print(f"predictor {result.predictor} / eviction {result.eviction}{flag}")
    print(f"capacity  {result.capacity_experts} experts ({'per layer' if config.per_layer else 'global'}); "
          f"{'zero latency' if config.zero_latency else f'{config.bandwidth_gbps} GB/s x {config.links} link(s), {config.expert_bytes / 1e6:.1f} MB/expert, {config.layer_compute_ms} ms/layer'}; "
          f"lookahead {config.lookahead_layers}")  # fmt: skip
    if out["split"]:
        s = out["split"]
        print(f"split     train {s['train_prompts']} prompts (ids {s['train_prompt_ids']}), eval {s['eval_prompts']} (ids {s['eval_prompt_ids']})")
    print(f"replayed  {result.prompts} prompts, {result.tokens} tokens, {result.accesses} expert accesses in {result.wall_seconds:.1f} s")
    rows = [
        ("hit rate", out["hit_rate"]),
        ("  timely prefetch share", out["prefetch_coverage"]),
        ("late prefetch rate", out["late_prefetch_rate"]),
        ("demand miss rate", out["miss_rate"]),
        ("timely / (timely + late)", out["timely_prefetch_rate"]),
        ("prefetch accuracy (used/started)", out["prefetch_accuracy"]),
        ("prefetch waste (evicted unused/started)", out["prefetch_waste_rate"]),
    ]
    for label, v in rows:
        print(f"{label:42s} {100 * v:7.2f} %")
    print(f"{'stall per token':42s} {out['stall_ms_per_token']:7.2f} ms")
    print(f"{'time per token (compute + stall)':42s} {out['ms_per_token']:7.2f} ms")
    if result.host_computes:
        print(f"{'misses computed on the host':42s} {100 * out['host_compute_rate']:7.2f} %")
    if result.demand_bypassed:
        print(f"{'demand misses bypassed (scratch slot)':42s} {result.demand_bypassed:7d} ({result.scratch_slots} scratch slots)")
    if result.prefetches_refused:
        print(f"{'prefetches refused by admission':42s} {result.prefetches_refused:7d}")
    print(f"{'bytes moved per token':42s} {out['bytes_per_token'] / 1e6:7.1f} MB")
    for key, v in out["prediction"].items():
        if not key.endswith(("per_layer", "per_distance")) and key != "rows":
            print(f"{key:42s} {100 * v:7.2f} %")
    if len(out["per_task"]) > 1:
        print("per task: hit rate / stall ms per token (prompts)")
        for task, c in sorted(out["per_task"].items()):
            print(f"  {task:40s} {100 * c['hit_rate']:7.2f} % / {c['stall_ms_per_token']:.2f} ms ({c['prompts']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
