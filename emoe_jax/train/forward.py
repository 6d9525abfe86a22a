"""The training forward pass: the same layers the inference engine runs, plus router statistics.

Steps of `train_forward`:
  1. merge the graph definition with the dense parameters (the pure State we
     differentiate) and embed the tokens;
  2. per decoder layer: `attend_and_route` (no KV cache, no padding), and for MoE
     layers also the full router probabilities (for the balancing loss) from
     `router_logits` of the same normed input;
  3. the routed experts come from the separate `experts` pytree (one
     `ExpertSlots` per MoE layer, slot e = expert e) and are mixed with an exact
     kernel (`mix_blocked_slots` by default; no capacity, no dropped tokens), so the
     trained function is exactly the one the engine serves;
  4. final norm + LM head -> float32 logits.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from emoe_jax.model.moe import ExpertSlots, SlotRouting, mix_blocked_slots, mix_experts

MIX_METHODS = ("blocked", "sorted", "gather", "reference")


class RouterStats(NamedTuple):
    """Per MoE layer: what the balancing and z-losses need."""

    logits: jax.Array  # [Lm, N, E] float32 router logits
    ids: jax.Array  # [Lm, N, k] int32 chosen experts


def moe_output(layer, normed_flat: jax.Array, routing, experts: ExpertSlots, method: str) -> jax.Array:
    """Routed experts (+ shared experts, as `MoEBlock.combine`) for normed tokens [N, H]."""
    if method == "blocked":
        out = mix_blocked_slots(normed_flat, SlotRouting(routing.ids, routing.weights), experts)  # slot e = expert e
    else:
        identity = jnp.arange(experts.gate.shape[0], dtype=jnp.int32)
        out = mix_experts(normed_flat, routing, experts, identity, method)
    return layer.mlp.add_shared(normed_flat, out)


def train_forward(graphdef, params, experts: Sequence[ExpertSlots], tokens: jax.Array,
                  method: str = "blocked") -> tuple[jax.Array, RouterStats]:
    """tokens [B, T] int32 -> logits [B, T, V] float32 and RouterStats over the B*T tokens."""
    if method not in MIX_METHODS:
        raise ValueError(f"unknown mixing method {method!r}; choose one of {', '.join(MIX_METHODS)}")
    model = nnx.merge(graphdef, params)
    b, t = tokens.shape
    x = model.embed(tokens)
    pad_len = jnp.zeros((b,), jnp.int32)
    router_logits, router_ids = [], []
    moe_index = 0
    for layer in model.layers:
        residual, normed, _, routing = layer.attend_and_route(x, None, jnp.int32(0), pad_len)
        if layer.is_moe:
            flat = normed.reshape(b * t, -1)
            router_logits.append(layer.mlp.router_logits(flat))
            router_ids.append(routing.ids)
            x = residual + moe_output(layer, flat, routing, experts[moe_index], method).reshape(b, t, -1)
            moe_index += 1
        else:
            x = layer.ffn(residual, normed, None, None, None)
    stats = RouterStats(jnp.stack(router_logits), jnp.stack(router_ids))
    return model.head(x), stats
