"""python -m emoe_jax.train: train the embedded MoE model, export it, analyse its routing.

    python -m emoe_jax.train lm --corpus out/corpus --tokenizer out/tokenizer --out out/train_embedded \\
        --preset embedded --steps 700 --batch 16 --seq-len 256 --time-limit-min 78
    python -m emoe_jax.train export out/train_embedded checkpoints/embedded
    python -m emoe_jax.train analyze checkpoints/embedded --corpus out/corpus --split validation --json
"""

from __future__ import annotations

import argparse
import json
import sys

from emoe_jax.cli import USER_ERRORS, fail, run_subcommand


def _add_lm(sub) -> None:
    p = sub.add_parser("lm", help="train (or resume) a language model on the multi-task corpus",
                       description="Train an MoE LM with AdamW (warmup + cosine), next-token CE + Switch "
                       "load-balancing loss + router z-loss. Auto-resumes when --out holds a checkpoint.")
    p.add_argument("--corpus", required=True, help="corpus directory (python -m emoe_jax.data build)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (python -m emoe_jax.data tokenizer)")
    p.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, token cache")
    p.add_argument("--preset", default="embedded", help="model preset (emoe_jax.train.presets); default embedded")
    p.add_argument("--steps", type=int, default=700, help="total optimizer steps (the cosine ends here)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="context length of a training window")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--aux-coef", type=float, default=0.01, help="load-balancing loss coefficient")
    p.add_argument("--z-coef", type=float, default=1e-3, help="router z-loss coefficient")
    p.add_argument("--seed", type=int, default=0, help="seeds weights and batch order")
    p.add_argument("--method", default="blocked", choices=("blocked", "sorted", "gather", "reference"),
                   help="expert-mixing kernel (all exact; blocked is fastest on CPU)")
    p.add_argument("--eval-every", type=int, default=200, help="validation every N steps (and at the end)")
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=24,
                   help="periodic evaluation uses each task's first N validation windows (0: all); "
                        "export/analyze always use all")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--time-limit-min", type=float, default=None,
                   help="stop (after saving) once this many minutes of wall time have passed")
    p.add_argument("--resume", action="store_true",
                   help="require an existing checkpoint in --out (resuming is automatic when one exists)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.set_defaults(run=_run_lm)


def _run_lm(args) -> int:
    from emoe_jax.train import checkpointing
    from emoe_jax.train.loop import RunConfig, train_lm
    from emoe_jax.train.presets import get_train_preset
    from emoe_jax.train.step import OptimConfig

    if args.resume and not checkpointing.list_checkpoints(args.out):
        raise checkpointing.TrainCheckpointError(f"--resume given but {args.out} holds no checkpoint")
    for name in ("steps", "batch", "seq_len", "eval_every", "save_every", "eval_batch"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    model = get_train_preset(args.preset)
    if args.seq_len > model.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the preset's context {model.max_position_embeddings}")
    optim = OptimConfig(lr=args.lr, warmup=args.warmup, total_steps=args.steps, weight_decay=args.weight_decay,
                        aux_coef=args.aux_coef, z_coef=args.z_coef)
    run = RunConfig(model=model, optim=optim, corpus=str(args.corpus), tokenizer=str(args.tokenizer),
                    batch=args.batch, seq_len=args.seq_len, seed=args.seed, method=args.method)
    summary = train_lm(run, args.out, eval_every=args.eval_every, save_every=args.save_every,
                       time_limit_min=args.time_limit_min, eval_batch=args.eval_batch,
                       eval_windows=args.eval_windows or None,
                       progress=not args.no_progress, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps(summary, indent=2) if args.json else
          f"stopped ({summary['reason']}) at step {summary['step']}/{summary['total_steps']}, "
          f"{summary['tokens']} tokens, {summary['elapsed_s']:.0f} s")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a run's newest checkpoint as a converted (engine) checkpoint",
                       description="Restore RUN_DIR's newest checkpoint, measure full per-task validation "
                       "perplexity, and write OUT as a bf16 converted checkpoint with the tokenizer and "
                       "training.json (command, steps, tokens, wall time, hardware, perplexity).")
    p.add_argument("run_dir", help="training run directory (--out of `lm`)")
    p.add_argument("out", help="checkpoint directory to write, e.g. checkpoints/embedded")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--eval-windows", type=int, default=0,
                   help="validation on each task's first N windows only (0: all, the default)")
    p.add_argument("--samples", action="store_true",
                   help="also generate from a few prompts with the offloaded engine and store them in training.json")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print training.json")
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from emoe_jax.train.checkpointing import write_json_atomic
    from emoe_jax.train.export import export_run

    info = export_run(args.run_dir, args.out, dtype=args.dtype, overwrite=args.overwrite,
                      eval_windows=args.eval_windows or None, progress=not args.no_progress)
    if args.samples:
        from pathlib import Path

        from emoe_jax.train.samples import generate_samples

        info["samples"] = generate_samples(args.out)
        write_json_atomic(Path(args.out) / "training.json", info)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        ppl = info["validation_float32"]
        print(f"exported step {info['steps']} ({info['tokens_seen']} tokens) to {args.out}; validation ppl "
              + ", ".join(f"{t}={v['ppl']:.1f}" for t, v in ppl.items()))
        for s in info.get("samples", []):
            print(f"--- {s['prompt']!r} -> {s['completion']!r}")
    return 0


def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="per-task perplexity and task/expert routing specialisation",
                       description="Per-task perplexity; per MoE layer the mutual information between task "
                       "and expert choice (bits, and / H(task)), and per task the share of experts carrying "
                       "80%% of its routed load.")
    p.add_argument("checkpoint", help="converted checkpoint directory (e.g. checkpoints/embedded)")
    p.add_argument("--corpus", required=True, help="corpus directory")
    p.add_argument("--split", default="validation", choices=("train", "validation", "test"))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-windows", type=int, default=0, help="first N windows per task only (0: all)")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown (model card)")
    p.set_defaults(run=_run_analyze)


def _run_analyze(args) -> int:
    from emoe_jax.train.analyze import analyze_checkpoint
    from emoe_jax.train.checkpointing import write_json_atomic

    if args.seq_len <= 0 or args.batch <= 0:
        raise ValueError("--seq-len and --batch must be positive")
    result = analyze_checkpoint(args.checkpoint, args.corpus, args.split, seq_len=args.seq_len, batch=args.batch,
                                max_windows_per_task=args.max_windows or None, progress=not args.no_progress)
    if args.out:
        write_json_atomic(args.out, result)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if args.markdown:
        from emoe_jax.train.analyze import markdown_tables

        print(markdown_tables(result))
        return 0
    print("task        loss    ppl")
    for t, v in result["perplexity"].items():
        print(f"{t:10s} {v['loss']:6.3f} {v['ppl']:8.2f}")
    print("layer  MI bits  MI/H(task)  experts for 80% load per task (share of E)")
    for i, layer in enumerate(result["layers"]):
        shares = " ".join(f"{t}={s:.2f}" for t, s in layer["experts_for_80pct"].items())
        print(f"{i:5d}  {layer['mi_bits']:7.3f}  {layer['mi_over_h']:10.3f}  {shares}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emoe_jax.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_lm(sub)
    _add_export(sub)
    _add_analyze(sub)
    args = parser.parse_args(argv)
    try:
        return run_subcommand(args)
    except USER_ERRORS as error:
        return fail(error)


if __name__ == "__main__":
    sys.exit(main())
