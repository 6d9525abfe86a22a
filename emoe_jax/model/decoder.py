"""The decoder-only MoE transformer (Flax NNX), split into per-layer stages the runtime can drive.

A decoder layer runs in two stages so the offloaded runtime can make experts
resident between them:
  1. `attend_and_route`: pre-norm attention (+ KV cache write), residual add,
     post-attention norm and, for MoE layers, the router's top-k;
  2. `ffn`: routed experts over the slot buffer + shared experts (or the dense
     FFN), residual add.
`MoETransformer.forward` chains them for the all-resident model in one call.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import MoEConfig
from .attention import GQAttention, MLAttention
from .layers import RMSNorm, make_dense_mlp
from .moe import ExpertSlots, MoEBlock, Routing


class LayerRouting(NamedTuple):
    ids: jax.Array  # [B, T, k] int32
    weights: jax.Array  # [B, T, k] float32


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: MoEConfig, index: int, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.is_moe = index in cfg.moe_layers
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        if cfg.attention == "mla":
            self.self_attn = MLAttention(cfg, dtype=dtype, rngs=rngs)
        else:
            self.self_attn = GQAttention(cfg, dtype=dtype, rngs=rngs, sliding_window=cfg.window_of(index))
        if self.is_moe:
            self.mlp = MoEBlock(cfg, dtype=dtype, rngs=rngs)
        else:
            self.mlp = make_dense_mlp(cfg, dtype=dtype, rngs=rngs)

    def attend_and_route(self, x, cache, write_index, pad_len, resident=None):
        """x [B, T, H] -> (residual [B, T, H], normed [B, T, H], new_cache, Routing over B*T or None)."""
        attn, new_cache = self.self_attn(self.input_layernorm(x), cache, write_index, pad_len)
        residual = x + attn
        normed = self.post_attention_layernorm(residual)
        routing = None
        if self.is_moe:
            routing = self.mlp.route(normed.reshape(-1, normed.shape[-1]), resident)
        return residual, normed, new_cache, routing

    def ffn(self, residual, normed, routing: Routing | None, experts: ExpertSlots | None, slot_of_expert,
            method="auto"):
        b, t, h = normed.shape
        if self.is_moe:
            y = self.mlp.combine(normed.reshape(-1, h), routing, experts, slot_of_expert, method)
            return residual + y.reshape(b, t, h)
        return residual + self.mlp(normed)

    def __call__(self, x, cache, write_index, pad_len, experts=None, slot_of_expert=None, *,
                 restricted=False, method="auto"):
        resident = (slot_of_expert >= 0) if (restricted and self.is_moe) else None
        residual, normed, new_cache, routing = self.attend_and_route(x, cache, write_index, pad_len, resident)
        return self.ffn(residual, normed, routing, experts, slot_of_expert, method), new_cache, routing


class MoETransformer(nnx.Module):
    def __init__(self, cfg: MoEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype=dtype, rngs=rngs) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, param_dtype=dtype,
                                      rngs=rngs)

    def embed(self, tokens: jax.Array) -> jax.Array:
        return self.embed_tokens(tokens)

    def head(self, x: jax.Array) -> jax.Array:
        """Final norm and vocabulary projection: [B, T, H] -> [B, T, V] float32 logits."""
        x = self.norm(x)
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.attend(x).astype(jnp.float32)
        return self.lm_head(x).astype(jnp.float32)

    def forward(self, tokens, caches, write_index, pad_len, experts: Sequence[ExpertSlots],
                slot_maps: jax.Array, *, restricted=False, method="auto"):
        """All layers in one call.

        tokens [B, T] int32; caches: list (one per layer) or None; experts: one
        ExpertSlots per MoE layer; slot_maps [Lm, E] int32.
        Returns logits [B, T, V] float32, new caches, and per-MoE-layer LayerRouting.
        """
        b, t = tokens.shape
        x = self.embed(tokens)
        new_caches, routings = [], []
        moe_index = 0
        for i, layer in enumerate(self.layers):
            cache = None if caches is None else caches[i]
            if layer.is_moe:
                x, cache, routing = layer(x, cache, write_index, pad_len, experts[moe_index],
                                          slot_maps[moe_index], restricted=restricted, method=method)
                routings.append(LayerRouting(routing.ids.reshape(b, t, -1), routing.weights.reshape(b, t, -1)))
                moe_index += 1
            else:
                x, cache, _ = layer(x, cache, write_index, pad_len)
            new_caches.append(cache)
        return self.head(x), (None if caches is None else new_caches), routings


def init_kv_caches(cfg: MoEConfig, batch: int, max_len: int, dtype=jnp.float32) -> list[dict[str, Any]]:
    cls = MLAttention if cfg.attention == "mla" else GQAttention
    return [cls.init_cache(cfg, batch, max_len, dtype) for _ in range(cfg.num_layers)]


def abstract_model(cfg: MoEConfig, dtype=jnp.float32) -> MoETransformer:
    """Shapes-only model (no allocation), for loading weights into."""
    return nnx.eval_shape(lambda: MoETransformer(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
