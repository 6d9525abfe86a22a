"""Jitted per-stage functions of the offloaded engine.

Graph definitions are static arguments; parameters, activations, caches and
expert slot buffers are traced arguments. Every MoE layer has the same graph
definition, so one compilation of each stage serves all layers, and the slot
buffers keep their shapes when experts move: swapping never recompiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ..model.moe import mix_experts


@functools.partial(jax.jit, static_argnames=("graphdef",))
def embed(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


@functools.partial(jax.jit, static_argnames=("graphdef", "restricted"), donate_argnames=("cache",))
def attend(graphdef, state, x, cache, write_index, pad_len, resident, *, restricted):
    """Attention + router. Returns residual, normed [B,T,H], new cache, Routing (or None)."""
    layer = nnx.merge(graphdef, state)
    return layer.attend_and_route(x, cache, write_index, pad_len, resident if restricted else None)


@functools.partial(jax.jit, static_argnames=("graphdef", "method"))
def ffn(graphdef, state, residual, normed, routing, experts, slot_of_expert, *, method="auto"):
    """Whole FFN of a layer (routed experts over the slots + shared experts, or the dense MLP)."""
    layer = nnx.merge(graphdef, state)
    return layer.ffn(residual, normed, routing, experts, slot_of_expert, method)


@functools.partial(jax.jit, static_argnames=("method",))
def routed_partial(normed, routing, experts, slot_of_expert, acc, *, method="auto"):
    """acc [N,H] += routed experts of one wave (pairs whose expert is not in this wave add 0)."""
    x = normed.reshape(-1, normed.shape[-1])
    return acc + mix_experts(x, routing, experts, slot_of_expert, method, out_dtype=acc.dtype)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def finish_waves(graphdef, state, residual, normed, acc):
    """Residual + accumulated routed output + shared experts, after the last wave."""
    moe = nnx.merge(graphdef, state)
    b, t, h = normed.shape
    out = acc.astype(normed.dtype)
    if moe.cfg.shared_expert_intermediate_size:
        x = normed.reshape(-1, h)
        shared = moe.shared(x)
        if moe.cfg.shared_expert_gated:
            shared = jax.nn.sigmoid(moe.shared_gate(x)) * shared
        out = out + shared
    return residual + out.reshape(b, t, h)


@functools.partial(jax.jit, static_argnames=("norm_graphdef", "proj_graphdef", "tied"))
def head(norm_graphdef, norm_state, proj_graphdef, proj_state, x, *, tied):
    """Final norm + vocabulary projection of the last position: x [B,T,H] -> [B,V] float32."""
    h = nnx.merge(norm_graphdef, norm_state)(x[:, -1])
    proj = nnx.merge(proj_graphdef, proj_state)
    return (proj.attend(h) if tied else proj(h)).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("top_p_enabled",))
def sample(logits, key, temperature, top_p, *, top_p_enabled):
    """Temperature + nucleus sampling over logits [B, V] -> [B] int32."""
    scaled = logits / temperature
    if top_p_enabled:
        order = jnp.argsort(-scaled, axis=-1)
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        scaled = jnp.where(keep, scaled, -jnp.inf)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
