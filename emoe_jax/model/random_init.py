"""Random models of any config, for tests, benchmarks and forced-routing replay."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import MoEConfig
from .decoder import MoETransformer
from .moe import ExpertSlots


def random_model(cfg: MoEConfig, seed: int = 0, dtype=jnp.float32, router_scale: float = 1.0):
    """(graphdef, params, experts) with random weights.

    Router kernels are multiplied by `router_scale`: larger values give peakier,
    better-separated top-k choices (ties would make exact comparisons flaky).
    """
    model = MoETransformer(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
    if router_scale != 1.0:
        for layer in model.layers:
            if layer.is_moe:
                layer.mlp.gate.kernel[...] = layer.mlp.gate.kernel[...] * router_scale
    graphdef, params = nnx.split(model)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), cfg.num_moe_layers)
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    b = int(cfg.expert_bias)  # biases ride as one extra input row (model.moe.ExpertAct)
    experts = []
    for k in keys:
        kg, ku, kd = jax.random.split(k, 3)
        experts.append(ExpertSlots(
            (jax.random.normal(kg, (e, h + b, i)) * h ** -0.5).astype(dtype),
            (jax.random.normal(ku, (e, h + b, i)) * h ** -0.5).astype(dtype),
            (jax.random.normal(kd, (e, i + b, h)) * i ** -0.5).astype(dtype),
        ))
    return graphdef, params, experts
