"""Tiny random models shared by the engine tests (built once per process)."""

from emoe_jax.config import tiny_config
from emoe_jax.model.random_init import random_model
from emoe_jax.model.resident import ResidentModel

_MODELS = {}


def model(family):
    """(cfg, graphdef, params, experts, all-resident reference) of a tiny random `family` model."""
    if family not in _MODELS:
        cfg = tiny_config(family, num_layers=2 if family != "deepseek_v2" else 3)
        g, p, ex = random_model(cfg, seed=0, router_scale=5.0)
        _MODELS[family] = (cfg, g, p, ex, ResidentModel(cfg, g, p, ex))
    return _MODELS[family]
