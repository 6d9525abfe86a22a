"""Attention with an explicit KV cache: grouped-query (Mixtral, Qwen, OLMoE, gpt-oss) and MLA (DeepSeek-V2).

Batches are left-padded so that every sequence writes its new keys at the same
cache index (`write_index`): the cache keeps static shapes and one compiled
function serves every step. Sequence b has `pad_len[b]` padding slots at the
start; its token positions are `index - pad_len[b]`.

Steps of a call:
  1. project the new tokens to queries and keys/values (MLA: to the compressed
     latent and the shared rotary key, which is what the cache stores);
  2. apply RoPE at the tokens' positions;
  3. write the new keys/values into the cache at `write_index`;
  4. attend over the whole cache with a mask that hides padding and the future (and, in
     sliding-window layers, keys `sliding_window` or more positions back); gpt-oss's sinks join
     the softmax as one extra logit per head.
The cache keeps every position even in sliding-window layers (a ring buffer would save memory
for long contexts; the mask alone gives exact results).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import MoEConfig
from .layers import RMSNorm, apply_rope, rope_cos_sin


def attention_mask(q_len: int, kv_len: int, write_index: jax.Array, pad_len: jax.Array,
                   window: int | None = None) -> jax.Array:
    """[B, 1, T, S] bool: query t (absolute index write_index + t) may see key j.

    window: sliding-window length; key j is visible only when q - window < j (the query and its
    window - 1 predecessors), as transformers' `sliding_window_overlay`. Padding is contiguous at
    the start, so cache-index distance equals position distance for real tokens."""
    q_idx = write_index + jnp.arange(q_len)  # [T]
    k_idx = jnp.arange(kv_len)  # [S]
    causal = k_idx[None, :] <= q_idx[:, None]  # [T, S]
    if window is not None:
        causal = causal & (k_idx[None, :] > q_idx[:, None] - window)
    not_pad = k_idx[None, :] >= pad_len[:, None]  # [B, S]
    return (causal[None] & not_pad[:, None, :])[:, None]


def positions_for(q_len: int, write_index: jax.Array, pad_len: jax.Array) -> jax.Array:
    """[B, T] int32 rotary positions of the new tokens."""
    return jnp.maximum(write_index + jnp.arange(q_len)[None, :] - pad_len[:, None], 0).astype(jnp.int32)


def _softmax_attend(q, k, v, mask, scale, sinks=None):
    """q [B,T,N,Dq], k [B,S,N,Dq], v [B,S,N,Dv], mask [B,1,T,S] -> [B,T,N,Dv].

    sinks: optional [N] logits (gpt-oss) that join each head's softmax as one extra key with no
    value: probabilities are softmax([scores, sink]) with the sink's share dropped."""
    scores = jnp.einsum("BTND,BSND->BNTS", q, k).astype(jnp.float32) * scale
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    if sinks is None:
        probs = jax.nn.softmax(scores, axis=-1)
    else:
        sink = jnp.broadcast_to(sinks.astype(jnp.float32)[None, :, None, None], scores.shape[:-1] + (1,))
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
    return jnp.einsum("BNTS,BSND->BTND", probs.astype(v.dtype), v)


def _write(cache: jax.Array, new: jax.Array, write_index: jax.Array) -> jax.Array:
    """Write new [B, T, ...] into cache [B, S, ...] at sequence index write_index."""
    start = (0, write_index) + (0,) * (cache.ndim - 2)
    return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), start)


class GQAttention(nnx.Module):
    def __init__(self, cfg: MoEConfig, *, dtype, rngs: nnx.Rngs, sliding_window: int | None = None):
        self.cfg = cfg
        self.sliding_window = sliding_window  # this layer's window (None: full attention)
        n, kv, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        lin = dict(param_dtype=dtype, rngs=rngs)
        self.q_proj = nnx.Linear(h, n * d, use_bias=cfg.qkv_bias, **lin)
        self.k_proj = nnx.Linear(h, kv * d, use_bias=cfg.qkv_bias, **lin)
        self.v_proj = nnx.Linear(h, kv * d, use_bias=cfg.qkv_bias, **lin)
        self.o_proj = nnx.Linear(n * d, h, use_bias=cfg.o_proj_bias, **lin)
        if cfg.attention_sinks:
            self.sinks = nnx.Param(jnp.zeros((n,), dtype))
        if cfg.qk_norm == "head":  # Qwen3: per head, after the reshape
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype)
        elif cfg.qk_norm == "full":  # OLMoE: over all heads, before the reshape
            self.q_norm = RMSNorm(n * d, cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(kv * d, cfg.rms_norm_eps, dtype=dtype)

    @staticmethod
    def init_cache(cfg: MoEConfig, batch: int, max_len: int, dtype) -> dict:
        shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def __call__(self, x, cache, write_index, pad_len):
        cfg = self.cfg
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:
            q, k, v = (jnp.clip(a, -cfg.clip_qkv, cfg.clip_qkv) for a in (q, k, v))
        q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        rd = cfg.rotary_dim  # GLM-4.5 rotates the first half of each head; the rest passes through
        cos, sin = rope_cos_sin(cfg.rope, rd, positions_for(t, write_index, pad_len))
        q = jnp.concatenate([apply_rope(q[..., :rd], cos, sin, cfg.rope.interleaved), q[..., rd:]], axis=-1)
        k = jnp.concatenate([apply_rope(k[..., :rd], cos, sin, cfg.rope.interleaved), k[..., rd:]], axis=-1)
        if cache is None:  # training / one-shot forward: attend over the new tokens only
            keys, values, new_cache = k, v, None
        else:
            new_cache = {"k": _write(cache["k"], k, write_index), "v": _write(cache["v"], v, write_index)}
            keys, values = new_cache["k"], new_cache["v"]
        rep = cfg.num_heads // cfg.num_kv_heads
        keys, values = jnp.repeat(keys, rep, axis=2), jnp.repeat(values, rep, axis=2)
        mask = attention_mask(t, keys.shape[1], write_index, pad_len, self.sliding_window)
        sinks = self.sinks[...] if cfg.attention_sinks else None
        out = _softmax_attend(q, keys, values, mask, cfg.head_dim ** -0.5, sinks)
        return self.o_proj(out.reshape(b, t, -1)), new_cache


class MLAttention(nnx.Module):
    """DeepSeek-V2 multi-head latent attention. The cache holds the normalised
    latent [B, S, kv_lora_rank] and the rotary key [B, S, rope_dim], as transformers does."""

    def __init__(self, cfg: MoEConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        h, n = cfg.hidden_size, cfg.num_heads
        lin = dict(param_dtype=dtype, rngs=rngs)
        if cfg.q_lora_rank is None:
            self.q_proj = nnx.Linear(h, n * cfg.qk_head_dim, use_bias=False, **lin)
        else:
            self.q_a_proj = nnx.Linear(h, cfg.q_lora_rank, use_bias=cfg.qkv_bias, **lin)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6, dtype=dtype)
            self.q_b_proj = nnx.Linear(cfg.q_lora_rank, n * cfg.qk_head_dim, use_bias=False, **lin)
        self.kv_a_proj_with_mqa = nnx.Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                             use_bias=cfg.qkv_bias, **lin)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, 1e-6, dtype=dtype)
        self.kv_b_proj = nnx.Linear(cfg.kv_lora_rank, n * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                    use_bias=False, **lin)
        self.o_proj = nnx.Linear(n * cfg.v_head_dim, h, use_bias=cfg.qkv_bias, **lin)
        scale = cfg.qk_head_dim ** -0.5
        if cfg.rope.kind == "yarn" and cfg.rope.mscale_all_dim:
            from .layers import _yarn_mscale

            m = _yarn_mscale(cfg.rope.factor, cfg.rope.mscale_all_dim)
            scale = scale * m * m
        self.scale = scale

    @staticmethod
    def init_cache(cfg: MoEConfig, batch: int, max_len: int, dtype) -> dict:
        return {"latent": jnp.zeros((batch, max_len, cfg.kv_lora_rank), dtype),
                "k_pe": jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), dtype)}

    def __call__(self, x, cache, write_index, pad_len):
        cfg = self.cfg
        b, t, _ = x.shape
        n, dn, dr, dv = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        if cfg.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(b, t, n, dn + dr)
        q_nope, q_pe = q[..., :dn], q[..., dn:]
        compressed = self.kv_a_proj_with_mqa(x)  # [B, T, R + Dr]
        latent = self.kv_a_layernorm(compressed[..., : cfg.kv_lora_rank])  # [B, T, R]
        k_pe = compressed[..., cfg.kv_lora_rank:][:, :, None, :]  # [B, T, 1, Dr]
        cos, sin = rope_cos_sin(cfg.rope, dr, positions_for(t, write_index, pad_len))
        q_pe = apply_rope(q_pe, cos, sin, cfg.rope.interleaved)
        k_pe = apply_rope(k_pe, cos, sin, cfg.rope.interleaved)[:, :, 0]  # [B, T, Dr]
        if cache is None:
            all_latent, all_k_pe, new_cache = latent, k_pe, None
        else:
            new_cache = {"latent": _write(cache["latent"], latent, write_index),
                         "k_pe": _write(cache["k_pe"], k_pe, write_index)}
            all_latent, all_k_pe = new_cache["latent"], new_cache["k_pe"]
        s = all_latent.shape[1]
        kv = self.kv_b_proj(all_latent).reshape(b, s, n, dn + dv)
        k_nope, values = kv[..., :dn], kv[..., dn:]
        keys = jnp.concatenate([k_nope, jnp.broadcast_to(all_k_pe[:, :, None, :], (b, s, n, dr))], axis=-1)
        queries = jnp.concatenate([q_nope, q_pe], axis=-1)
        mask = attention_mask(t, s, write_index, pad_len)
        out = _softmax_attend(queries, keys, values, mask, self.scale)
        return self.o_proj(out.reshape(b, t, -1)), new_cache
