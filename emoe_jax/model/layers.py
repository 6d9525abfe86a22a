"""Building blocks shared by every family: RMSNorm, rotary embeddings, SwiGLU MLP.

Numerics follow the reference `transformers` implementations so parity holds at
float32 tolerance: RMSNorm normalises in float32 and casts back before scaling,
RoPE frequencies are computed in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import MoEConfig, RopeConfig


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)


class SwiGLU(nnx.Module):
    """Dense gated MLP: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts."""

    def __init__(self, hidden: int, inner: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        lin = dict(use_bias=False, param_dtype=dtype, rngs=rngs)
        self.gate_proj = nnx.Linear(hidden, inner, **lin)
        self.up_proj = nnx.Linear(hidden, inner, **lin)
        self.down_proj = nnx.Linear(inner, hidden, **lin)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


# ---------------------------------------------------------------------------
# Rotary position embeddings
# ---------------------------------------------------------------------------

def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(rope: RopeConfig, dim: int) -> tuple[jax.Array, float]:
    """Inverse frequencies [dim/2] and the cos/sin scale factor (YaRN's attention factor)."""
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    pos_freqs = rope.theta ** exponents
    if rope.kind == "default":
        return 1.0 / pos_freqs, 1.0
    # YaRN, as transformers' _compute_yarn_parameters.
    factor = rope.factor
    if rope.attention_factor is not None:
        attention_factor = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
            2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:  # whole dimensions (transformers' default); gpt-oss keeps the fractions
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (1.0 / pos_freqs) * extrapolation_factor
    return inv_freq, attention_factor


def rope_cos_sin(rope: RopeConfig, dim: int, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, T, dim/2] (float32) for integer positions [B, T]."""
    inv_freq, scale = rope_inv_freq(rope, dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, dim/2]
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, interleaved: bool) -> jax.Array:
    """Rotate x [B, T, N, D] by cos/sin [B, T, D/2].

    interleaved=False rotates halves (x[:D/2], x[D/2:]) as Llama-style models do;
    interleaved=True rotates adjacent pairs (x0,x1),(x2,x3)... as DeepSeek-V2's
    complex-number formulation does.
    """
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.astype(jnp.float32)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1).reshape(x.shape)
    else:
        half = x.shape[-1] // 2
        x1, x2 = xf[..., :half], xf[..., half:]
        out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out.astype(x.dtype)


def make_dense_mlp(cfg: MoEConfig, *, dtype, rngs: nnx.Rngs) -> SwiGLU:
    return SwiGLU(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)
