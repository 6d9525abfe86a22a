"""python -m emoe_jax.predict.learned: train or evaluate the learned expert predictor.

Examples:
  python -m emoe_jax.predict.learned train --traces out/puffin_traces \
      --out checkpoints/predictors/learned-dsv2lite --steps 2000 --time-limit 1100
  python -m emoe_jax.predict.learned train --traces out/embedded_traces \
      --out checkpoints/predictors/learned-embedded --steps 1200 --token-buckets 4096
  python -m emoe_jax.predict.learned evaluate --traces out/puffin_traces --json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from emoe_jax.cli import USER_ERRORS, fail, run_subcommand


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m emoe_jax.predict.learned",
        description=(
            "Train (optax, masked multi-label BCE) or evaluate the learned, strictly causal expert-activation "
            "predictor. The trace set is split by prompt id: the lowest ids train, the last --val-fraction "
            "validate (contiguous, so conversations stay together). See docs/predictors.md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a checkpoint", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--traces", type=Path, required=True, help="trace-set directory (python -m emoe_jax.traces)")
    t.add_argument("--out", type=Path, required=True, help="checkpoint directory to write (atomically replaced)")
    t.add_argument("--val-fraction", type=float, default=0.2, help="last fraction of prompt ids held out")
    t.add_argument("--horizon", type=int, default=4, help="predict steps s..s+horizon (token-major)")
    t.add_argument("--d-model", type=int, default=128)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--context-layers", type=int, default=2)
    t.add_argument("--step-blocks", type=int, default=2)
    t.add_argument("--mlp-hidden", type=int, default=256)
    t.add_argument("--token-buckets", type=int, default=2048, help="token ids are hashed mod this")
    t.add_argument("--window", type=int, default=256, help="attention window in tokens")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=8, help="packed rows per step")
    t.add_argument("--row-len", type=int, default=256, help="tokens per packed row")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--time-limit", type=float, default=None, help="stop training after this many seconds")
    t.add_argument("--max-val-prompts", type=int, default=None, help="evaluate on the first N validation prompts")
    t.add_argument("--no-router-inputs", action="store_true",
                   help="ignore the traces' router inputs: a checkpoint that needs only token ids and routing "
                   "(runs where no router inputs are fed)")  # fmt: skip
    t.add_argument("--table-prior", action="store_true",
                   help="learn a residual over the causal-table baseline: its tables are fitted on the training "
                   "prompts only and stored with the checkpoint (table_prior.npz)")
    t.add_argument("--prior-token-rows", type=int, default=2048,
                   help="with --table-prior: keep the token table's N most frequent training ids")
    t.add_argument("--save-every", type=int, default=0,
                   help="also write the checkpoint (no validation) every N steps, for long runs")
    t.add_argument("--init-from", type=Path, default=None,
                   help="continue training this checkpoint (its architecture replaces the shape options)")
    e = sub.add_parser("evaluate", help="validation recall@k of a checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    e.add_argument("--traces", type=Path, required=True)
    e.add_argument("--checkpoint", type=Path, default=None,
                   help="default: the checkpoint in checkpoints/predictors trained for the traces' L, E and top-k")
    e.add_argument("--val-fraction", type=float, default=0.2)
    e.add_argument("--k", type=int, default=None, help="recall@k cut-off (default: top-k)")
    e.add_argument("--max-val-prompts", type=int, default=None)
    t.set_defaults(run=_train)
    e.set_defaults(run=_evaluate)
    for sp in (t, e):
        sp.add_argument("--json", action="store_true", help="print one JSON object")
        sp.add_argument("--no-progress", action="store_true")
    return p


def _load_split(args: argparse.Namespace):
    """(traces, train, validation, split summary) by prompt id, as both commands use them."""
    from emoe_jax.traces import TraceSet, split_by_prompt_id

    traces = TraceSet.load(args.traces)
    train, val = split_by_prompt_id(traces, args.val_fraction)
    if args.max_val_prompts is not None:
        val = val.select(slice(0, args.max_val_prompts))
    split = {"train_prompt_ids": [int(train.prompt_ids.min()), int(train.prompt_ids.max())],
             "val_prompt_ids": [int(val.prompt_ids.min()), int(val.prompt_ids.max())],
             "train_prompts": len(train), "val_prompts": len(val), "val_fraction": args.val_fraction}  # fmt: skip
    return traces, train, val, split


def _train(args: argparse.Namespace) -> dict:
    from emoe_jax.predict.learned import checkpoint as ckpt
    from emoe_jax.predict.learned.config import LearnedConfig
    from emoe_jax.predict.learned.evaluate import recall_at_k
    from emoe_jax.predict.learned.predictor import LearnedPredictor
    from emoe_jax.predict.learned.train import TrainSettings, train_model

    progress = not args.no_progress
    traces, train, val, split = _load_split(args)
    m = traces.meta
    cfg = LearnedConfig(num_layers=m.num_layers, num_experts=m.num_experts, top_k=m.top_k,
                        horizon=args.horizon, d_model=args.d_model, num_heads=args.heads,
                        context_layers=args.context_layers, step_blocks=args.step_blocks,
                        mlp_hidden=args.mlp_hidden, token_buckets=args.token_buckets,
                        window=args.window,
                        hidden_size=None if args.no_router_inputs else m.hidden_size)  # fmt: skip
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, row_len=args.row_len,
                             lr=args.lr, seed=args.seed, time_limit_s=args.time_limit,
                             save_every=args.save_every)  # fmt: skip
    init, init_info = (None, {}) if args.init_from is None else ckpt.load(args.init_from)
    prior = None
    if init is not None:
        cfg = init.cfg
    elif args.table_prior:
        from emoe_jax.predict.learned.prior import fit_table_prior

        prior = fit_table_prior(train, args.horizon, max_token_rows=args.prior_token_rows)  # training prompts only
        cfg = cfg.with_(table_prior=True, prior_token_rows=len(prior.token_ids))

    def save_partial(model, done, history):
        ckpt.save(args.out, model, {"traces": str(args.traces), "model": m.model, "split": split,
                                    "steps": done, "partial": True, "settings": asdict(settings),
                                    "history": history})  # fmt: skip

    result = train_model(train, cfg, settings, progress=progress, init=init, prior=prior,
                         save_fn=save_partial)  # fmt: skip
    info = {"traces": str(args.traces), "model": m.model, "split": split, "train_seconds": result.seconds,
            "steps": result.steps_done, "stopped_early": result.stopped_early,
            "train_rows": result.train_rows, "train_tokens": result.train_tokens,
            "params": result.params, "settings": asdict(settings),
            "continued_from": None if init is None else {"checkpoint": str(args.init_from),
                                                         "steps": init_info.get("steps"),
                                                         "train_seconds": init_info.get("train_seconds")},
            "history": result.history}  # fmt: skip
    path = ckpt.save(args.out, result.model, info)
    predictor = LearnedPredictor(lookahead=0, checkpoint=path)  # evaluate the saved (fp16) weights
    metrics = recall_at_k(predictor, val, None, progress=progress)
    info["validation"] = metrics
    info["checkpoint_bytes"] = ckpt.checkpoint_bytes(path)
    ckpt.update_info(path, info)
    out = {k: v for k, v in info.items() if k != "history"} | {"checkpoint": str(path)}
    return out


def _evaluate(args: argparse.Namespace) -> dict:
    from emoe_jax.predict.learned import checkpoint as ckpt
    from emoe_jax.predict.learned.evaluate import recall_at_k
    from emoe_jax.predict.learned.predictor import LearnedPredictor

    progress = not args.no_progress
    _, _, val, split = _load_split(args)
    predictor = LearnedPredictor(lookahead=0, checkpoint=args.checkpoint)
    metrics = recall_at_k(predictor, val, args.k, progress=progress)
    out = {"checkpoint": str(predictor.checkpoint), "split": split, "validation": metrics,
           "params": predictor.training_info.get("params"),
           "checkpoint_bytes": ckpt.checkpoint_bytes(predictor.checkpoint)}  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = run_subcommand(args)
    except (*USER_ERRORS, RuntimeError) as exc:
        return fail(str(exc))
    if args.json:
        print(json.dumps(out))
        return 0
    v = out["validation"]
    key = next(k for k in v if k.startswith("recall@") and "_" not in k)
    print(f"checkpoint {out['checkpoint']}")
    print(f"split      train ids {out['split']['train_prompt_ids']}, validation ids {out['split']['val_prompt_ids']}")
    if "train_seconds" in out:
        print(f"training   {out['steps']} steps in {out['train_seconds']:.0f} s, {out['params']:,} parameters, "
              f"{out['checkpoint_bytes'] / 1e6:.2f} MB on disk")  # fmt: skip
    print(f"{key} (distance 0, real tokens only): {100 * v[key]:.2f} % over {v['targets']} targets")
    print(f"{key} per distance: " + ", ".join(f"{100 * x:.1f}" for x in v[f'{key}_per_distance']))
    print(f"{key} per layer:    " + ", ".join(f"{100 * x:.1f}" for x in v[f'{key}_per_layer']))
    return 0


if __name__ == "__main__":
    sys.exit(main())
