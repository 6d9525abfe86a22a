"""Forced-routing replay benchmark: real DeepSeek-V2-Lite routing on a real-shaped random model.

    python -m emoe_jax.bench replay                                  # 4 Puffin validation prompts, 4 fractions
    python -m emoe_jax.bench replay --fractions 1,0.25 --prompts 2 --json

Steps:
  1. load the trace set and take the validation side of `split_by_prompt_id`
     (the prompts predictors never trained on), first --prompts of them with at
     least --prompt-tokens + --decode-tokens tokens;
  2. build the replay model once (`forced_replay_model`: DeepSeek-V2-Lite's depth,
     64 experts top-6, 2 shared experts and MLA, widths times --scale, random weights);
  3. per device fraction, a fresh engine (exact mode, --policy on-demand eviction):
     warm-up generation (compiles), empty cache, then every prompt in turn with the
     trace's routing forced (prefill --prompt-tokens, decode --decode-tokens);
  4. next to each row, the simulator's LRU hit rate on the same tokens (per-layer
     pools of the same size, zero latency, prompt tokens as uncounted warm-up).
The engine prefills all prompt tokens in one step, the simulator one token at a
time, so the two hit rates are close but not equal. All rows come from one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm import tqdm

from ..predict import get_predictor
from ..runtime.budget import BudgetError, parse_expert_count
from ..runtime.forced import (ForcedRoutingError, choose_prompts, forced_replay_model, run_forced_replay,
                              scaled_config)
from ..sim import SimConfig, simulate, split_by_prompt_id
from ..traces import TraceSet

DEFAULT_TRACES = Path("out/puffin_traces")


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
    traces = TraceSet.load(args.traces)
    _, val = split_by_prompt_id(traces, args.val_fraction)
    chosen = choose_prompts(val, args.prompts, args.prompt_tokens + args.decode_tokens)
    replay = val.select(chosen)
    cut = _cut(val, chosen, args.prompt_tokens, args.decode_tokens)
    model = forced_replay_model(args.shape, args.scale, args.seed, jnp.dtype(args.dtype), args.vocab)
    cfg = model.cfg
    rows = []
    for fraction, slots in tqdm(list(zip(args.fractions, slot_counts)), desc="device fractions",
                                disable=not args.progress, file=sys.stderr):
        out = run_forced_replay(dict(device_experts=fraction, policy=args.policy), replay, len(chosen), model=model,
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
        "rows": rows,
    }


def table(result: dict) -> str:
    m = result["model"]
    lines = [
        f"forced-routing replay: {m['shape']} x{m['scale']:g} ({m['moe_layers']} MoE layers, {m['experts']} experts "
        f"top-{m['top_k']}, {m['expert_bytes'] / 1e6:.2f} MB/expert, {m['all_expert_bytes'] / 1e9:.2f} GB of experts, "
        f"{m['dtype']}), built in {m['build_s']:.1f} s",
        f"prompts {result['prompt_ids']} of {result['traces']} (validation side), {result['prompt_tokens']} prompt + "
        f"{result['decode_tokens']} decode tokens each, batch {result['batch_size']}, {result['policy']}; "
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


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m emoe_jax.bench replay",
        description="Decode tokens/s and device hit rate vs device-expert fraction, with the routing of real "
                    "DeepSeek-V2-Lite traces forced onto a random model of DeepSeek-V2-Lite's shape (widths scaled "
                    "for CPU). Exact mode, on-demand fetching with --policy eviction. See docs/forced_routing.md.")
    parser.add_argument("--traces", type=Path, default=DEFAULT_TRACES,
                        help="trace set (default out/puffin_traces; make it with python -m emoe_jax.traces "
                             "import-moe-beyond ../shared/data/deepseek-v2-lite-puffin/traces.tar.gz out/puffin_traces)")
    parser.add_argument("--prompts", type=int, default=4, help="validation prompts replayed (default 4)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="validation share by prompt id (default 0.2)")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="trace tokens prefilled per prompt (default 16)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="trace tokens then decoded (default 32)")
    parser.add_argument("--fractions", default="1.0,0.5,0.25,0.1",
                        help="device-expert fractions (or counts) per layer, comma-separated (default 1.0,0.5,0.25,0.1)")
    parser.add_argument("--policy", default="lru", choices=("lru", "lfu"), help="device eviction policy (default lru)")
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
    except (FileNotFoundError, ValueError) as e:  # ForcedRoutingError, BudgetError, TraceFormatError, ConfigError
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=1)
    if args.out:
        _write_atomic(args.out, text + "\n")
    print(text if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
