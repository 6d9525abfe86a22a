"""Every expert of every MoE layer in host memory, as one stacked array per layer and weight.

The one-jit decode step (`onejit.py`) reads missed experts from these stacks inside
the compiled step: `lax.dynamic_index_in_dim(stack, expert)` followed at once by
`jax.device_put(..., jax.memory.Space.Device)`, the form XLA's host offloader
turns into a DMA of one expert on GPU/TPU. The stacks therefore live in the
`pinned_host` memory kind (CPU has it too, so the same path is tested here).

`StackedHostTier` is the host tier over these stacks: the staged engine (prefill,
fallback steps) and the prefetch worker read the same single host copy, so the
experts are held in host memory once, not once per path.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding
from tqdm.auto import tqdm

from ..model.moe import ExpertSlots
from .tiers import WEIGHTS, ExpertSource, HostTier, TierStats

PINNED = "pinned_host"


def has_pinned_host(device: jax.Device) -> bool:
    return PINNED in {m.kind for m in device.addressable_memories()}


@jax.jit
def _slice_to_device(stacks: ExpertSlots, expert):
    """One expert of a layer's host stacks, copied to the device (slice + device_put only)."""
    return ExpertSlots(*(jax.device_put(jax.lax.dynamic_index_in_dim(a, expert, keepdims=False),
                                        jax.memory.Space.Device) for a in stacks))


def _read_layer(source: ExpertSource, layer: int, num_experts: int) -> dict[str, np.ndarray]:
    """All experts of one layer, read in one batch; the disk tier checks each against its crc32."""
    parts = [f.result() for f in source.read_async([(layer, e) for e in range(num_experts)])]
    return {w: np.stack([p[w] for p in parts]) for w in WEIGHTS}


class HostExpertStacks:
    """Per MoE layer `ExpertSlots` gate/up [E, H, I], down [E, I, H] in `pinned_host` memory."""

    def __init__(self, source: ExpertSource, num_moe_layers: int, num_experts: int, dtype,
                 device: jax.Device | None = None, progress: bool | None = None):
        self.device = device or jax.devices()[0]
        if not has_pinned_host(self.device):
            raise ValueError(f"{self.device.platform} device {self.device} has no pinned_host memory kind")
        sharding = SingleDeviceSharding(self.device, memory_kind=PINNED)
        self.layers: list[ExpertSlots] = []
        self.bytes_read = 0
        total = source.expert_bytes * num_experts * num_moe_layers
        bar = tqdm(range(num_moe_layers), desc="experts -> pinned host", unit="layer", leave=False,
                   disable=(total < 2**30) if progress is None else not progress)  # a bar only for long loads
        for layer in bar:
            arrays = _read_layer(source, layer, num_experts)
            self.bytes_read += sum(a.nbytes for a in arrays.values())
            self.layers.append(ExpertSlots(*(jax.device_put(np.asarray(arrays[w], dtype=jnp.dtype(dtype)), sharding)
                                             for w in WEIGHTS)))
        self.num_experts = num_experts

    def to_device(self, layer: int, expert: int) -> ExpertSlots:
        return _slice_to_device(self.layers[layer], np.int32(expert))


class StackedHostTier(HostTier):
    """The host tier when it holds every expert: a view of `HostExpertStacks`.

    `get_many`/`peek` hand out device copies sliced from the stacks (the device
    tier's `to_device` passes device arrays through). Every access is a hit; the
    one-time load from the disk tier is charged once, to the stats of the first
    generate call (`count_load`)."""

    def __init__(self, stacks: HostExpertStacks, source: ExpertSource):
        self.source, self.stacks = source, stacks
        self.capacity = len(stacks.layers) * stacks.num_experts
        self.device = stacks.device
        self.memory_kind = PINNED
        self.stats = TierStats()
        self._load_pending = True

    def count_load(self) -> None:
        """Charge the initial fill to the current stats once (disk -> host of every expert)."""
        if self._load_pending:
            self.stats.misses += self.capacity
            self.stats.bytes_in += self.stacks.bytes_read
            self._load_pending = False

    def _get(self, key) -> dict:
        self.stats.hits += 1
        return dict(zip(WEIGHTS, self.stacks.to_device(*key)))

    def get_many(self, keys: Sequence[tuple[int, int]], protected: Iterable[tuple[int, int]] = ()) -> list[dict]:
        return [self._get(k) for k in keys]

    def peek(self, key):
        return self._get(key)

    def add(self, key, arrays):
        return self._get(key)

    def __contains__(self, key) -> bool:
        return True

    def __len__(self) -> int:
        return self.capacity


__all__ = ["HostExpertStacks", "StackedHostTier", "has_pinned_host"]
