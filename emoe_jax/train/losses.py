"""Training losses: next-token cross-entropy, Switch-style load balancing, router z-loss.

load_balance_loss (Fedus et al., Switch Transformer, generalised to top-k), per
MoE layer: f_e = share of the N*k top-k assignments that went to expert e,
P_e = mean router probability of e over the N tokens; loss = E * sum_e f_e P_e,
which is 1 for perfectly uniform routing. f is a count (no gradient); the
gradient flows through P. Averaged over MoE layers.

router_z_loss (Zoph et al., ST-MoE): mean over tokens of logsumexp(logits)^2,
keeps router logits small so the softmax stays in a well-conditioned range.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy; logits [B, T, V] float32, targets [B, T] int32, mask [B, T] (1 = counted)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T]
    if mask is None:
        return jnp.mean(nll)
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood [B, T] float32."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def load_balance_loss(router_logits: jax.Array, ids: jax.Array) -> jax.Array:
    """router_logits [Lm, N, E] float32, ids [Lm, N, k] int32 -> scalar, mean over layers."""
    num_experts = router_logits.shape[-1]
    probs = jax.nn.softmax(router_logits, axis=-1)
    mean_prob = jnp.mean(probs, axis=1)  # [Lm, E]
    one_hot = jax.nn.one_hot(ids, num_experts, dtype=jnp.float32)  # [Lm, N, k, E]
    fraction = jax.lax.stop_gradient(jnp.mean(jnp.sum(one_hot, axis=2), axis=1) / ids.shape[-1])  # [Lm, E]
    return jnp.mean(num_experts * jnp.sum(fraction * mean_prob, axis=-1))


def router_z_loss(router_logits: jax.Array) -> jax.Array:
    """router_logits [Lm, N, E] -> mean squared logsumexp."""
    return jnp.mean(jax.nn.logsumexp(router_logits, axis=-1) ** 2)
