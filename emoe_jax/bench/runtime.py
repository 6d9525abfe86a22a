"""Runtime benchmark: decode tokens/s and device memory vs the fraction of experts on the device.

    python -m emoe_jax.bench runtime                      # tiny + mid random models
    python -m emoe_jax.bench runtime --models embedded,mid --fractions 1,0.5,0.25,0.1 --json

For each model:
  1. `fused`: the all-resident baseline, one jit per decode step, all experts on
     the device, next token fed back on the device (no host sync) -- the fastest
     this model can decode here;
  2. at each fraction S/E (exact mode, LRU), on fresh engines:
     `staged` (the per-layer loop, one host sync per MoE layer), `onejit` (the whole
     decode step in one executable), `onejit+NAME` for each in-graph predictor
     (`--in-graph`), and `staged+NAME` for a host predictor (`--predictor`);
     each is warmed up (compiled), then `--repeats` rounds on different prompts
     time the fused step and every configuration in turn (round-robin, so load
     drift hits all alike); medians, ratios to the same rounds' fused median.
All figures of a run come from one process, so their ratios are comparable.
`--json` prints one object: `rows` holds one entry per (model, fraction, config)
with `decode_tokens_per_s`, `ratio_to_fused`, `device_hit_rate`, `decode_path`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from emoe_jax.cli import fail
from ..config import tiny_config
from ..model.decoder import init_kv_caches
from ..model.random_init import random_model
from ..model.resident import ResidentModel, fused_step_fn, greedy_next, left_pad
from ..runtime.engine import OffloadedEngine
from ..runtime.tiers import InMemoryExperts
from ..atomic_io import write_json_atomic

MODELS = {
    # name: (family, overrides) -- random weights; shapes chosen to fit a 2-core CPU run.
    "tiny": ("qwen3_moe", dict(num_layers=4, num_experts=16, top_k=2, hidden_size=64, moe_intermediate_size=64,
                               head_dim=16, vocab_size=512)),
    "mid": ("qwen3_moe", dict(num_layers=8, num_experts=32, top_k=4, hidden_size=512, num_heads=8, num_kv_heads=4,
                              head_dim=64, moe_intermediate_size=512, intermediate_size=1024, vocab_size=4096,
                              max_position_embeddings=2048)),
}


def _prompts(vocab: int, batch: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=length).tolist() for _ in range(batch)]


def fused_decode_rate(rm: ResidentModel, prompts, new_tokens: int) -> float:
    """Decode tokens/s of the fused all-resident step, prefill excluded."""
    tokens, pad_len = left_pad(prompts)
    b, t = tokens.shape
    caches = init_kv_caches(rm.cfg, b, t + new_tokens, rm.dtype)
    fused = fused_step_fn(rm.graphdef)  # the jitted closure, looked up once (no per-step GraphDef hashing)
    pad = jnp.asarray(pad_len)
    logits, caches, _ = fused(rm.params, rm.experts, rm.slot_maps, tokens, caches, np.int32(0), pad)
    nxt = greedy_next(logits)
    jax.block_until_ready(nxt)
    t0 = time.perf_counter()
    for step in range(new_tokens - 1):
        logits, caches, _ = fused(rm.params, rm.experts, rm.slot_maps, nxt, caches, np.int32(t + step), pad)
        nxt = greedy_next(logits)
    jax.block_until_ready(nxt)
    return b * (new_tokens - 1) / (time.perf_counter() - t0)


EMBEDDED = Path(__file__).resolve().parents[2] / "checkpoints" / "embedded"


def _model(name: str, dtype):
    if name == "embedded":
        rm = ResidentModel.from_checkpoint(EMBEDDED)
        return rm.cfg, rm.graphdef, rm.params, rm.experts, rm.dtype
    family, overrides = MODELS[name]
    cfg = tiny_config(family, **overrides)
    graphdef, params, experts = random_model(cfg, seed=0, dtype=dtype, router_scale=3.0)
    return cfg, graphdef, params, experts, dtype


def _predictor(name: str | None, model: str, cfg):
    """A fresh host predictor for one engine (None: no prefetching). Host speculative gating needs
    the router weights of a checkpoint, and the learned predictor a checkpoint of the model's shape:
    both exist only for the embedded model."""
    if name in (None, "none"):
        return None
    from ..runtime.predictors import runtime_predictor

    return runtime_predictor(name, cfg, EMBEDDED if model == "embedded" else None)


def _in_graph(name: str, cfg):
    """An in-graph predictor for `cfg`, or None when none fits the model (learned: no checkpoint
    of its shape). spec-gating and prev-token need nothing but the model."""
    from ..runtime.ingraph_predictors import IN_GRAPH, in_graph_predictor

    if name in IN_GRAPH:
        return IN_GRAPH[name](cfg)
    if name == "learned":
        from ..predict.learned import LearnedPredictorError
        from ..runtime.predictors import runtime_predictor

        try:
            return in_graph_predictor(runtime_predictor("learned", cfg), cfg)
        except (LearnedPredictorError, FileNotFoundError, ValueError):
            return None
    raise ValueError(f"no in-graph predictor {name!r}; choose from {', '.join([*IN_GRAPH, 'learned'])}")


def bench_model(name: str, fractions, batch: int, prompt_len: int, new_tokens: int, repeats: int, dtype,
                predictor: str | None = None, in_graph: tuple[str, ...] = ()) -> dict:
    """Rows of one model. Per fraction every configuration (and the fused baseline) is warmed up,
    then the repeats go round-robin over them on the same prompts, so a drift in machine load hits
    all of them alike; medians per configuration, ratios to that fraction's fused median."""
    cfg, graphdef, params, experts, dtype = _model(name, dtype)
    if predictor not in (None, "none"):
        _predictor(predictor, name, cfg)  # a predictor that cannot be set up fails before anything is timed
    rm = ResidentModel(cfg, graphdef, params, experts, dtype)
    warm = _prompts(cfg.vocab_size, batch, prompt_len, 0)
    expert_bytes = int(sum(a.nbytes for a in experts[0])) // cfg.num_experts
    all_bytes = expert_bytes * cfg.num_experts * cfg.num_moe_layers
    configs = [("staged", "staged", None), ("onejit", "onejit", None)]
    configs += [(f"onejit+{p}", "onejit", p) for p in in_graph]
    if predictor not in (None, "none"):
        configs.append((f"staged+{predictor}", "staged", predictor))
    skipped, rows, fused_all = [], [], []
    source = InMemoryExperts(experts)  # one host copy of the experts for every engine
    fused_decode_rate(rm, warm, new_tokens)  # compile
    for frac in fractions:
        engines = {}
        for label, path, pred in configs:
            if pred is None:
                chosen = None
            elif path == "onejit":
                chosen = _in_graph(pred, cfg)
                if chosen is None:
                    skipped.append(f"{label}: no {pred} checkpoint for this model's shape")
                    continue
            else:
                chosen = _predictor(pred, name, cfg)
            engines[label] = OffloadedEngine(cfg, graphdef, params, source, device_experts=frac, dtype=dtype,
                                             predictor=chosen, decode_path=path)
            engines[label].generate(warm, new_tokens, stop_at_eos=False)  # compile every shape
        fused, stats = [], {label: [] for label in engines}
        for r in range(repeats):
            prompts = _prompts(cfg.vocab_size, batch, prompt_len, r + 1)
            fused.append(fused_decode_rate(rm, prompts, new_tokens))
            for label, engine in engines.items():
                stats[label].append(engine.generate(prompts, new_tokens, stop_at_eos=False).stats)
        fused_all += fused
        base = float(np.median(fused))
        for label, engine in engines.items():
            rates = [s["decode_tokens_per_s"] for s in stats[label]]
            mid = stats[label][int(np.argsort(rates)[len(rates) // 2])]
            rows.append({"model": name, "config": label, "fraction": frac, "slots": engine.num_slots,
                         "decode_tokens_per_s": mid["decode_tokens_per_s"],
                         "ratio_to_fused": mid["decode_tokens_per_s"] / base, "fused_tokens_per_s": base,
                         "device_expert_bytes": mid["device_expert_bytes"], "device_hit_rate": mid["device_hit_rate"],
                         "stall_s": mid["stall_s"], "compiles_after_warmup": mid["compiles"],
                         "decode_path": mid["decode_path"], "prefetch": mid["prefetch"]})
    fused_row = {"model": name, "config": "fused", "fraction": 1.0, "slots": cfg.num_experts,
                 "decode_tokens_per_s": float(np.median(fused_all)), "ratio_to_fused": 1.0,
                 "device_expert_bytes": all_bytes, "device_hit_rate": 1.0, "stall_s": 0.0, "decode_path": "fused"}
    return {"model": name, "family": cfg.family, "layers": cfg.num_layers, "experts": cfg.num_experts,
            "top_k": cfg.top_k, "expert_bytes": expert_bytes, "all_expert_bytes": all_bytes, "batch": batch,
            "prompt_len": prompt_len, "new_tokens": new_tokens, "rows": [fused_row, *rows],
            "skipped": sorted(set(skipped))}


def to_markdown(result: dict) -> str:
    mib = 1 / 2**20
    lines = [f"**{result['model']}** ({result['family']}, {result['layers']} layers x {result['experts']} experts, "
             f"top-{result['top_k']}, expert {result['expert_bytes'] * mib:.2f} MiB; batch {result['batch']}, "
             f"{result['new_tokens']} new tokens)", "",
             "| config | S/E | slots/layer | decode tok/s | vs fused | device expert MiB | device hit rate | path |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['config']} | {r['fraction']:g} | {r['slots']} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['ratio_to_fused']:.2f} | {r['device_expert_bytes'] * mib:.1f} | "
                     f"{100 * r['device_hit_rate']:.1f}% | {r['decode_path']} |")
    lines += [f"(skipped {s})" for s in result.get("skipped", [])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m emoe_jax.bench runtime", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,mid", help=f"comma list of {', '.join([*MODELS, 'embedded'])}")
    p.add_argument("--fractions", default="1.0,0.5,0.25,0.1")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--in-graph", default="spec-gating,prev-token,learned",
                   help="in-graph predictors timed as onejit+NAME rows (comma list; 'none' for no such rows; "
                        "learned only where a checkpoint of the model's shape exists)")
    p.add_argument("--predictor", default="none",
                   help="also time a host predictor on the staged path as staged+NAME rows (prev-token works on "
                        "every model; spec-gating and learned on the embedded model; see "
                        "python -m emoe_jax.generate --predictor list)")
    p.add_argument("--out", help="write the JSON results to this file (atomically)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS and m != "embedded"]
    if unknown:
        return fail(f"unknown model(s) {unknown}; choose from {', '.join([*MODELS, 'embedded'])}")
    try:
        fractions = [float(f) for f in args.fractions.split(",")]
    except ValueError:
        return fail(f"--fractions {args.fractions!r} must be comma-separated numbers")
    meta = {"jax": jax.__version__, "backend": jax.default_backend(), "device": str(jax.devices()[0]),
            "machine": platform.machine(), "processor": platform.processor()}
    from ..runtime.predictors import PredictorSetupError

    in_graph = tuple(x.strip() for x in args.in_graph.split(",") if x.strip() and x.strip() != "none")
    try:
        for name in in_graph:
            if name not in ("spec-gating", "prev-token", "learned"):
                raise PredictorSetupError(f"--in-graph {name!r}: in-graph predictors are spec-gating, prev-token, "
                                          "learned")
        models = [bench_model(n, fractions, args.batch, args.prompt_len, args.new_tokens, args.repeats,
                              jnp.dtype(args.dtype), args.predictor, in_graph) for n in names]
    except PredictorSetupError as e:
        return fail(f"{e}")
    results = {"meta": meta, "rows": [r for m in models for r in m["rows"]], "models": models}
    if args.out:
        write_json_atomic(Path(args.out), results)
    if args.json:
        print(json.dumps(results))
    else:
        print(f"backend: {meta['backend']} ({meta['device']}), jax {meta['jax']}\n")
        for r in results["models"]:
            print(to_markdown(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
