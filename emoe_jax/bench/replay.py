"""Forced-routing replay benchmark: real DeepSeek-V2-Lite routing on a real-shaped random model.

    python -m emoe_jax.bench replay                                  # 4 Puffin validation prompts, 4 fractions
    python -m emoe_jax.bench replay --fractions 1,0.25 --prompts 2 --json

Steps:
  1. load the trace set and take the validation side of `split_by_prompt_id`
     (the prompts predictors never trained on), first --prompts of them with at
     least --prompt-tokens + --decode-tokens tokens;
  2. build the replay model once (`forced_replay_model`: DeepSeek-V2-Lite's depth,
     64 experts top-6, 2 shared experts and MLA, widths times --scale, random weights);
  3. per device fraction, a fresh engine (exact mode, --policy eviction; with --predictor, a host
     predictor fitted on the training side of the split prefetches on the staged path):
     warm-up generation (compiles), empty cache, then every prompt in turn with the
     trace's routing forced (prefill --prompt-tokens, decode --decode-tokens);
  4. next to each row, the simulator's LRU hit rate on the same tokens (per-layer
     pools of the same size, zero latency, prompt tokens as uncounted warm-up).
The engine prefills all prompt tokens in one step, the simulator one token at a
time, so the two hit rates are close but not equal. All rows come from one run.

Steps of one replay (`run_forced_replay`, also used by `bench e2e`):
  1. build (or take) the replay model and an `OffloadedEngine` over it;
  2. per batch of trace prompts, a `TraceRouting` (emoe_jax/traces/forced_routing.py)
     gives the prompts' token ids, the number of new tokens, and the override: token
     at prompt position p of row b, MoE layer l -> trace experts[p, l] and weights;
  3. one warm-up generation compiles every stage, then the device cache is emptied;
  4. the batches are generated with the override; decode-phase counters are
     separated from prefill ones with a snapshot taken at the first decode step.
See docs/forced_routing.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from tqdm import tqdm

from emoe_jax.cli import USER_ERRORS, fail
from ..atomic_io import write_text_atomic
from ..predict import get_predictor
from ..runtime.budget import BudgetError, parse_expert_count
from ..config import MoEConfig
from ..model.random_init import random_dense_params, random_experts, scaled_config
from ..runtime.compile_count import compile_count
from ..runtime.engine import OffloadedEngine
from ..runtime.engine_config import EVICTION_SCORES
from ..runtime.policies import POLICIES, check_policy
from ..runtime.predictors import NO_PREDICTOR, runtime_predictor
from ..runtime.tiers import InMemoryExperts
from ..sim import SimConfig, simulate
from ..traces import TraceSet
from ..traces.forced_routing import ForcedRoutingError, TraceRouting, forced_routing
from ..traces.format import PromptTrace
from ..traces.split import split_by_prompt_id

DEFAULT_TRACES = Path("out/puffin_traces")


# ---------------------------------------------------------------------------- model


@dataclasses.dataclass
class ReplayModel:
    cfg: MoEConfig
    graphdef: Any
    params: Any
    source: InMemoryExperts  # the disk-tier stand-in holding every routed expert
    dtype: Any
    build_s: float

    @property
    def expert_bytes_total(self) -> int:
        return self.source.expert_bytes * self.cfg.num_experts * self.cfg.num_moe_layers

    def engine(self, **engine_kwargs) -> OffloadedEngine:
        return OffloadedEngine(self.cfg, self.graphdef, self.params, self.source, dtype=self.dtype, **engine_kwargs)


def forced_replay_model(shape: str = "deepseek-v2-lite", scale: float = 0.25, seed: int = 0,
                        dtype=jnp.bfloat16, vocab_size: int | None = 4096) -> ReplayModel:
    """A random model of a real family's shape, widths scaled by `scale`, experts in an InMemoryExperts.

    deepseek-v2-lite at scale 1/4: hidden 512, expert width 352, 27 layers (26 MoE),
    64 experts top-6, 2 shared experts, MLA; 1.08 MB per bf16 expert, 1.8 GB in all.
    scale=1 is the real size (17.3 MB per expert, 28.8 GB of experts): GPU hosts only.
    """
    t0 = time.perf_counter()
    cfg = scaled_config(shape, scale, vocab_size)
    dtype = jnp.dtype(dtype)
    graphdef, params = random_dense_params(cfg, seed, dtype)
    source = InMemoryExperts(random_experts(cfg, seed + 1, dtype))
    return ReplayModel(cfg, graphdef, params, source, dtype, time.perf_counter() - t0)


# ---------------------------------------------------------------------------- replay


def _decode_counters(before: dict, after: dict) -> dict:
    dev_b, dev_a = before["device"], after["device"]
    return {"hits": dev_a["hits"] - dev_b["hits"], "misses": dev_a["misses"] - dev_b["misses"],
            "stall_s": after["stall_s"] - before["stall_s"], "h2d_bytes": after["h2d_bytes"] - before["h2d_bytes"]}


def _warm_up(engine: OffloadedEngine, routing: TraceRouting) -> None:
    """Compile prefill and decode stages for this batch shape, then forget the cache it filled."""
    short = copy.copy(routing)  # same prompts (same prefill bucket), two decode steps
    short.decode_tokens = min(2, routing.decode_tokens)
    with forced_routing(engine, short):
        engine.generate(short.prompts, short.max_new_tokens, stop_at_eos=False)
    engine.residency.evict_all()


def choose_prompts(traces: TraceSet | Sequence[PromptTrace], n_prompts: int, min_tokens: int) -> list[int]:
    """Indices of the first `n_prompts` traces (stored order) with at least `min_tokens` tokens."""
    chosen = [i for i in range(len(traces)) if traces[i].n_tokens >= min_tokens][:n_prompts]
    if len(chosen) < n_prompts:
        raise ForcedRoutingError(f"only {len(chosen)} of {len(traces)} trace prompts have >= {min_tokens} tokens "
                                 f"(prompt + decode tokens); {n_prompts} were asked for. Lower n_prompts, "
                                 "prompt_tokens or decode_tokens.")
    return chosen


def run_forced_replay(engine_kwargs: dict | None, traces: TraceSet | Sequence[PromptTrace], n_prompts: int, *,
                      model: ReplayModel | None = None, engine: OffloadedEngine | None = None,
                      prompt_tokens: int | None = 16, decode_tokens: int | None = 32, batch_size: int = 1,
                      warmup: bool = True, past_end: str = "wrap") -> dict:
    """Replay `n_prompts` traces through the engine with forced routing; returns decode-phase figures.

    The engine is `engine` if given (e.g. one with a prefetcher), else a new one over
    `model` (default: `forced_replay_model()`) built with `engine_kwargs`
    (device_experts, policy, ...). Prompts: the first `n_prompts` traces with at
    least prompt_tokens + decode_tokens tokens, in stored order, `batch_size` at a time;
    the device cache persists from batch to batch (like the simulator's running cache).
    Each prompt prefills `prompt_tokens` trace tokens (None: its n_prefill) and decodes
    `decode_tokens` more (None: to its trace's end).

    Returned: decode tokens/s (decode wall time, which includes on-demand fetch stalls),
    the device hit rate of decode steps alone and of prefill + decode, stall seconds
    and ms per decode token, bytes moved host->device, compilations during the timed
    runs and during their decode phases alone (the warm-up compiles decode; a prefill
    that needs more experts than slots may still compile its wave kernels later, which
    never touches decode timing), device/all expert bytes.
    """
    if engine is None:
        model = model or forced_replay_model()
        engine = model.engine(**(engine_kwargs or {}))
    if batch_size < 1:
        raise ForcedRoutingError(f"batch_size must be at least 1, got {batch_size}")
    need = (prompt_tokens or 1) + (decode_tokens or 0)
    chosen = choose_prompts(traces, n_prompts, need)
    batches = [chosen[i:i + batch_size] for i in range(0, len(chosen), batch_size)]
    routings = [TraceRouting(traces, engine.cfg, b, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens,
                             past_end=past_end) for b in batches]
    if warmup:
        _warm_up(engine, routings[0])
    totals = dict(decode_tokens=0, decode_s=0.0, prefill_tokens=0, prefill_s=0.0, hits=0, misses=0,
                  all_hits=0, all_misses=0, stall_s=0.0, h2d_bytes=0, compiles=0, decode_compiles=0)
    stats: dict = {}
    for routing in routings:
        snapshot: dict = {}

        def at_first_decode(step: int, _tokens, snapshot=snapshot) -> None:
            if step == 0:  # prefill is done, no decode step has run yet
                snapshot.update(engine.stats(), compiles_before_decode=compile_count())

        with forced_routing(engine, routing):
            result = engine.generate(routing.prompts, routing.max_new_tokens, stop_at_eos=False,
                                     on_token=at_first_decode)
        stats = result.stats
        totals["decode_compiles"] += compile_count() - snapshot["compiles_before_decode"]
        dec = _decode_counters(snapshot, stats)
        totals["decode_tokens"] += stats["decode_tokens"]
        totals["decode_s"] += stats["decode_s"]
        totals["prefill_tokens"] += stats["prefill_tokens"]
        totals["prefill_s"] += stats["prefill_s"]
        totals["hits"] += dec["hits"]
        totals["misses"] += dec["misses"]
        totals["all_hits"] += stats["device"]["hits"]
        totals["all_misses"] += stats["device"]["misses"]
        totals["stall_s"] += dec["stall_s"]
        totals["h2d_bytes"] += dec["h2d_bytes"]
        totals["compiles"] += stats["compiles"] or 0
    lookups = totals["hits"] + totals["misses"]
    all_lookups = totals["all_hits"] + totals["all_misses"]
    return {
        "prompts": len(chosen),
        "prompt_indices": chosen,
        "batch_size": batch_size,
        "prompt_tokens": prompt_tokens,
        "decode_tokens": totals["decode_tokens"],
        "decode_s": totals["decode_s"],
        "decode_tokens_per_s": totals["decode_tokens"] / totals["decode_s"] if totals["decode_s"] else 0.0,
        "prefill_tokens": totals["prefill_tokens"],
        "prefill_s": totals["prefill_s"],
        "device_hit_rate": totals["hits"] / lookups if lookups else 1.0,
        "device_hits": totals["hits"],
        "device_misses": totals["misses"],
        "device_hit_rate_with_prefill": totals["all_hits"] / all_lookups if all_lookups else 1.0,
        "device_hits_with_prefill": totals["all_hits"],
        "device_misses_with_prefill": totals["all_misses"],
        "stall_s": totals["stall_s"],
        "stall_ms_per_token": 1e3 * totals["stall_s"] / max(totals["decode_tokens"], 1),
        "h2d_bytes": totals["h2d_bytes"],
        "compiles": totals["compiles"],
        "decode_compiles": totals["decode_compiles"],
        "device_slots_per_layer": stats.get("device_slots_per_layer"),
        "device_expert_bytes": stats.get("device_expert_bytes"),
        "all_expert_bytes": stats.get("all_expert_bytes"),
        "mode": stats.get("mode"),
    }


def _cut(traces: TraceSet, indices: list[int], prompt_tokens: int, decode_tokens: int) -> TraceSet:
    """The chosen prompts cut to the replayed tokens, prompt tokens marked as prefill."""
    n = prompt_tokens + decode_tokens
    cut = []
    for i in indices:
        p = traces[i]
        cut.append(dataclasses.replace(
            p, token_ids=p.token_ids[:n], experts=p.experts[:n], weights=None if p.weights is None else p.weights[:n],
            n_prefill=prompt_tokens, hidden=None, tokens=None if p.tokens is None else p.tokens[:n]))
    meta = dataclasses.replace(traces.meta, hidden_size=None)
    return TraceSet.from_prompts(meta, cut)


def sim_lru_hit_rate(cut: TraceSet, slots: int, prompt_tokens: int) -> float | None:
    """Zero-latency LRU with per-layer pools of `slots`, running cache, prompt tokens uncounted
    (None below top-k slots, which the simulator refuses and the engine serves in waves)."""
    m = cut.meta
    if slots < m.top_k:
        return None
    config = SimConfig(capacity=slots * m.num_layers, per_layer=True, zero_latency=True,
                       warmup_tokens=prompt_tokens, lookahead_layers=0)
    return simulate(cut, get_predictor("lru"), config).hit_rate


def run(args) -> dict:
    cfg = scaled_config(args.shape, args.scale, args.vocab)
    slot_counts = [parse_expert_count(f, cfg.num_experts, "--fractions") for f in args.fractions]  # fail before building
    check_policy(args.policy, args.predictor not in NO_PREDICTOR)  # before the minutes of loading and building
    if args.eviction_scores != "latest" and args.policy != "score":
        raise ValueError("--eviction-scores chooses what score eviction ranks by; add --policy score")
    traces = TraceSet.load(args.traces)
    train, val = split_by_prompt_id(traces, args.val_fraction)
    chosen = choose_prompts(val, args.prompts, args.prompt_tokens + args.decode_tokens)
    replay = val.select(chosen)
    cut = _cut(val, chosen, args.prompt_tokens, args.decode_tokens)
    model = forced_replay_model(args.shape, args.scale, args.seed, jnp.dtype(args.dtype), args.vocab)
    cfg = model.cfg
    # Forced routing runs the staged path, so the predictor runs on the host (fitted on the training side).
    predictor = runtime_predictor(args.predictor, cfg, None, train, args.lookahead, args.predictor_checkpoint)
    rows = []
    for fraction, slots in tqdm(list(zip(args.fractions, slot_counts)), desc="device fractions",
                                disable=not args.progress, file=sys.stderr):
        out = run_forced_replay(dict(device_experts=fraction, policy=args.policy, predictor=predictor,
                                     eviction_scores=args.eviction_scores), replay,
                                len(chosen), model=model,
                                prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
                                batch_size=args.batch_size)
        out.pop("prompt_indices")
        out.update(fraction=fraction, slots=slots, sim_lru_hit_rate=sim_lru_hit_rate(cut, slots, args.prompt_tokens))
        rows.append(out)
    return {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} on {jax.default_backend()}",
        "traces": str(args.traces),
        "prompt_ids": [int(i) for i in replay.prompt_ids],
        "model": {"shape": args.shape, "scale": args.scale, "dtype": args.dtype, "hidden_size": cfg.hidden_size,
                  "moe_intermediate_size": cfg.moe_intermediate_size, "moe_layers": cfg.num_moe_layers,
                  "experts": cfg.num_experts, "top_k": cfg.top_k, "vocab_size": cfg.vocab_size,
                  "expert_bytes": model.source.expert_bytes, "all_expert_bytes": model.expert_bytes_total,
                  "build_s": model.build_s},
        "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens, "batch_size": args.batch_size,
        "policy": args.policy,
        "eviction_scores": args.eviction_scores,
        "predictor": args.predictor,
        "rows": rows,
    }


def table(result: dict) -> str:
    m = result["model"]
    lines = [
        f"forced-routing replay: {m['shape']} x{m['scale']:g} ({m['moe_layers']} MoE layers, {m['experts']} experts "
        f"top-{m['top_k']}, {m['expert_bytes'] / 1e6:.2f} MB/expert, {m['all_expert_bytes'] / 1e9:.2f} GB of experts, "
        f"{m['dtype']}), built in {m['build_s']:.1f} s",
        f"prompts {result['prompt_ids']} of {result['traces']} (validation side), {result['prompt_tokens']} prompt + "
        f"{result['decode_tokens']} decode tokens each, batch {result['batch_size']}, {result['policy']}, "
        f"predictor {result.get('predictor', 'none')}; "
        f"{result['machine']}",
        "",
        "| device fraction | slots/layer | device experts MB | decode tok/s | decode hit rate | sim LRU hit rate "
        "| stall ms/token | decode compiles |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['fraction']} | {r['slots']} | {r['device_expert_bytes'] / 1e6:.0f} | "
                     f"{r['decode_tokens_per_s']:.2f} | {r['device_hit_rate']:.3f} | "
                     f"{'-' if r['sim_lru_hit_rate'] is None else format(r['sim_lru_hit_rate'], '.3f')} | "
                     f"{r['stall_ms_per_token']:.1f} | {r['decode_compiles']} |")
    return "\n".join(lines)



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m emoe_jax.bench replay",
        description="Decode tokens/s and device hit rate vs device-expert fraction, with the routing of real "
                    "DeepSeek-V2-Lite traces forced onto a random model of DeepSeek-V2-Lite's shape (widths scaled "
                    "for CPU). Exact mode, on-demand fetching with --policy eviction, prefetching with --predictor. "
                    "See docs/forced_routing.md.")
    parser.add_argument("--traces", type=Path, default=DEFAULT_TRACES,
                        help="trace set (default out/puffin_traces; make it with python -m emoe_jax.traces "
                             "import-moe-beyond ../shared/data/deepseek-v2-lite-puffin/traces.tar.gz out/puffin_traces)")
    parser.add_argument("--prompts", type=int, default=4, help="validation prompts replayed (default 4)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="validation share by prompt id (default 0.2)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="trace tokens prefilled per prompt (default 16)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="trace tokens then decoded (default 32)")
    parser.add_argument("--fractions", default="1.0,0.5,0.25,0.1",
                        help="device-expert fractions (or counts) per layer, comma-separated (default 1.0,0.5,0.25,0.1)")
    parser.add_argument("--policy", default="lru", choices=list(POLICIES),
                        help="device eviction policy (default lru); score (needs --predictor) evicts the expert the "
                             "predictor's latest scores rank lowest, LRU breaking ties")
    parser.add_argument("--eviction-scores", default="latest", choices=EVICTION_SCORES,
                        help="with --policy score: latest (each layer's nearest prediction, then its reuse scores "
                             "once it ran) or reuse (reuse scores only, e.g. causal-reuse's learned ones)")
    parser.add_argument("--predictor", default="none",
                        help="host predictor that prefetches (staged path: forced routing runs there), e.g. "
                             "prev-token, learned, or one fitted on the training side of the split (static-freq, "
                             "causal-table, moe-infinity, emoe); default none")
    parser.add_argument("--lookahead", type=int, default=None, help="predictor lookahead in layers (default: its own)")
    parser.add_argument("--predictor-checkpoint", default=None, help="learned predictor checkpoint directory")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts decoded together (default 1)")
    parser.add_argument("--shape", default="deepseek-v2-lite", help="model preset whose shape is replayed")
    parser.add_argument("--scale", type=float, default=0.25,
                        help="width scale (default 0.25: hidden 512, 1.8 GB of bf16 experts; 1.0 = 28.8 GB, GPU only)")
    parser.add_argument("--vocab", type=int, default=4096, help="reduced vocabulary (default 4096; 0 keeps the real one)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="weights (default bfloat16)")
    parser.add_argument("--seed", type=int, default=0, help="random weights")
    parser.add_argument("--out", type=Path, help="also write the JSON result here (atomically)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = parser.parse_args(argv)
    args.fractions = [f.strip() for f in args.fractions.split(",") if f.strip()]
    args.vocab = args.vocab or None
    try:
        if not args.fractions:
            raise BudgetError("--fractions lists no fraction")
        if min(args.prompts, args.prompt_tokens, args.decode_tokens, args.batch_size) < 1:
            raise ForcedRoutingError("--prompts, --prompt-tokens, --decode-tokens and --batch-size must be >= 1")
        t0 = time.perf_counter()
        result = run(args)
        result["wall_s"] = time.perf_counter() - t0
    except USER_ERRORS as e:  # ForcedRoutingError, BudgetError, TraceFormatError, ConfigError
        return fail(e)
    text = json.dumps(result, indent=1)
    if args.out:
        write_text_atomic(args.out, text + "\n")
    print(text if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
