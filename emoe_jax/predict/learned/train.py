"""Train the learned predictor with optax on routing traces (masked multi-label BCE).

Steps:
1. Split the trace set by prompt id (``emoe_jax.traces.split_by_prompt_id``:
   the lowest ids train, the last ``val_fraction`` validate; contiguous, so the
   turns of a conversation stay together except at most one at the boundary).
2. Pack the training prompts into rows (``data.pack_prompts``).
3. AdamW with linear warm-up and cosine decay, global-norm clipping; each step
   draws ``batch_size`` random rows. The loss is BCE over every real step and
   distance (padding and targets past the prompt are masked out), averaged
   over experts and real targets.
4. Validation recall@k per target layer and distance over real tokens only
   (``evaluate.recall_at_k``), then an atomic Orbax checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from emoe_jax.predict.learned.config import LearnedConfig
from emoe_jax.predict.learned.data import PackedRows, horizon_labels, pack_prompts
from emoe_jax.predict.learned.model import RoutingPredictorNet, count_params
from emoe_jax.predict.learned.prior import TablePrior


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    steps: int = 2000
    batch_size: int = 8  # packed rows per step
    row_len: int = 256  # tokens per packed row
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    clip: float = 1.0
    seed: int = 0
    log_every: int = 100
    time_limit_s: float | None = None  # stop early (and say so) after this much training time
    save_every: int = 0  # call train_model's save_fn every this many steps (0: never)


@dataclass
class TrainResult:
    model: RoutingPredictorNet
    seconds: float
    steps_done: int
    stopped_early: bool
    train_rows: int
    train_tokens: int
    params: int
    history: list[dict[str, float]] = field(default_factory=list)


def bce_loss(model: RoutingPredictorNet, batch: tuple[jax.Array, ...]) -> jax.Array:
    tok, prev, has_prev, seg, pos, experts, *rest = batch  # rest: (hidden,) or (hidden or None, tok_row)
    hidden = rest[0] if rest else None
    tok_row = rest[1] if len(rest) > 1 else None
    logits = model(tok, prev, has_prev, seg, pos, experts, hidden, tok_row)  # [B, S, L, h, E]
    labels, mask = horizon_labels(experts, seg, model.cfg.horizon, model.cfg.num_experts)
    per = optax.sigmoid_binary_cross_entropy(logits, labels).mean(-1)  # [B, S, L, h]
    return jnp.sum(per * mask) / jnp.maximum(mask.sum(), 1)


def train_model(train_prompts: Any, cfg: LearnedConfig, settings: TrainSettings, progress: bool = True,
                init: RoutingPredictorNet | None = None, prior: TablePrior | None = None,
                save_fn: Callable[[RoutingPredictorNet, int, list], None] | None = None) -> TrainResult:  # fmt: skip
    """Train on ``train_prompts`` (a TraceSet or list of PromptTrace): a fresh network, or continue ``init``.

    With cfg.table_prior a fresh network needs ``prior`` (``prior.fit_table_prior`` on the same
    training prompts); a continued one keeps the tables it holds. ``save_fn(model, steps_done,
    history)`` is called every ``settings.save_every`` steps (a periodic checkpoint).
    """
    if init is not None and init.cfg != cfg:
        raise ValueError(f"cannot continue a network of config {init.cfg} as {cfg}")
    model = init if init is not None else RoutingPredictorNet(cfg, rngs=nnx.Rngs(settings.seed))
    token_rows = None
    if cfg.table_prior:
        if prior is not None:
            model.install_prior(prior)
        elif init is None:
            raise ValueError("cfg.table_prior needs the fitted tables: pass prior=fit_table_prior(train, horizon)")
        token_rows = model.table_prior().token_rows
    elif prior is not None:
        raise ValueError("a table prior was given but cfg.table_prior is False")
    rows: PackedRows = pack_prompts(train_prompts, cfg.num_layers, cfg.top_k, settings.row_len, cfg.token_buckets,
                                    cfg.hidden_size, token_rows)  # fmt: skip
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, settings.lr, min(settings.warmup, max(settings.steps // 10, 1)), max(settings.steps, 2), settings.lr * 0.05
    )
    tx = optax.chain(optax.clip_by_global_norm(settings.clip), optax.adamw(schedule, weight_decay=settings.weight_decay))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(bce_loss)(model, batch)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(settings.seed)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    stopped_early = False
    losses: list[float] = []
    bar = tqdm(range(settings.steps), desc="train learned predictor", disable=not progress, unit="step")
    done = 0
    for i in bar:
        idx = rng.choice(len(rows), size=min(settings.batch_size, len(rows)), replace=len(rows) < settings.batch_size)
        loss = float(step(model, optimizer, rows.batch(idx)))
        if not np.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} at step {i}; lower --lr")
        losses.append(loss)
        done = i + 1
        if done % settings.log_every == 0 or done == settings.steps:
            entry = {"step": done, "loss": float(np.mean(losses[-settings.log_every :])),
                     "seconds": time.perf_counter() - start}  # fmt: skip
            history.append(entry)
            bar.set_postfix(loss=f"{entry['loss']:.4f}")
        if save_fn is not None and settings.save_every and done % settings.save_every == 0:
            save_fn(model, done, history)
        if settings.time_limit_s is not None and time.perf_counter() - start > settings.time_limit_s:
            stopped_early = done < settings.steps
            break
    seconds = time.perf_counter() - start
    if not history or history[-1]["step"] != done:
        history.append({"step": done, "loss": float(np.mean(losses[-settings.log_every :])), "seconds": seconds})
    return TrainResult(model, seconds, done, stopped_early, len(rows), rows.real_tokens, count_params(model), history)
