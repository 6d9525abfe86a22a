"""Sigmoid-scored and expert-group routing (DeepSeek-V2 groups, DeepSeek-V3, GLM-4.5).

The plain softmax top-k router of the other families stays in moe.route, which hands
these variants to `route_sigmoid_or_grouped`. Steps:
  1. scores [N, E] float32 from the logits: softmax (Mixtral, Qwen, OLMoE, DeepSeek-V2) or
     sigmoid (DeepSeek-V3, GLM-4.5); in restricted mode (eMoE) non-resident experts are
     masked out (softmax: before normalising, as before; sigmoid: from the choice);
  2. choice scores = scores + `e_score_correction_bias` where the family has one
     (DeepSeek-V3's auxiliary-loss-free balancing: the bias steers *which* experts are
     chosen, never their weights);
  3. group-limited routing (`group_mask`, the one implementation for both methods):
     experts are split into n_group equal groups, each group is scored (DeepSeek-V2
     group_limited_greedy: its best expert; noaux_tc: the sum of its best two), and only
     the topk_group best groups stay eligible;
  4. top-k of the choice scores gives the ids; the weights are the *scores* (not the
     choice scores) of those ids, renormalised where the family does, then scaled by
     `routed_scaling_factor`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..config import MoEConfig


def group_mask(choice: jax.Array, n_group: int, topk_group: int, experts_per_group_score: int) -> jax.Array:
    """[N, E] bool: experts that belong to the topk_group best of n_group contiguous groups.

    A group's score is the sum of its `experts_per_group_score` best choice scores
    (1: DeepSeek-V2's group max; 2: DeepSeek-V3's top-2 sum), as transformers computes it.
    """
    n, e = choice.shape
    grouped = choice.reshape(n, n_group, e // n_group)  # [N, G, E/G]
    group_scores = jnp.sum(jax.lax.top_k(grouped, experts_per_group_score)[0], axis=-1)  # [N, G]
    _, best = jax.lax.top_k(group_scores, topk_group)  # [N, topk_group]
    keep = jnp.any(jax.nn.one_hot(best, n_group, dtype=jnp.bool_), axis=1)  # [N, G]
    return jnp.repeat(keep, e // n_group, axis=1)  # [N, E]


def route_sigmoid_or_grouped(logits: jax.Array, cfg: MoEConfig, resident: jax.Array | None = None,
                             bias: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(ids [N, k] int32 in descending choice score, weights [N, k] float32) from logits [N, E] float32.

    resident: optional [E] bool; when given (restricted mode), experts that are not
    resident cannot be chosen, so tokens go to their next-best resident expert.
    bias: optional [E] float32 `e_score_correction_bias` (selection only).
    """
    if cfg.scoring_func == "softmax":
        if resident is not None:
            logits = jnp.where(resident[None, :], logits, -jnp.inf)
        scores = jax.nn.softmax(logits, axis=-1)
    else:
        scores = jax.nn.sigmoid(logits)
    choice = scores if bias is None else scores + bias.astype(jnp.float32)[None, :]
    if cfg.topk_method != "greedy" and cfg.n_group > 1:
        per_group_score = 1 if cfg.topk_method == "group_limited_greedy" else 2
        choice = jnp.where(group_mask(choice, cfg.n_group, cfg.topk_group, per_group_score), choice, -jnp.inf)
    if resident is not None and cfg.scoring_func != "softmax":
        choice = jnp.where(resident[None, :], choice, -jnp.inf)
    _, ids = jax.lax.top_k(choice, cfg.top_k)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights * cfg.routed_scaling_factor
    return ids.astype(jnp.int32), weights.astype(jnp.float32)
