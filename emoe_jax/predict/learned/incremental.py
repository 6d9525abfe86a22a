"""The learned predictor's network one token at a time: pure, static-shaped, jittable.

``RoutingPredictorNet.context`` recomputes every position of a window; a decoder
sees one new token per step. Here each context block keeps the keys and values
of the last ``window`` positions of every batch row in a ring buffer (slot =
position mod window), so a token costs one query per block against W cached
keys and nothing is recomputed. This is exact, not an approximation: block j's
key at position p depends only on block j-1's output at p, which was itself
computed incrementally when p was the new token.

Steps of one decode token, for every row of a batch (all functions take ``net``,
so a jitted caller merges its GraphDef and state once and calls them in-graph):
1. ``context_step``: h_t [B, d] from the token id, token t-1's routing and the
   cache; rows marked inactive leave the cache unchanged (and get h = 0).
2. Per layer l: ``step_logits(net, h, l, prefix, last, hidden_prev)`` scores
   steps s .. s+horizon; then ``routing_update(net, l, experts, prefix)`` folds
   layer l's routing into the features of layer l+1. prefix and last start at
   zeros at layer 0 of every token.
``prefill_context`` runs step 1 over a whole (padded) prompt batch with
``lax.scan``, so a runtime can fill the cache after prefill.

Mask semantics equal ``attention_mask``: a token reads the tokens of its own
prompt at distance 0 <= dist < window (itself included). A row's positions
start at 0 and advance by one per active step; then a new prompt needs no
reset: a slot left by an earlier prompt holds a position either ahead of the new
token (dist < 0, masked) or is overwritten before the new prompt gets there.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from emoe_jax.predict.learned.config import LearnedConfig, LearnedPredictorError
from emoe_jax.predict.learned.model import RoutingPredictorNet, alibi_attention


class ContextCache(NamedTuple):
    """Per context block, the keys and values of each row's last ``window`` positions."""

    keys: tuple[jax.Array, ...]  # per block [B, W, N, H]; slot pos % W
    values: tuple[jax.Array, ...]  # per block [B, W, N, H]
    pos: jax.Array  # [B, W] int32 position (inside its prompt) of the token in each slot
    filled: jax.Array  # [B, W] bool: the slot holds a token of the row's current prompt


def init_context_cache(cfg: LearnedConfig, batch: int, dtype: jnp.dtype = jnp.float32) -> ContextCache:
    """An empty cache for ``batch`` rows."""
    shape = (batch, cfg.window, cfg.num_heads, cfg.d_model // cfg.num_heads)
    blocks = range(cfg.context_layers)
    return ContextCache(
        keys=tuple(jnp.zeros(shape, dtype) for _ in blocks),
        values=tuple(jnp.zeros(shape, dtype) for _ in blocks),
        pos=jnp.zeros((batch, cfg.window), jnp.int32),
        filled=jnp.zeros((batch, cfg.window), bool),
    )


def context_step(net: RoutingPredictorNet, cache: ContextCache, tok: jax.Array, prev_experts: jax.Array,
                 has_prev: jax.Array, pos: jax.Array, active: jax.Array) -> tuple[jax.Array, ContextCache]:  # fmt: skip
    """h [B, d] of one new token per row (``net.context``'s last position) and the updated cache.

    tok [B] int32 (bucketed with ``token_buckets``), prev_experts [B, L, k] (token t-1's routing),
    has_prev [B] bool, pos [B] int32 (the token's position inside its prompt; a row's active
    steps must advance it by one), active [B] bool (inactive rows keep their cache; their h is 0).
    """
    w = net.cfg.window
    pos, active = pos.astype(jnp.int32), active.astype(bool)
    write = (jnp.arange(w)[None] == (pos % w)[:, None]) & active[:, None]  # [B, W] the slot this token takes
    filled = cache.filled | write
    slot_pos = jnp.where(write, pos[:, None], cache.pos)  # [B, W]
    dist = pos[:, None] - slot_pos  # [B, W] query pos - key pos
    mask = filled & (dist >= 0) & (dist < w)  # as attention_mask (the ring already drops dist >= w)
    dist = jnp.maximum(dist, 0)
    x = net.context_input(tok[:, None], prev_experts[:, None], has_prev[:, None])  # [B, 1, d]
    keys, values = [], []
    for block, k_cache, v_cache in zip(net.blocks, cache.keys, cache.values):
        q, k, v = block.qkv_heads(x)  # [B, 1, N, H]
        k_cache = jnp.where(write[:, :, None, None], k, k_cache)  # [B, W, N, H]
        v_cache = jnp.where(write[:, :, None, None], v, v_cache)
        x = block.finish(x, alibi_attention(q, k_cache, v_cache, block.slopes[...], mask[:, None], dist[:, None]))
        keys.append(k_cache)
        values.append(v_cache)
    h = jnp.where(active[:, None], net.ctx_norm(x[:, 0]), 0.0)
    return h, ContextCache(tuple(keys), tuple(values), slot_pos, filled)


def prefill_context(net: RoutingPredictorNet, cache: ContextCache, tok: jax.Array, experts: jax.Array,
                    valid: jax.Array) -> tuple[jax.Array, ContextCache]:  # fmt: skip
    """``context_step`` over a padded prompt batch: (h of each row's last valid token [B, d], cache).

    tok [B, T] int32 (bucketed), experts [B, T, L, k] (each token's own routing), valid [B, T]
    bool (left padding, as a runtime's prefill batch has). Every row starts a new prompt at its
    first valid token; padding positions are inactive steps.
    """
    valid = valid.astype(bool)
    pos = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1  # [B, T] position inside the prompt (pads: stale)
    b = tok.shape[0]
    first = (jnp.zeros_like(experts[:, 0]), jnp.zeros((b,), bool), jnp.zeros((b, net.cfg.d_model), jnp.float32))

    def body(carry, xs):
        cache, prev, has_prev, h_last = carry  # prev [B, L, k]: the row's last valid token's routing
        tok_t, experts_t, valid_t, pos_t = xs
        h, cache = context_step(net, cache, tok_t, prev, has_prev, pos_t, valid_t)
        prev = jnp.where(valid_t[:, None, None], experts_t, prev)
        h_last = jnp.where(valid_t[:, None], h, h_last)
        return (cache, prev, has_prev | valid_t, h_last), None

    xs = (tok.T, jnp.swapaxes(experts, 0, 1), valid.T, pos.T)  # time-major
    (cache, _, _, h_last), _ = jax.lax.scan(body, (cache, *first), xs)
    return h_last, cache


def step_logits(net: RoutingPredictorNet, h: jax.Array, layer: int | jax.Array, prefix: jax.Array,
                last: jax.Array, hidden_prev: jax.Array | None = None,
                prior_q: jax.Array | None = None) -> jax.Array:  # fmt: skip
    """logits [B, horizon+1, E] of step (t, layer), as ``net.step_head(net.step_features(...))``.

    h [B, d] from ``context_step``; prefix [B, d] (token t's prefix embeddings summed over layers
    < layer) and last [B, d] (layer-1's last embedding), both zeros at layer 0, from
    ``routing_update``; hidden_prev [B, H]: token t's router input at layer-1, required when the
    network uses router inputs (cfg.hidden_size), ignored at layer 0. ``layer`` may be traced.
    prior_q [B, horizon+1, E]: the causal-table scores of step (t, layer) (``net.prior_q`` row
    ``layer``), required when the network uses the table prior (cfg.table_prior); a caller that
    cannot compute them (the runtime's in-graph path) gets a clear error, never a silent skip.
    """
    layer = jnp.asarray(layer, jnp.int32)
    z = h + net.layer_embed(layer) + prefix + last  # same summation order as step_features
    if net.cfg.hidden_size is not None:
        if hidden_prev is None:
            raise ValueError("this network was trained with router inputs; pass hidden_prev (layer-1's input)")
        z = z + jnp.where(layer > 0, net.hidden_features(hidden_prev), 0.0)
    if not net.cfg.table_prior:
        return net.step_head(z)
    if prior_q is None:
        raise LearnedPredictorError(
            "this learned-predictor checkpoint uses the causal-table prior (config table_prior=true), which "
            "this caller does not compute (the runtime's in-graph learned path has no causal-table prior); "
            "use the host-side LearnedPredictor, or a checkpoint trained without --table-prior"
        )
    return net.apply_prior(net.step_head(z + net.prior_features(prior_q)), prior_q)


def routing_update(net: RoutingPredictorNet, layer: int | jax.Array, experts: jax.Array,
                   prefix: jax.Array) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """(prefix, last) [B, d] for step (t, layer+1) after token t routed to experts [B, k] at ``layer``."""
    keys = jnp.asarray(layer, jnp.int32) * net.cfg.num_experts + experts.astype(jnp.int32)  # [B, k]
    return prefix + net.prefix_embed(keys).sum(-2), net.last_embed(keys).sum(-2)
