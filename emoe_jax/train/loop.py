"""The language-model training loop: resumable, time-limited, logged.

Steps of `train_lm`:
  1. read (or, on a new run, write) RUN_DIR/run.json: preset config, optimiser and
     data options; a resumed run must use the same ones (time limit and eval/save
     cadence may change);
  2. encode (or reuse) the train and validation token streams;
  3. fresh weights, or the newest RUN_DIR/checkpoints/step_* (auto-resume), then
     fast-forward the seeded batch iterator by the batches already consumed, so a
     resumed run sees exactly the batches an uninterrupted one would;
  4. per step: jitted train step, a line in metrics.jsonl, tqdm postfix;
     every --eval-every steps per-task validation perplexity; every --save-every
     steps, at the end, on SIGTERM/SIGINT and at the time limit an atomic checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from emoe_jax.config import MoEConfig
from emoe_jax.data import random_batches
from emoe_jax.train import checkpointing
from emoe_jax.train.data import cached_streams
from emoe_jax.train.evaluate import evaluate
from emoe_jax.train.step import OptimConfig, init_model, make_optimizer, make_schedule, train_step


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything that defines the trajectory of a run (checked on resume)."""

    model: MoEConfig
    optim: OptimConfig
    corpus: str
    tokenizer: str
    batch: int = 16
    seq_len: int = 256
    seed: int = 0
    method: str = "blocked"

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "optim": dataclasses.asdict(self.optim), "corpus": self.corpus,
                "tokenizer": self.tokenizer, "batch": self.batch, "seq_len": self.seq_len, "seed": self.seed,
                "method": self.method}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        return cls(model=MoEConfig.from_dict(d["model"]), optim=OptimConfig(**d["optim"]), corpus=d["corpus"],
                   tokenizer=d["tokenizer"], batch=d["batch"], seq_len=d["seq_len"], seed=d["seed"],
                   method=d["method"])


def hardware() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "jax_backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "jax": jax.__version__}


def _check_run_config(run_dir: Path, run: RunConfig) -> None:
    path = run_dir / "run.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(run.to_dict())):
            diff = sorted(k for k in set(old) | set(run.to_dict()) if old.get(k) != json.loads(
                json.dumps(run.to_dict())).get(k))
            raise checkpointing.TrainCheckpointError(
                f"{run_dir} holds a run with different settings ({', '.join(diff)}); resume with the same "
                "options or choose a new --out directory")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpointing.write_json_atomic(path, run.to_dict())


class _StopFlag:
    """Set by SIGTERM/SIGINT so the loop saves a checkpoint at the next step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum, _frame) -> None:
        self.signal = signum


def train_lm(run: RunConfig, run_dir: str | Path, *, eval_every: int = 200, save_every: int = 100,
             time_limit_min: float | None = None, eval_batch: int = 32,
             eval_windows: int | None = None, progress: bool = True,
             max_steps_this_call: int | None = None, log=print) -> dict[str, Any]:
    """Train (or resume) to run.optim.total_steps. Returns a summary dict (steps, tokens, wall time, eval)."""
    run_dir = Path(run_dir)
    _check_run_config(run_dir, run)
    started = time.time()
    metrics_path = run_dir / "metrics.jsonl"
    train_streams = cached_streams(run.corpus, run.tokenizer, "train", run_dir / "tokens", progress)
    val_streams = cached_streams(run.corpus, run.tokenizer, "validation", run_dir / "tokens", progress)
    if train_streams.vocab_size > run.model.vocab_size:
        raise ValueError(f"tokenizer has {train_streams.vocab_size} tokens but the model's vocab_size is "
                         f"{run.model.vocab_size}; use a preset matching the tokenizer")

    graphdef, params, experts = init_model(run.model, run.seed)
    tx = make_optimizer(run.optim)
    schedule = make_schedule(run.optim)
    trainable = {"params": params, "experts": experts}
    opt_state = tx.init(trainable)
    meta = {"step": 0, "batches": 0, "tokens": 0, "elapsed_s": 0.0}
    existing = checkpointing.list_checkpoints(run_dir)
    if existing:
        trainable, opt_state, meta = checkpointing.restore(existing[-1], params, experts, opt_state)
        log(f"resumed from {existing[-1]} (step {meta['step']})")

    batches = random_batches(train_streams, run.batch, run.seq_len + 1, seed=run.seed)
    for _ in range(int(meta["batches"])):  # fast-forward: same batches as an uninterrupted run
        next(batches)

    stop = _StopFlag()
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    deadline = started + time_limit_min * 60 if time_limit_min else None
    elapsed0 = float(meta["elapsed_s"])
    total = run.optim.total_steps
    last_eval: dict[str, Any] | None = None
    reason = "done"

    def save() -> None:
        meta["elapsed_s"] = elapsed0 + (time.time() - started)
        checkpointing.save(run_dir, trainable, opt_state, meta)

    def log_line(record: dict[str, Any]) -> None:
        with metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    # The command line, when we run as `python -m emoe_jax.train` (export copies it into training.json).
    argv = ["python", "-m", "emoe_jax.train", *sys.argv[1:]] if sys.argv[0].endswith("__main__.py") else None
    log_line({"event": "start", "step": int(meta["step"]), "time": time.time(), "argv": argv,
              "hardware": hardware()})
    bar = tqdm(total=total, initial=int(meta["step"]), desc="train", unit="step", disable=not progress,
               dynamic_ncols=True)
    steps_this_call = 0
    try:
        while meta["step"] < total:
            if stop.signal is not None:
                reason = f"signal {stop.signal}"
                break
            if deadline is not None and time.time() >= deadline:
                reason = "time limit"
                break
            if max_steps_this_call is not None and steps_this_call >= max_steps_this_call:
                reason = "max steps this call"
                break
            batch = next(batches)
            t0 = time.perf_counter()
            trainable, opt_state, m = train_step(trainable, opt_state, jnp.asarray(batch.tokens),
                                                 graphdef=graphdef, tx=tx, opt=run.optim, method=run.method)
            m = {k: float(v) for k, v in m.items()}
            dt = time.perf_counter() - t0
            steps_this_call += 1
            meta["step"] += 1
            meta["batches"] += 1
            meta["tokens"] += run.batch * run.seq_len
            if not math.isfinite(m["loss"]):
                raise FloatingPointError(f"loss became {m['loss']} at step {meta['step']}; lower --lr")
            tok_s = run.batch * run.seq_len / dt
            log_line({"step": int(meta["step"]), "tokens": int(meta["tokens"]), **m, "step_s": dt,
                      "tokens_per_s": tok_s, "lr": float(schedule(meta["step"] - 1))})
            bar.update(1)
            bar.set_postfix(loss=f"{m['ce']:.3f}", aux=f"{m['aux']:.3f}", tok_s=f"{tok_s:.0f}")
            if meta["step"] % eval_every == 0 or meta["step"] == total:
                last_eval = evaluate(trainable, graphdef, val_streams, eval_batch, run.seq_len, run.method,
                                     max_windows_per_task=eval_windows)
                log_line({"event": "eval", "step": int(meta["step"]), "tokens": int(meta["tokens"]),
                          "validation": last_eval})
                log(f"step {meta['step']}: validation ppl " +
                    ", ".join(f"{t}={v['ppl']:.1f}" for t, v in last_eval.items()))
            if meta["step"] % save_every == 0:
                save()
        save()
    finally:
        bar.close()
        for s, handler in old_handlers.items():
            signal.signal(s, handler)
    summary = {"reason": reason, "step": int(meta["step"]), "total_steps": total, "tokens": int(meta["tokens"]),
               "elapsed_s": float(meta["elapsed_s"]), "validation": last_eval}
    log_line({"event": "stop", **summary})
    return summary

