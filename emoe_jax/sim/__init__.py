"""Trace replay with a transfer-time cost model (``python -m emoe_jax.sim``)."""

from emoe_jax.sim.config import SimConfig, SimConfigError
from emoe_jax.sim.simulate import SimResult, simulate
from emoe_jax.traces.split import split_by_prompt_id

__all__ = ["SimConfig", "SimConfigError", "SimResult", "simulate", "split_by_prompt_id"]
