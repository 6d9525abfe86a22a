"""What observers and routing overrides see of one step at one MoE layer."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np


@dataclasses.dataclass
class StepRouting:
    """Routing of one step at one MoE layer, handed to trace recorders."""

    moe_layer: int
    ids: np.ndarray  # [B, T, k] int32
    weights: np.ndarray  # [B, T, k] float32
    valid: np.ndarray  # [B, T] bool: real tokens (not padding)
    router_input: jax.Array | None  # [B, T, H] normed hidden state the router saw (device)
    positions: np.ndarray | None = None  # [B, T] int: index of each token in its prompt (-1: padding)


# A routing override sees a step's routing and returns replacement (ids, weights), both [B, T, k],
# or None to keep it: forced-routing replay of traces and sensitivity profiling use it.
RoutingOverride = Callable[[StepRouting], "tuple[np.ndarray, np.ndarray] | None"]


__all__ = ["StepRouting", "RoutingOverride"]
