"""Sensitivity profile s(task, layer) of eMoE (arXiv 2503.06823), measured offline.

eMoE skips expert prediction for layers where a task is insensitive to routing.
We measure that sensitivity directly:
  1. run the full model (exact mode) greedily on a few prompts of each task,
     keeping the generated tokens and per-step logits (reference);
  2. for each MoE layer l, run again with only layer l's routing randomised:
     every token gets k distinct experts drawn uniformly (seeded), carrying the
     router's own top-k weights (``random_routing``, an engine routing override);
  3. compare with the reference per task: token agreement A (fraction of
     generated positions with the same token), mean KL(ref || randomised) of
     the next-token distributions, and their mean cosine similarity;
  4. similarity = (A + exp(-KL)) / 2 and s = 1 - similarity, clipped to [0, 1]
     and rounded to 4 decimals (so float noise of an irrelevant layer is 0).
The profile file is the JSON object ``{task: [s per MoE layer]}`` that
``emoe_jax.predict.emoe.load_sensitivity`` reads; the per-metric figures go to
a sidecar ``<name>.details.json``. Both are written atomically.

CLI: ``python -m emoe_jax.emoe.sensitivity --out checkpoints/predictors/emoe-sensitivity.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from emoe_jax.cli import USER_ERRORS, fail
from emoe_jax.atomic_io import write_json_atomic
from emoe_jax.errors import EmoeError

DECIMALS = 4


class SensitivityError(EmoeError):
    """Bad profiling input (no prompts, bad layer, too long prompts)."""


def random_routing(layer: int, num_experts: int, seed: int):
    """Routing override: layer ``layer`` gets k distinct uniformly random experts per token, with the
    router's weights (rank order kept); other layers keep the router's choice."""
    rng = np.random.default_rng(seed)

    def override(step):
        if step.moe_layer != layer:
            return None
        b, t, k = step.ids.shape
        ids = np.argsort(rng.random((b, t, num_experts)), axis=-1)[..., :k]  # [B, T, k] distinct
        return ids.astype(np.int32), step.weights

    return override


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def output_similarity(ref_tokens: Sequence[Sequence[int]], ref_logits: np.ndarray,
                      tokens: Sequence[Sequence[int]], logits: np.ndarray) -> dict[str, np.ndarray]:
    """Per prompt: token agreement, mean KL(ref || other) and mean cosine of next-token distributions.

    logits [B, steps, V] of both runs (same prompts, same number of steps)."""
    if ref_logits.shape != logits.shape:
        raise SensitivityError(f"logit shapes differ: {ref_logits.shape} vs {logits.shape}")
    agree = np.array([np.mean([a == b for a, b in zip(r, o)]) if len(r) else 1.0
                      for r, o in zip(ref_tokens, tokens)])  # fmt: skip
    lp, lq = _log_softmax(ref_logits), _log_softmax(logits)  # [B, steps, V]
    p, q = np.exp(lp), np.exp(lq)
    kl = np.maximum((p * (lp - lq)).sum(-1), 0.0).mean(-1)  # [B]
    cos = ((p * q).sum(-1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(q, axis=-1))).mean(-1)  # [B]
    return {"agreement": agree, "kl": kl, "cosine": cos}


def sensitivity_from(agreement: float, kl: float) -> float:
    """s = 1 - (A + exp(-KL)) / 2, clipped to [0, 1] and rounded to DECIMALS."""
    similarity = 0.5 * (agreement + float(np.exp(-kl)))
    return round(float(np.clip(1.0 - similarity, 0.0, 1.0)), DECIMALS)


def profile_sensitivity(engine, prompts: Mapping[str, Sequence[Sequence[int]]], max_new_tokens: int = 16,
                        seed: int = 0, layers: Sequence[int] | None = None, progress: bool = False) -> dict:
    """Measure s(task, layer) on ``engine`` (run in exact mode; any device budget gives the same outputs).

    prompts: {task: [token ids, ...]}. Returns {"sensitivity": {task: [s per MoE layer]},
    "details": {task: {"agreement", "kl", "cosine": [per layer]}}, ...}.
    """
    from tqdm.auto import tqdm

    if engine.mode != "exact":
        raise SensitivityError("profile on an exact-mode engine: the reference must be the full model")
    if not prompts or any(len(v) == 0 for v in prompts.values()):
        raise SensitivityError("give at least one prompt for every task")
    if max_new_tokens < 1:
        raise SensitivityError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    num_layers = engine.cfg.num_moe_layers
    layers = list(range(num_layers)) if layers is None else [int(x) for x in layers]
    if any(not 0 <= x < num_layers for x in layers):
        raise SensitivityError(f"layers must be in [0, {num_layers}), got {layers}")
    tasks = list(prompts)
    rows = [(task, list(ids)) for task in tasks for ids in prompts[task]]
    batch = [ids for _, ids in rows]
    owner = np.array([tasks.index(t) for t, _ in rows])  # [B] task index of each row

    def run(override):
        return engine.generate(batch, max_new_tokens, stop_at_eos=False, return_logits=True,
                               routing_override=override)

    t0 = time.perf_counter()
    ref = run(None)
    details = {t: {"agreement": [None] * num_layers, "kl": [None] * num_layers, "cosine": [None] * num_layers}
               for t in tasks}  # fmt: skip
    sens = {t: [None] * num_layers for t in tasks}
    for layer in tqdm(layers, desc="sensitivity", unit="layer", disable=not progress):
        out = run(random_routing(layer, engine.cfg.num_experts, seed + 1000 * layer))
        sim = output_similarity(ref.tokens, ref.logits, out.tokens, out.logits)
        for ti, task in enumerate(tasks):
            sel = owner == ti
            a, kl, cos = (float(sim[m][sel].mean()) for m in ("agreement", "kl", "cosine"))
            details[task]["agreement"][layer] = round(a, 6)
            details[task]["kl"][layer] = round(kl, 6)
            details[task]["cosine"][layer] = round(cos, 6)
            sens[task][layer] = sensitivity_from(a, kl)
    # Layers not profiled keep s = 1 (eMoE's default: predict for them).
    sens = {t: [1.0 if v is None else v for v in vals] for t, vals in sens.items()}
    return {"sensitivity": sens, "details": details, "layers": layers, "prompts_per_task":
            {t: len(prompts[t]) for t in tasks}, "max_new_tokens": max_new_tokens, "seed": seed,
            "seconds": round(time.perf_counter() - t0, 2)}  # fmt: skip


def details_path(profile_path: str | os.PathLike) -> Path:
    p = Path(profile_path)
    return p.with_name(p.stem + ".details.json")


def write_profile(path: str | os.PathLike, report: dict) -> tuple[Path, Path]:
    """The loadable profile {task: [s]} at ``path`` and everything else next to it."""
    main_path = write_json_atomic(path, report["sensitivity"])
    side = write_json_atomic(details_path(path), {k: v for k, v in report.items() if k != "sensitivity"})
    return main_path, side


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m emoe_jax.emoe.sensitivity",
        description="Measure eMoE's sensitivity profile s(task, layer): randomise one MoE layer's routing at a "
        "time (random distinct top-k experts, the router's weights) on a few corpus prompts per task, and "
        "compare the output with the full model's (token agreement, KL, cosine). s = 1 - (agreement + "
        "exp(-KL)) / 2. Writes {task: [s per layer]} (what the eMoE system and predictor load) and a "
        "<name>.details.json sidecar, both atomically.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="checkpoints/embedded", help="converted checkpoint directory")
    p.add_argument("--corpus", default="out/corpus", help="task-labelled corpus (python -m emoe_jax.data build)")
    p.add_argument("--split", default="validation", help="corpus split to draw prompts from")
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: all in the corpus)")
    p.add_argument("--prompts-per-task", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=48, help="prompts are cut to this many tokens")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens generated per prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the random routing and the prompt choice")
    p.add_argument("--out", required=True, help="profile JSON to write, e.g. checkpoints/predictors/emoe-sensitivity.json")
    p.add_argument("--json", action="store_true", help="print the whole report as one JSON object")
    args = p.parse_args(argv)
    try:
        if args.prompts_per_task < 1 or args.prompt_tokens < 1:
            raise SensitivityError("--prompts-per-task and --prompt-tokens must be >= 1")
        from emoe_jax.runtime.engine import OffloadedEngine

        from .prompts import corpus_texts, encode_cut

        tasks = args.tasks.split(",") if args.tasks else None
        texts = corpus_texts(args.corpus, args.split, args.prompts_per_task, tasks, args.seed)
        engine = OffloadedEngine.from_checkpoint(args.model, device_experts=1.0)
        tok = engine.checkpoint.tokenizer
        prompts = {t: [encode_cut(tok, x, args.prompt_tokens) for x in xs] for t, xs in texts.items()}
        report = profile_sensitivity(engine, prompts, args.new_tokens, args.seed, progress=not args.json)
        report["model"] = str(args.model)
        main_path, side = write_profile(args.out, report)
    except USER_ERRORS as exc:
        return fail(exc)
    report["out"], report["details_file"] = str(main_path), str(side)
    if args.json:
        print(json.dumps(report))
    else:
        layers = len(next(iter(report["sensitivity"].values())))
        print(f"s(task, layer), {layers} MoE layers ({report['seconds']} s); profile {main_path}, details {side}")
        for task, vals in report["sensitivity"].items():
            print(f"  {task:10s} " + " ".join(f"{v:.3f}" for v in vals))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
