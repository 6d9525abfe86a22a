"""End-to-end benchmark: offloading with prediction vs the all-resident baseline, and eMoE's claims.

    python -m emoe_jax.bench e2e                        # embedded model + forced-routing replay
    python -m emoe_jax.bench e2e --quick --no-replay    # minutes on a laptop CPU
    python -m emoe_jax.bench e2e --link-gbps 25 --json

Sections (all in one process run, so ratios within a table are comparable):
1. decode tokens/s, device expert memory, stall per token and device hit rate vs the
   device-expert fraction, on the embedded model with real prompts of every corpus task:
   on-demand (nothing kept between steps), LRU cache, prefetching driven by
   previous-token, speculative gating, the learned predictor, eMoE's task profiles,
   eMoE in restricted mode (lossy, nothing fetched), and the fused all-resident step;
   NAME+score is predictor NAME with score eviction (the slot whose expert NAME scores
   lowest goes first), NAME+cost adds cost-aware admission; recency-reuse evicts by a
   learned reuse model fitted on the training traces and prefetches nothing.
2. the same on a forced-routing replay: a random model of DeepSeek-V2-Lite's shape
   (widths scaled for CPU) routed by the real DeepSeek-V2-Lite traces (validation prompts).
3. eMoE's claims in form: output similarity of restricted mode vs the fraction (token
   agreement and KL against the full model), the memory saved at >= 0.95 agreement, and
   the longest prompt / largest batch that fit the all-resident model's device budget
   (computed from measured parameter, slot and KV-cache bytes, not found by running out).
Every engine is warmed up (compiles) before it is timed; the cache then persists from
prompt to prompt, as in serving. CPU figures are labelled with the platform.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from emoe_jax.cli import USER_ERRORS, fail
from ..atomic_io import write_json_atomic
from emoe_jax.errors import EmoeError

ROOT = Path(__file__).resolve().parents[2]
EMBEDDED = ROOT / "checkpoints" / "embedded"
PREDICTOR_CONFIGS = ("prev-token", "spec-gating", "learned")
# NAME+score: the same predictor evicting by its scores; NAME+cost: and admitting by them (one-jit step).
CONFIGS = ("on-demand", "lru", *PREDICTOR_CONFIGS, *(f"{n}+score" for n in PREDICTOR_CONFIGS),
           *(f"{n}+cost" for n in PREDICTOR_CONFIGS), "recency-reuse", "emoe-prefetch", "emoe-restricted", "fused")
DEFAULT_CONFIGS = ("on-demand", "lru", *PREDICTOR_CONFIGS, "emoe-prefetch", "emoe-restricted", "fused")
REPLAY_CONFIGS = ("on-demand", "lru", "prev-token", "static-freq", "learned", "all-resident")


class E2EError(EmoeError):
    """Missing inputs (corpus, traces, checkpoint); the message says how to make them."""


def _floats(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not out or any(not 0 < f <= 1 for f in out):
        raise argparse.ArgumentTypeError(f"fractions must be in (0, 1], got {text!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m emoe_jax.bench e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(EMBEDDED), help="converted checkpoint (default: the embedded model)")
    p.add_argument("--corpus", default=str(ROOT / "out" / "corpus"),
                   help="task corpus for prompts (python -m emoe_jax.data build DIR)")
    p.add_argument("--split", default="validation", help="corpus split the prompts come from")
    p.add_argument("--train-traces", default=None,
                   help="trace set of the model for eMoE's profiles (default: collected now on training-split prompts)")
    p.add_argument("--fractions", type=_floats, default=[0.125, 0.25, 0.5], help="device-expert fractions")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    p.add_argument("--per-task", type=int, default=1, help="prompts per corpus task")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length cap (tokens)")
    p.add_argument("--new-tokens", type=int, default=32, help="decode tokens per prompt")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype of the embedded-model section (float32 keeps exact mode bit-comparable)")
    p.add_argument("--link-gbps", type=float, default=None,
                   help="emulate a host->device link of this bandwidth (GB/s); default: the machine's real copy")
    p.add_argument("--similarity-fractions", type=_floats, default=[0.25, 0.375, 0.5, 0.625, 0.75, 0.875],
                   help="fractions of the restricted-mode similarity sweep")
    p.add_argument("--no-embedded", dest="embedded", action="store_false", default=True,
                   help="skip the embedded-model sections (run the replay only)")
    p.add_argument("--replay", dest="replay", action="store_true", default=True)
    p.add_argument("--no-replay", dest="replay", action="store_false", help="skip the forced-routing replay")
    p.add_argument("--replay-traces", default=str(ROOT / "out" / "puffin_traces"),
                   help="DeepSeek-V2-Lite trace set (python -m emoe_jax.traces import-moe-beyond ...)")
    p.add_argument("--replay-scale", type=float, default=0.25, help="width scale of the replay model")
    p.add_argument("--replay-fractions", type=_floats, default=[0.25], help="device fractions of the replay")
    p.add_argument("--replay-prompts", type=int, default=3)
    p.add_argument("--replay-configs", default=",".join(REPLAY_CONFIGS), help=f"subset of {','.join(REPLAY_CONFIGS)}")
    p.add_argument("--quick", action="store_true", help="fewer prompts/tokens/fractions (smoke run)")
    p.add_argument("--out", default=str(ROOT / "out" / "e2e"), help="directory for e2e.json, e2e.md and plots")
    p.add_argument("--json", action="store_true", help="print the JSON report")
    return p


# ---------------------------------------------------------------------------- prompts


def _prompts(args, tokenizer) -> list[tuple[str, str, list[int]]]:
    from ..emoe.prompts import corpus_texts, encode_cut

    texts = corpus_texts(args.corpus, args.split, per_task=args.per_task)
    return [(task, text, encode_cut(tokenizer, text, args.prompt_tokens))
            for task, docs in texts.items() for text in docs]


def _train_traces(args, engine_factory, tokenizer):
    """eMoE's profiles and the static predictors need routing of this model on other prompts."""
    from ..emoe.prompts import corpus_texts, encode_cut
    from ..traces import TraceSet
    from ..runtime.trace_collect import collect_traces, trace_meta

    if args.train_traces:
        return TraceSet.load(args.train_traces)
    texts = corpus_texts(args.corpus, "train", per_task=2 if args.quick else 6)
    prompts = [(task, encode_cut(tokenizer, t, args.prompt_tokens)) for task, docs in texts.items() for t in docs]
    engine = engine_factory(1.0, None)
    collected = collect_traces(engine, prompts, None, args.new_tokens, progress=False)
    return TraceSet.from_prompts(trace_meta(engine, "e2e profiling (train split)"), collected)


# ---------------------------------------------------------------------------- section 1


def _run_engine(engine, prompts, new_tokens, system=None, teacher=None) -> dict:
    """Warm up on the first prompt, then time every prompt one by one (the cache persists).
    teacher: per prompt, the reference's tokens, fed back instead of the engine's own picks
    (teacher forcing) so that logits are compared on the same prefix."""
    def gen(i, task, text, ids):
        forced = None if teacher is None else [teacher[i][: new_tokens - 1]]
        if system is not None:
            system.prepare([(task, len(ids))])
            return system.generate([ids], new_tokens, stop_at_eos=False, return_logits=True, teacher_tokens=forced)
        return engine.generate([ids], new_tokens, stop_at_eos=False, return_logits=True,
                               tasks=[task], texts=[text], teacher_tokens=forced)

    # Warm-up: one untimed pass over every prompt compiles each prefill bucket and decode cache
    # length of this engine (shapes differ per prompt length and per slot count).
    for i, prompt in enumerate(prompts):
        gen(i, *prompt)
    totals = dict(decode_tokens=0, decode_s=0.0, stall_s=0.0, hits=0, misses=0, h2d_bytes=0, compiles=0)
    prefetch: dict = {}
    tokens, logits = [], []
    for i, (task, text, ids) in enumerate(prompts):
        out = gen(i, task, text, ids)
        s = out.stats
        totals["decode_tokens"] += s["decode_tokens"]
        totals["decode_s"] += s["decode_s"]
        totals["stall_s"] += s["stall_s"]
        totals["hits"] += s["device"]["hits"]
        totals["misses"] += s["device"]["misses"]
        totals["h2d_bytes"] += s["h2d_bytes"]
        totals["compiles"] += s["compiles"] or 0
        for k, v in (s.get("prefetch") or {}).items():
            prefetch[k] = prefetch.get(k, 0) + v
        tokens.append(out.tokens[0])
        logits.append(out.logits[0])
    n = max(totals["decode_tokens"], 1)
    return {
        "decode_tokens_per_s": totals["decode_tokens"] / totals["decode_s"] if totals["decode_s"] else 0.0,
        "stall_ms_per_token": 1e3 * totals["stall_s"] / n,
        "device_hit_rate": totals["hits"] / max(totals["hits"] + totals["misses"], 1),
        "h2d_mib_per_token": totals["h2d_bytes"] / n / 2**20,
        "device_expert_bytes": engine.device_cache.device_bytes,
        "compiles_after_warmup": totals["compiles"],
        "prefetch": prefetch or None,
        "_tokens": tokens, "_logits": logits,
    }


def _fused_rate(model_dir, prompts, new_tokens, dtype) -> tuple[float, int]:
    """Median decode tokens/s of the fused all-resident step (one jit per token, no host sync)."""
    from ..model.resident import ResidentModel
    from .runtime import fused_decode_rate

    rm = ResidentModel.from_checkpoint(model_dir, dtype)
    fused_decode_rate(rm, [prompts[0][2]], new_tokens)  # compile
    rates = [fused_decode_rate(rm, [ids], new_tokens) for _, _, ids in prompts]
    return float(np.median(rates)), sum(int(a.nbytes) for layer in rm.experts for a in layer)


def embedded_section(args, configs, progress) -> dict:
    import jax.numpy as jnp

    from ..checkpoint import load_checkpoint
    from ..emoe.sensitivity import output_similarity
    from ..emoe.system import EMoESystem
    from ..predict.emoe import EMoEPredictor
    from ..runtime.engine import OffloadedEngine
    from ..runtime.predictors import runtime_predictor

    model_dir = Path(args.model)
    ckpt = load_checkpoint(model_dir)
    cfg, tokenizer = ckpt.config, ckpt.tokenizer
    prompts = _prompts(args, tokenizer)
    # float32 by default: bf16 rounding differs between the offloaded waves and one pass, which
    # would blur the similarity figures (exact mode is exact up to summation order).
    dtype = jnp.dtype(args.dtype)

    def engine_factory(fraction, predictor, **kw):
        return OffloadedEngine.from_checkpoint(model_dir, device_experts=fraction, predictor=predictor,
                                               link_gbps=args.link_gbps, dtype=dtype, **kw)

    needs_traces = {"emoe-prefetch", "emoe-restricted", "recency-reuse"} & set(configs)
    traces = _train_traces(args, engine_factory, tokenizer) if needs_traces else None
    # eMoE's system only reads its fitted predictor (profiles, eMoE-A), so one fit serves every fraction.
    emoe_fitted = None
    if traces is not None:
        emoe_fitted = EMoEPredictor(task_source="trace", seed=0)
        emoe_fitted.fit(traces)
    full = engine_factory(1.0, None)
    reference = _run_engine(full, prompts, args.new_tokens)  # the full model's outputs, for similarity
    rows = []
    fused_rate, all_bytes = (_fused_rate(model_dir, prompts, args.new_tokens, dtype) if "fused" in configs
                             else (None, None))
    if fused_rate is not None:
        rows.append({"config": "fused", "fraction": 1.0, "decode_tokens_per_s": fused_rate,
                     "device_expert_bytes": all_bytes, "stall_ms_per_token": 0.0, "device_hit_rate": 1.0})
    for fraction in args.fractions:
        for name in configs:
            if name == "fused":
                continue
            progress(f"embedded {name} @ {fraction:g}")
            system = None
            if name == "on-demand":
                engine = engine_factory(fraction, None, reuse=False)
            elif name == "lru":
                engine = engine_factory(fraction, None)
            elif name == "emoe-restricted":
                engine = engine_factory(fraction, None, mode="restricted")
                system = EMoESystem(engine, emoe_fitted, extractor=None, period=40)
            elif name == "emoe-prefetch":  # eMoE's task profiles drive prefetching in exact mode
                engine = engine_factory(fraction, _fitted_profiles(traces))
            elif name == "recency-reuse":  # learned eviction only (no prefetch), in-graph on the one-jit path
                engine = engine_factory(fraction, runtime_predictor(name, cfg, model_dir, train_traces=traces),
                                        policy="score", eviction_scores="reuse")
            else:
                base, _, ranking = name.partition("+")
                try:
                    predictor = runtime_predictor(base, cfg, model_dir)
                except Exception as e:  # noqa: BLE001 - e.g. no learned checkpoint of this shape: skip the row, say why
                    rows.append({"config": name, "fraction": fraction, "skipped": str(e)})
                    continue
                kw = {} if not ranking else {"policy": "score", "admission": "cost" if ranking == "cost" else "all"}
                engine = engine_factory(fraction, predictor, **kw)
            row = _run_engine(engine, prompts, args.new_tokens, system, teacher=reference["_tokens"])
            sim = output_similarity(reference["_tokens"], np.stack(reference["_logits"]),
                                    row.pop("_tokens"), np.stack(row.pop("_logits")))
            row.update(config=name, fraction=fraction, token_agreement=float(sim["agreement"].mean()),
                       kl=float(sim["kl"].mean()))
            if fused_rate:
                row["ratio_vs_fused"] = row["decode_tokens_per_s"] / fused_rate
            rows.append(row)
    _ratios(rows)
    return {"model": str(model_dir), "layers": cfg.num_moe_layers, "experts": cfg.num_experts, "top_k": cfg.top_k,
            "expert_bytes": full.device_cache.slot_bytes, "prompts": len(prompts), "new_tokens": args.new_tokens,
            "prompt_tokens": args.prompt_tokens, "rows": rows,
            "reference_decode_tokens_per_s": reference["decode_tokens_per_s"], "_prompts": prompts,
            "_reference": reference, "_traces": traces, "_emoe": emoe_fitted, "_engine_factory": engine_factory}


def _fitted_profiles(traces):
    from ..predict.emoe import EMoEPredictor

    predictor = EMoEPredictor(task_source="trace", sequence_model=False)
    predictor.fit(traces)
    return predictor


def _ratios(rows: list[dict]) -> None:
    """Each row's decode rate relative to on-demand at the same fraction."""
    base = {r["fraction"]: r["decode_tokens_per_s"] for r in rows if r.get("config") == "on-demand"}
    for r in rows:
        if r.get("fraction") in base and "decode_tokens_per_s" in r and base[r["fraction"]]:
            r["ratio_vs_on_demand"] = r["decode_tokens_per_s"] / base[r["fraction"]]


# ---------------------------------------------------------------------------- section 2


def replay_section(args, configs, progress) -> dict:
    from .replay import forced_replay_model, run_forced_replay
    from ..runtime.predictors import runtime_predictor
    from ..sim import split_by_prompt_id
    from ..traces import TraceSet

    path = Path(args.replay_traces)
    if not path.exists():
        raise E2EError(f"--replay-traces {path} does not exist; import the shared DeepSeek-V2-Lite traces with "
                       "python -m emoe_jax.traces import-moe-beyond ... (docs/traces.md), or pass --no-replay")
    train, val = split_by_prompt_id(TraceSet.load(path), 0.2)
    progress(f"building the replay model (scale {args.replay_scale:g})")
    model = forced_replay_model(scale=args.replay_scale)
    rows = []
    for fraction in args.replay_fractions:
        for name in configs:
            progress(f"replay {name} @ {fraction:g}")
            kwargs: dict = dict(device_experts=fraction, link_gbps=args.link_gbps)
            if name == "on-demand":
                kwargs["reuse"] = False
            elif name == "all-resident":
                kwargs["device_experts"] = 1.0
            elif name != "lru":
                try:
                    kwargs["predictor"] = runtime_predictor(name, model.cfg, None, None)
                except Exception as e:  # noqa: BLE001 - fitted predictors get the training split below
                    if name != "static-freq":
                        rows.append({"config": name, "fraction": fraction, "skipped": str(e)})
                        continue
                    from ..predict import get_predictor

                    kwargs["predictor"] = get_predictor("static-freq")
                    kwargs["predictor"].fit(train)
            engine = model.engine(**kwargs)
            r = run_forced_replay(None, val, args.replay_prompts, engine=engine, prompt_tokens=16,
                                  decode_tokens=16 if args.quick else 32)
            rows.append({"config": name, "fraction": 1.0 if name == "all-resident" else fraction,
                         "decode_tokens_per_s": r["decode_tokens_per_s"],
                         "stall_ms_per_token": r.get("stall_ms_per_decode_token", 1e3 * r.get("stall_s", 0.0)
                                                     / max(r["decode_tokens"], 1)),
                         "device_hit_rate": r["device_hit_rate"],
                         "device_expert_bytes": engine.device_cache.device_bytes,
                         "compiles_after_warmup": r.get("decode_compiles")})
    base = {r["fraction"]: r["decode_tokens_per_s"] for r in rows if r["config"] == "on-demand"}
    resident = [r["decode_tokens_per_s"] for r in rows if r["config"] == "all-resident"]
    for r in rows:
        if "decode_tokens_per_s" not in r:
            continue
        if base.get(r["fraction"]):
            r["ratio_vs_on_demand"] = r["decode_tokens_per_s"] / base[r["fraction"]]
        if resident:
            r["ratio_vs_all_resident"] = r["decode_tokens_per_s"] / resident[0]
    cfg = model.cfg
    return {"shape": "deepseek-v2-lite", "scale": args.replay_scale, "layers": cfg.num_moe_layers,
            "experts": cfg.num_experts, "top_k": cfg.top_k, "hidden": cfg.hidden_size,
            "expert_bytes": model.source.expert_bytes, "build_s": model.build_s, "traces": str(path),
            "validation_prompts": args.replay_prompts, "rows": rows}


# ---------------------------------------------------------------------------- section 3


def claims_section(args, emb: dict, progress) -> dict:
    """Restricted-mode similarity vs fraction, memory saved at >= 0.95 agreement, and what the
    saved memory buys under the all-resident model's device budget."""
    from ..emoe.sensitivity import output_similarity
    from ..emoe.system import EMoESystem
    from ..model.decoder import init_kv_caches

    factory, prompts, reference = emb["_engine_factory"], emb["_prompts"], emb["_reference"]
    sweep = []
    for fraction in args.similarity_fractions:
        progress(f"restricted similarity @ {fraction:g}")
        engine = factory(fraction, None, mode="restricted")
        row = _run_engine(engine, prompts, args.new_tokens, EMoESystem(engine, emb["_emoe"], period=40),
                          teacher=reference["_tokens"])
        sim = output_similarity(reference["_tokens"], np.stack(reference["_logits"]), row["_tokens"],
                                np.stack(row["_logits"]))
        sweep.append({"fraction": fraction, "token_agreement": float(sim["agreement"].mean()),
                      "kl": float(sim["kl"].mean()), "cosine": float(sim["cosine"].mean()),
                      "decode_tokens_per_s": row["decode_tokens_per_s"],
                      "device_expert_bytes": row["device_expert_bytes"]})
    ok = [r for r in sweep if r["token_agreement"] >= 0.95]

    full = factory(1.0, None)
    cfg = full.cfg
    mem = full.memory_report()
    dense, experts_all = mem["dense_param_bytes"], full.device_cache.device_bytes
    probe = 64
    kv = init_kv_caches(cfg, 1, probe, full.dtype)
    kv_per_token = sum(int(a.nbytes) for a in __import__("jax").tree.leaves(kv)) / probe
    ctx = cfg.max_position_embeddings
    budget = dense + experts_all + kv_per_token * ctx  # all-resident, one sequence at full context

    def budget_use(fraction: float, slots: int) -> dict:
        """What the all-resident budget holds when only `slots` bytes of experts are on the device."""
        free_for_kv = budget - dense - slots
        return {"fraction": fraction, "device_budget_bytes": budget,
                "longest_sequence_tokens": int(free_for_kv // kv_per_token), "all_resident_tokens": ctx,
                "longest_ratio": (free_for_kv // kv_per_token) / ctx,
                "largest_batch_at_context": int(free_for_kv // (kv_per_token * ctx)), "all_resident_batch": 1,
                "expert_memory_saved": 1 - slots / experts_all,
                "device_memory_saved": (experts_all - slots) / (dense + experts_all)}

    fit = budget_use(min(ok, key=lambda r: r["fraction"])["fraction"],
                     min(ok, key=lambda r: r["fraction"])["device_expert_bytes"]) if ok else None
    # Exact mode keeps the output at any fraction (only speed changes): the same arithmetic for it.
    exact = [budget_use(f, int(round(f * cfg.num_experts)) * full.device_cache.slot_bytes * cfg.num_moe_layers)
             for f in args.fractions]
    return {"sweep": sweep, "threshold": 0.95, "at_threshold": fit, "exact_mode": exact, "dense_param_bytes": dense,
            "all_expert_bytes": experts_all, "kv_bytes_per_token": kv_per_token, "context": ctx}


# ---------------------------------------------------------------------------- report


def _ratio(x) -> str:
    return "" if x is None else f"{x:.2f}"


def _mib(b) -> str:
    return f"{b / 2**20:.2f}" if b is not None else ""


def _table(rows: list[dict], baseline: str) -> list[str]:
    lines = ["| config | fraction | decode tok/s | vs on-demand | vs " + baseline + " | stall ms/token | "
             "device hit rate | device expert MiB | token agreement |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['config']} | {r['fraction']:g} | skipped: {r['skipped'][:90]} | | | | | | |")
            continue
        vs = r.get("ratio_vs_fused", r.get("ratio_vs_all_resident"))
        agree = f"{100 * r['token_agreement']:.1f}%" if "token_agreement" in r else ""
        lines.append(
            f"| {r['config']} | {r['fraction']:g} | {r['decode_tokens_per_s']:.1f} | "
            f"{_ratio(r.get('ratio_vs_on_demand'))} | {_ratio(vs)} | "
            f"{r.get('stall_ms_per_token', 0.0):.2f} | {100 * r.get('device_hit_rate', 1.0):.1f}% | "
            f"{_mib(r.get('device_expert_bytes'))} | {agree} |")
    return lines


def markdown(report: dict) -> str:
    out = [f"# End-to-end benchmark ({report['platform']})", "",
           f"Measured {report['date']} on {report['machine']}; link: {report['link']}. Decode tok/s counts "
           "decode steps only (prefill excluded), batch 1, after a warm-up that compiles every stage. Token "
           "agreement: the share of steps whose next-token pick equals the full model's when both are fed the "
           "full model's tokens (teacher forcing), float32; KL is KL(full || config) of next-token distributions "
           "on the same prefixes.", ""]
    emb = report.get("embedded")
    if emb:
        out += [f"## Embedded model ({emb['layers']} MoE layers x {emb['experts']} experts, top-{emb['top_k']}, "
                f"{_mib(emb['expert_bytes'])} MiB/expert; {emb['prompts']} prompts, {emb['prompt_tokens']}-token cap, "
                f"{emb['new_tokens']} new tokens each, batch 1)", ""] + _table(emb["rows"], "fused") + [""]
    rep = report.get("replay")
    if rep:
        out += [f"## Forced-routing replay (DeepSeek-V2-Lite shape at width scale {rep['scale']:g}: {rep['layers']} "
                f"MoE layers x {rep['experts']} experts, top-{rep['top_k']}, {_mib(rep['expert_bytes'])} MiB/expert; "
                f"routing of {rep['validation_prompts']} validation prompts of the real traces)", ""]
        out += _table(rep["rows"], "all-resident") + [""]
    cl = report.get("claims")
    if cl:
        out += ["## eMoE's claims in form (embedded model, restricted mode)", "",
                "| fraction | token agreement | KL | decode tok/s | device expert MiB |", "|---|---|---|---|---|"]
        for r in cl["sweep"]:
            out.append(f"| {r['fraction']:g} | {100 * r['token_agreement']:.1f}% | {r['kl']:.4f} | "
                       f"{r['decode_tokens_per_s']:.1f} | {_mib(r['device_expert_bytes'])} |")
        fit = cl["at_threshold"]
        out.append("")
        if fit:
            out.append(f"Smallest fraction with >= 95% token agreement: {fit['fraction']:g}: expert memory saved "
                       f"{100 * fit['expert_memory_saved']:.0f}%, device memory (params + experts) saved "
                       f"{100 * fit['device_memory_saved']:.0f}%. Within the all-resident budget "
                       f"({_mib(fit['device_budget_bytes'])} MiB: params + experts + KV of one "
                       f"{fit['all_resident_tokens']}-token sequence) the freed memory holds "
                       f"{fit['longest_sequence_tokens']} tokens of KV cache ({fit['longest_ratio']:.1f}x), or a batch "
                       f"of {fit['largest_batch_at_context']} full-context sequences (vs 1). Computed from measured "
                       "byte counts, not by running out of memory.")
        else:
            below = [r for r in cl["sweep"] if r["fraction"] < 1]
            top = max(below, key=lambda r: r["token_agreement"]) if below else None
            out.append("No fraction of the sweep below 1 reached 95% token agreement"
                       + (f" (best: {100 * top['token_agreement']:.1f}% at {top['fraction']:g})." if top else "."))
        if cl.get("exact_mode"):
            out += ["", "Exact mode (output unchanged) inside the same all-resident budget; computed from measured "
                    "byte counts (parameters, slots, KV cache per token):", "",
                    "| fraction | expert memory saved | device memory saved | longest sequence (tokens) | "
                    "vs all-resident | full-context batch |", "|---|---|---|---|---|---|"]
            for f in cl["exact_mode"]:
                out.append(f"| {f['fraction']:g} | {100 * f['expert_memory_saved']:.0f}% | "
                           f"{100 * f['device_memory_saved']:.0f}% | {f['longest_sequence_tokens']} | "
                           f"{f['longest_ratio']:.1f}x | {f['largest_batch_at_context']} (vs 1) |")
    return "\n".join(out) + "\n"


def plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def save(fig, ax, fname: str, xlabel: str, ylabel: str) -> None:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        made.append(fname)

    emb = report.get("embedded")
    if emb:
        rows = [r for r in emb["rows"] if "skipped" not in r]
        for key, label, fname in (("decode_tokens_per_s", "decode tokens/s", "e2e_tokps.png"),
                                  ("stall_ms_per_token", "stall ms per token", "e2e_stall.png")):
            fig, ax = plt.subplots(figsize=(6, 4))
            for name in dict.fromkeys(r["config"] for r in rows):
                pts = sorted((r["fraction"], r[key]) for r in rows if r["config"] == name and key in r)
                if name == "fused":
                    ax.axhline(pts[0][1], ls="--", color="k", label="fused all-resident")
                else:
                    ax.plot(*zip(*pts), marker="o", label=name)
            ax.set_title(f"embedded model, {report['platform']}")
            save(fig, ax, fname, "device-expert fraction", label)
        fig, ax = plt.subplots(figsize=(6, 4))
        lru = sorted((r["fraction"], r["device_expert_bytes"] / 2**20) for r in rows if r["config"] == "lru")
        if lru:
            ax.plot(*zip(*lru), marker="o", label="device expert memory (any offloaded config)")
        save(fig, ax, "e2e_memory.png", "device-expert fraction", "MiB")
    cl = report.get("claims")
    if cl:
        fig, ax = plt.subplots(figsize=(6, 4))
        pts = [(r["fraction"], r["token_agreement"]) for r in cl["sweep"]]
        ax.plot(*zip(*pts), marker="o", label="token agreement vs full model")
        ax.axhline(0.95, ls="--", color="gray")
        save(fig, ax, "e2e_similarity.png", "device-expert fraction (restricted mode)", "token agreement")
    return made


def _public(obj):
    """Drop private (underscored) entries before writing JSON."""
    if isinstance(obj, dict):
        return {k: _public(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list):
        return [_public(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.per_task, args.new_tokens = 1, min(args.new_tokens, 16)
        args.fractions = [0.25]
        args.similarity_fractions = [0.25, 0.5, 0.75]
        args.replay_prompts = min(args.replay_prompts, 2)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    replay_configs = [c.strip() for c in args.replay_configs.split(",") if c.strip()]
    unknown += [c for c in replay_configs if c not in REPLAY_CONFIGS]
    if unknown:
        return fail(f"unknown config(s) {unknown}; choose from {CONFIGS} / replay {REPLAY_CONFIGS}")
    if args.link_gbps is not None and args.link_gbps <= 0:
        return fail("--link-gbps must be positive")
    import jax


    def progress(msg: str) -> None:
        print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    dev = jax.devices()[0]
    report: dict = {"platform": f"{dev.platform}:{getattr(dev, 'device_kind', '')}".rstrip(":"),
                    "machine": f"{platform.node()} ({os.cpu_count()} cores)", "date": time.strftime("%Y-%m-%d"),
                    "jax": jax.__version__,
                    "link": f"emulated {args.link_gbps:g} GB/s" if args.link_gbps else "the machine's own copy"}
    try:
        if args.embedded:
            emb = embedded_section(args, configs, progress)
            report["embedded"] = emb
            if emb["_traces"] is not None and args.similarity_fractions:
                report["claims"] = claims_section(args, emb, progress)
        if args.replay:
            report["replay"] = replay_section(args, replay_configs, progress)
    except USER_ERRORS as e:
        return fail(e)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    public = _public(report)
    write_json_atomic(out / "e2e.json", public)
    md = markdown(public)
    tmp = out / "e2e.md.tmp"
    tmp.write_text(md)
    tmp.replace(out / "e2e.md")
    plots(public, out)
    print(json.dumps(public, indent=1) if args.json else md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
