"""Export a training run as a converted checkpoint the inference engine serves.

Steps of `export_run`:
  1. read RUN_DIR/run.json and restore the newest step_* checkpoint (float32);
  2. full per-task validation perplexity of the trained (float32) model;
  3. dense params -> HF names (`params_to_hf`) -> converter layout
     (`nest_for_checkpoint`); experts stacked [Lm, E, ...];
  4. `write_checkpoint` in bfloat16 with the tokenizer files into a staging
     directory beside OUT, add training.json (command, steps, tokens, wall
     time, hardware, validation perplexity), then swap it into place, so OUT is
     never half-written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from emoe_jax.atomic_io import replace_dir
from emoe_jax.checkpoint import write_checkpoint
from emoe_jax.model.hf_params import nest_for_checkpoint, params_to_hf
from emoe_jax.train import checkpointing
from emoe_jax.train.data import cached_streams
from emoe_jax.train.evaluate import evaluate
from emoe_jax.train.loop import RunConfig, hardware
from emoe_jax.train.step import init_model, make_optimizer


def load_run(run_dir: str | Path, step: int | None = None):
    """(RunConfig, graphdef, trainable, meta) of the newest (or the given) checkpoint of a run."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise FileNotFoundError(f"{run_dir} holds no run.json; is it a `python -m emoe_jax.train lm` run?")
    run = RunConfig.from_dict(json.loads((run_dir / "run.json").read_text()))
    found = checkpointing.list_checkpoints(run_dir)
    if step is not None:
        found = [p for p in found if int(p.name.split("_")[1]) == step]
    if not found:
        raise FileNotFoundError(f"no training checkpoint{'' if step is None else f' for step {step}'} in "
                                f"{run_dir / checkpointing.CKPT_DIR}")
    graphdef, params, experts = init_model(run.model, run.seed)
    tx = make_optimizer(run.optim)
    trainable, _, meta = checkpointing.restore(found[-1], params, experts,
                                               tx.init({"params": params, "experts": experts}))
    return run, graphdef, trainable, meta


def _commands(run_dir: Path) -> list[str]:
    """The command lines that produced the run (from metrics.jsonl start events, else command.txt)."""
    commands = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if record.get("event") == "start" and record.get("argv"):
                commands.append(" ".join(record["argv"]))
    if not commands and (run_dir / "command.txt").is_file():
        commands = [(run_dir / "command.txt").read_text().splitlines()[0]]
    return list(dict.fromkeys(commands))


def _start_hardware(run_dir: Path) -> list[dict[str, Any]]:
    seen = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if record.get("event") == "start" and record.get("hardware") not in seen:
                seen.append(record["hardware"])
    return seen


def compact_expert_layout(experts_dir: Path) -> None:
    """Rewrite each expert array with chunk keys 'c.L.E.0.0' (one folder) instead of 'c/L/E/0/0'.

    Same zarr3 format, chunks and bytes (readers take the key encoding from
    zarr.json), but no folder per expert: the default nested keys cost two
    folders per chunk, which `du` counts as 4 KiB each (6.3 MB for the embedded
    model's 768 chunks), enough to push a 27.5 MB checkpoint past 32 MB.
    """
    import tensorstore as ts

    for weight in ("gate", "up", "down"):
        old = experts_dir / weight
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(old)}}
        source = ts.open(spec, open=True, read=True).result()
        metadata = source.spec().to_json()["metadata"]
        metadata["chunk_key_encoding"] = {"name": "default", "configuration": {"separator": "."}}
        staged = experts_dir / f".{weight}.compact"
        target = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(staged)},
                          "metadata": metadata}, create=True, delete_existing=True).result()
        target.write(source.read().result()).result()
        replace_dir(staged, old)


def export_run(run_dir: str | Path, out_dir: str | Path, *, dtype: str = "bfloat16", overwrite: bool = False,
               eval_batch: int = 32, eval_windows: int | None = None,
               progress: bool = True) -> dict[str, Any]:
    # Absolute: Orbax (dense groups) refuses relative paths.
    run_dir, out_dir = Path(run_dir), Path(out_dir).resolve()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass --overwrite to replace it")
    run, graphdef, trainable, meta = load_run(run_dir)
    cfg = run.model
    t0 = time.time()
    val = cached_streams(run.corpus, run.tokenizer, "validation", run_dir / "tokens", progress)
    validation = evaluate(trainable, graphdef, val, eval_batch, run.seq_len, run.method, progress=progress,
                          max_windows_per_task=eval_windows)
    dense = nest_for_checkpoint(params_to_hf(cfg, trainable["params"]))
    experts = {k: np.asarray(v) for k, v in checkpointing.stack_experts(trainable["experts"]).items()}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.export-"))
    try:
        write_checkpoint(staging / "ckpt", cfg, dense, experts, dtype=dtype, tokenizer_dir=run.tokenizer)
        compact_expert_layout(staging / "ckpt" / "experts")
        info = {
            "commands": _commands(run_dir),
            "run_config": run.to_dict(),
            "steps": int(meta["step"]),
            "total_steps": run.optim.total_steps,
            "tokens_seen": int(meta["tokens"]),
            "wall_time_s": round(float(meta["elapsed_s"]), 1),
            "hardware": _start_hardware(run_dir) or [hardware()],
            "validation_float32": validation,
            "validation_windows_per_task": eval_windows or "all",
            "export_dtype": dtype,
            "export_eval_s": round(time.time() - t0, 1),
            "params": {"dense": int(sum(np.asarray(x).size for x in jax.tree.leaves(trainable["params"]))),
                       "routed_experts": int(sum(v.size for v in experts.values()))},
        }
        checkpointing.write_json_atomic(staging / "ckpt" / "training.json", info)
        replace_dir(staging / "ckpt", out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info
