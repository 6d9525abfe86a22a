"""Random models of any config, for tests, benchmarks and forced-routing replay.

Two ways to fill them, one place: `random_model` runs Flax's initialisers and
jax.random (small models, float32, the tests' reference); `random_dense_params`
and `random_experts` draw bfloat16 bit patterns with NumPy, fast enough for
real shapes (DeepSeek-V2-Lite's 1,664 experts) where routing is forced and the
weights only have to keep activations finite. `scaled_config` gives a preset
with its widths scaled down.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from ..config import PRESETS, ConfigError, MoEConfig
from .decoder import MoETransformer
from .moe import ExpertSlots


def expert_shapes(cfg: MoEConfig) -> tuple[tuple[tuple[int, int, int], ...], tuple[int, int, int]]:
    """Shapes of one MoE layer's stacked gate, up, down ([E, H(+1), I], [E, H(+1), I], [E, I(+1), H]) and their fan-ins.

    gpt-oss's expert biases ride as one extra input row (model.moe.ExpertAct).
    """
    e, h, i, b = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, int(cfg.expert_bias)
    return ((e, h + b, i), (e, h + b, i), (e, i + b, h)), (h, h, i)


def random_model(cfg: MoEConfig, seed: int = 0, dtype=jnp.float32, router_scale: float = 1.0,
                 down_gain: float = 1.0):
    """(graphdef, params, experts) with random weights.

    Router kernels are multiplied by `router_scale`: larger values give peakier,
    better-separated top-k choices (ties would make exact comparisons flaky). Expert down
    projections get std `down_gain` / sqrt(I) (the trainer passes GPT-2's 1/sqrt(2 x layers)).
    """
    model = MoETransformer(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
    if router_scale != 1.0:
        for layer in model.layers:
            if layer.is_moe:
                layer.mlp.gate.kernel[...] = layer.mlp.gate.kernel[...] * router_scale
    graphdef, params = nnx.split(model)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), cfg.num_moe_layers)
    (gate_shape, up_shape, down_shape), fan_in = expert_shapes(cfg)
    experts = []
    for k in keys:
        kg, ku, kd = jax.random.split(k, 3)
        experts.append(ExpertSlots(
            (jax.random.normal(kg, gate_shape) * fan_in[0] ** -0.5).astype(dtype),
            (jax.random.normal(ku, up_shape) * fan_in[1] ** -0.5).astype(dtype),
            (jax.random.normal(kd, down_shape) * (fan_in[2] ** -0.5 * down_gain)).astype(dtype),
        ))
    return graphdef, params, experts


def _scaled(value: int | None, scale: float, multiple: int = 1) -> int | None:
    if value is None or value == 0:
        return value
    return max(multiple, int(round(value * scale / multiple)) * multiple)


def scaled_config(shape: str = "deepseek-v2-lite", scale: float = 0.25, vocab_size: int | None = 4096) -> MoEConfig:
    """A preset with widths scaled by `scale`; depth, experts, top-k and head dims stay real.

    Scaled: hidden size, dense and expert intermediate sizes (shared experts too),
    attention heads (grouping kept), MLA's latent ranks. `vocab_size` replaces
    the vocabulary (None keeps it): the embedding and head are dense weights
    that only cost memory here.
    """
    try:
        base = PRESETS[shape]
    except KeyError:
        raise ConfigError(f"unknown shape {shape!r}; choose one of {', '.join(sorted(PRESETS))}") from None
    if not 0 < scale <= 1:
        raise ConfigError(f"scale must be in (0, 1], got {scale}")
    heads = _scaled(base.num_heads, scale)
    group = base.num_heads // base.num_kv_heads
    kv_heads = max(1, heads // group)  # keep GQA's grouping where the scaled head count allows
    if heads % kv_heads:
        kv_heads = heads
    moe_inter = _scaled(base.moe_intermediate_size, scale, 32)
    shared = 0
    if base.shared_expert_intermediate_size:
        # DeepSeek's shared experts are n x the expert width; keep that ratio exactly.
        ratio = base.shared_expert_intermediate_size / base.moe_intermediate_size
        shared = int(round(ratio * moe_inter)) if float(ratio).is_integer() else _scaled(
            base.shared_expert_intermediate_size, scale, 32)
    changes: dict[str, Any] = dict(
        hidden_size=_scaled(base.hidden_size, scale, 64), intermediate_size=_scaled(base.intermediate_size, scale, 32),
        moe_intermediate_size=moe_inter, shared_expert_intermediate_size=shared,
        num_heads=heads, num_kv_heads=kv_heads,
        kv_lora_rank=_scaled(base.kv_lora_rank, scale, 16), q_lora_rank=_scaled(base.q_lora_rank, scale, 16),
    )
    if vocab_size is not None:
        # The real vocabulary's special ids (100000, ...) would fall outside a reduced one.
        changes.update(vocab_size=vocab_size, bos_token_id=None if base.bos_token_id is None else 1,
                       eos_token_id=None if base.eos_token_id is None else 2,
                       pad_token_id=None if base.pad_token_id is None else 0)
    return base.replace(**changes)


def _random_bf16(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    """Random bfloat16 weights of RMS about fan_in**-0.5, drawn as bit patterns.

    A random sign and mantissa with one fixed exponent give magnitudes uniform in
    [a, 2a) (RMS 1.53a). Normal draws plus a cast took ~40 s for DeepSeek-V2-Lite's
    1,664 experts at scale 1/4 on this CPU; bits, made in place in one buffer, take
    3-12 s, most of it the first touch of 1.8 GB. Routing is forced, so the
    weights' distribution only has to keep activations finite.
    """
    exponent = int(round(math.log2(fan_in ** -0.5 / 1.53)))
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    np.bitwise_and(bits, np.uint16(0x807F), out=bits)  # keep sign and mantissa
    np.bitwise_or(bits, np.uint16((127 + exponent) << 7), out=bits)  # fixed exponent
    return bits.view(ml_dtypes.bfloat16)


def random_experts(cfg: MoEConfig, seed: int = 0, dtype=jnp.bfloat16) -> list[ExpertSlots]:
    """Per MoE layer, all E routed experts as NumPy arrays (gate/up [E, H, I], down [E, I, H])."""
    rng = np.random.default_rng(seed)
    shapes, fan_in = expert_shapes(cfg)
    target = np.dtype(dtype)
    layers = []
    for _ in range(cfg.num_moe_layers):
        w = [_random_bf16(rng, shape, fan) for shape, fan in zip(shapes, fan_in)]
        layers.append(ExpertSlots(*(a if a.dtype == target else a.astype(target) for a in w)))
    return layers


def random_dense_params(cfg: MoEConfig, seed: int = 0, dtype=jnp.bfloat16):
    """(graphdef, params) of a random MoETransformer without running its initialisers.

    Eager Flax init of DeepSeek-V2-Lite's 27 layers takes ~8 s on this CPU whatever
    the width; the structure from `nnx.eval_shape` filled with NumPy draws takes 2-4 s.
    Kernels [in, out] get RMS about in**-0.5, embeddings RMS 1, norm weights 1.
    """
    abstract = nnx.eval_shape(lambda: MoETransformer(cfg, dtype=dtype, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    filled = []
    for path, var in nnx.to_flat_state(state):
        spec = var.get_value()  # ShapeDtypeStruct
        name = path[-1]
        if name == "weight":  # RMSNorm scales
            value = np.ones(spec.shape, np.float32)
        elif name in ("kernel", "embedding"):
            value = _random_bf16(rng, spec.shape, spec.shape[0] if name == "kernel" else 1)
        elif name in ("bias", "sinks", "e_score_correction_bias"):  # biases, sinks, the router's correction: neutral
            value = np.zeros(spec.shape, np.float32)
        else:
            raise ConfigError(f"random_dense_params does not know how to fill parameter {'/'.join(map(str, path))}")
        filled.append((path, var.replace(jnp.asarray(value, spec.dtype))))
    return graphdef, nnx.from_flat_state(filled)
