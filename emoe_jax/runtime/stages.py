"""Jitted per-stage functions of the offloaded engine.

Each stage is a jitted closure over its graph definition(s), built once per
distinct structure (`..model.jit_cache`): parameters, activations, caches and
expert slot buffers are traced arguments. Every MoE layer has an equal graph
definition, so one compilation of each stage serves all layers, and the slot
buffers keep their shapes when experts move: swapping never recompiles.

`attend_fn(graphdef, restricted)` etc. return the closure (hot loops, `.lower`);
`attend(graphdef, state, ...)` etc. look it up and call it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ..model.jit_cache import jitted
from ..model.moe import SWIGLU, mix_experts


def _build_embed(graphdef):
    return jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))


def _build_attend(graphdef, restricted):
    def attend(state, x, cache, write_index, pad_len, resident):
        layer = nnx.merge(graphdef, state)
        return layer.attend_and_route(x, cache, write_index, pad_len, resident if restricted else None)
    return jax.jit(attend, donate_argnums=2)


def _build_ffn(graphdef, method):
    def ffn(state, residual, normed, routing, experts, slot_of_expert):
        return nnx.merge(graphdef, state).ffn(residual, normed, routing, experts, slot_of_expert, method)
    return jax.jit(ffn)


def _build_finish_waves(graphdef):
    def finish_waves(state, residual, normed, acc):
        moe = nnx.merge(graphdef, state)
        b, t, h = normed.shape
        out = moe.add_shared(normed.reshape(-1, h), acc.astype(normed.dtype))
        return residual + out.reshape(b, t, h)
    return jax.jit(finish_waves)


def _build_head(norm_graphdef, proj_graphdef, tied):
    def head(norm_state, proj_state, x):
        h = nnx.merge(norm_graphdef, norm_state)(x[:, -1])
        proj = nnx.merge(proj_graphdef, proj_state)
        return (proj.attend(h) if tied else proj(h)).astype(jnp.float32)
    return jax.jit(head)


def embed_fn(graphdef):
    """(state, tokens [B,T]) -> embeddings [B,T,H]."""
    return jitted(_build_embed, graphdef)


def attend_fn(graphdef, restricted: bool):
    """(state, x, cache, write_index, pad_len, resident) -> (residual, normed, new cache, Routing|None).
    Attention + router; `cache` is donated; `resident` [E] bool is used only when restricted."""
    return jitted(_build_attend, graphdef, bool(restricted))


def ffn_fn(graphdef, method: str = "auto"):
    """(state, residual, normed, routing, experts, slot_of_expert) -> layer output: the whole FFN
    (routed experts over the slots + shared experts, or the dense MLP)."""
    return jitted(_build_ffn, graphdef, method)


def finish_waves_fn(graphdef):
    """(state, residual, normed, acc) -> residual + accumulated routed output + shared experts."""
    return jitted(_build_finish_waves, graphdef)


def head_fn(norm_graphdef, proj_graphdef, tied: bool):
    """(norm_state, proj_state, x [B,T,H]) -> final norm + vocabulary projection of the last
    position [B,V] float32."""
    return jitted(_build_head, (norm_graphdef, proj_graphdef), bool(tied))


def embed(graphdef, state, tokens):
    return embed_fn(graphdef)(state, tokens)


def attend(graphdef, state, x, cache, write_index, pad_len, resident, *, restricted):
    """Attention + router. Returns residual, normed [B,T,H], new cache, Routing (or None)."""
    return attend_fn(graphdef, restricted)(state, x, cache, write_index, pad_len, resident)


def ffn(graphdef, state, residual, normed, routing, experts, slot_of_expert, *, method="auto"):
    """Whole FFN of a layer (routed experts over the slots + shared experts, or the dense MLP)."""
    return ffn_fn(graphdef, method)(state, residual, normed, routing, experts, slot_of_expert)


@functools.partial(jax.jit, static_argnames=("method", "act"))
def routed_partial(normed, routing, experts, slot_of_expert, acc, *, method="auto", act=SWIGLU):
    """acc [N,H] += routed experts of one wave (pairs whose expert is not in this wave add 0)."""
    x = normed.reshape(-1, normed.shape[-1])
    return acc + mix_experts(x, routing, experts, slot_of_expert, method, out_dtype=acc.dtype, act=act)


def finish_waves(graphdef, state, residual, normed, acc):
    """Residual + accumulated routed output + shared experts, after the last wave."""
    return finish_waves_fn(graphdef)(state, residual, normed, acc)


def head(norm_graphdef, norm_state, proj_graphdef, proj_state, x, *, tied):
    """Final norm + vocabulary projection of the last position: x [B,T,H] -> [B,V] float32."""
    return head_fn(norm_graphdef, proj_graphdef, tied)(norm_state, proj_state, x)


@jax.jit
def greedy(logits):
    """Greedy pick over logits [B, V] -> [B] int32 (one dispatch instead of eager argmax + cast)."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("top_p_enabled",))
def sample(logits, key, temperature, top_p, *, top_p_enabled):
    """Temperature + nucleus sampling over logits [B, V] -> [B] int32."""
    scaled = logits / temperature
    if top_p_enabled:
        order = jnp.argsort(-scaled, axis=-1)
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p, and always the most probable
        # token (transformers' min_tokens_to_keep=1), so top_p = 0 is the argmax, not -inf
        # everywhere (which sampled token 0). Edges: emoe_jax/sampling.py.
        keep_sorted = ((jnp.cumsum(probs, axis=-1) - probs) < top_p).at[:, 0].set(True)
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        scaled = jnp.where(keep, scaled, -jnp.inf)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
