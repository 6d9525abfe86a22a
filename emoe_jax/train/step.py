"""Model/optimizer initialisation and the jitted train and eval steps.

The trainable pytree is {'params': nnx.State of the dense model, 'experts':
[ExpertSlots per MoE layer]}; the graph definition stays static at the jit
boundary (flax gemma sampler style) so one compilation serves every step.

Steps of one train step:
  1. forward over tokens[:, :-1] (`train_forward`), targets tokens[:, 1:];
  2. loss = CE + aux_coef * load_balance + z_coef * router_z;
  3. gradient w.r.t. the trainable pytree, global-norm clip, AdamW with linear
     warmup + cosine decay (decoupled weight decay on matrices only).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from emoe_jax.config import MoEConfig
from emoe_jax.model.random_init import random_model
from emoe_jax.train.forward import train_forward
from emoe_jax.train.losses import load_balance_loss, next_token_loss, router_z_loss, token_nll


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    total_steps: int = 1000
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip: float = 1.0
    aux_coef: float = 0.01
    z_coef: float = 1e-3


def init_model(cfg: MoEConfig, seed: int):
    """(graphdef, params State, experts list) with fresh random weights (float32); expert down
    projections scaled by 1/sqrt(2L) (GPT-2) so the residual stream does not grow with depth."""
    return random_model(cfg, seed, jnp.float32, down_gain=(2 * cfg.num_layers) ** -0.5)


def make_schedule(opt: OptimConfig) -> optax.Schedule:
    """Linear warmup to opt.lr, cosine decay to opt.lr * min_lr_ratio at total_steps."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.lr, warmup_steps=max(opt.warmup, 1),
        decay_steps=max(opt.total_steps, opt.warmup + 1), end_value=opt.lr * opt.min_lr_ratio)


def make_optimizer(opt: OptimConfig) -> optax.GradientTransformation:
    schedule = make_schedule(opt)
    # Norm scales and biases (ndim < 2) are not decayed.
    decay_mask = lambda tree: jax.tree.map(lambda p: p.ndim >= 2, tree)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(opt.clip),
        optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=decay_mask),
    )


def loss_and_metrics(trainable: dict[str, Any], graphdef, tokens: jax.Array, opt: OptimConfig, method: str):
    logits, stats = train_forward(graphdef, trainable["params"], trainable["experts"], tokens[:, :-1], method)
    ce = next_token_loss(logits, tokens[:, 1:])
    aux = load_balance_loss(stats.logits, stats.ids)
    z = router_z_loss(stats.logits)
    total = ce + opt.aux_coef * aux + opt.z_coef * z
    return total, {"loss": total, "ce": ce, "aux": aux, "z": z}


@functools.partial(jax.jit, static_argnames=("graphdef", "tx", "opt", "method"),
                   donate_argnames=("trainable", "opt_state"))
def train_step(trainable, opt_state, tokens, *, graphdef, tx, opt: OptimConfig, method: str = "blocked"):
    """tokens [B, T+1] int32 -> (trainable, opt_state, metrics dict of scalars)."""
    grad_fn = jax.value_and_grad(loss_and_metrics, has_aux=True)
    (_, metrics), grads = grad_fn(trainable, graphdef, tokens, opt, method)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return trainable, opt_state, metrics


@functools.partial(jax.jit, static_argnames=("graphdef", "method"))
def eval_step(trainable, tokens, *, graphdef, method: str = "blocked"):
    """tokens [B, T+1] -> summed next-token NLL per row [B] float32."""
    logits, _ = train_forward(graphdef, trainable["params"], trainable["experts"], tokens[:, :-1], method)
    return jnp.sum(token_nll(logits, tokens[:, 1:]), axis=-1)
