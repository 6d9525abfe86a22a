"""Disk -> host -> device tiers, each with a budget and counters.

- `InMemoryExperts` is a stand-in for the disk tier (the converted TensorStore
  `ExpertStore` has the same read API) for tests and models built in memory.
- `HostTier` keeps up to `capacity` experts in host memory, in `pinned_host`
  memory where the backend offers it (so the host->device copy is a DMA), and
  otherwise as NumPy arrays. It is for slice-and-move only: nothing computes on it.
- `DeviceSlotCache` holds S slots per MoE layer as static-shape device buffers
  [S, ...]. Loading an expert writes one slot in place with a donated jitted
  `dynamic_update_index_in_dim` and updates the expert->slot table; no shape
  ever changes, so nothing recompiles.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from typing import Iterable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from ..model.moe import ExpertSlots
from .policies import EvictionPolicy, make_policy

WEIGHTS = ("gate", "up", "down")


class ExpertSource(Protocol):
    """What the runtime needs from the disk tier (`emoe_jax.checkpoint.ExpertStore`)."""

    @property
    def expert_bytes(self) -> int: ...

    def read(self, layer: int, expert: int) -> dict[str, np.ndarray]: ...

    def read_async(self, items: Iterable[tuple[int, int]]) -> list: ...


@dataclasses.dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    bytes_in: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "hit_rate": self.hit_rate}


class _Done:
    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


class InMemoryExperts:
    """Experts held as NumPy arrays, per MoE layer: the disk tier for tests."""

    def __init__(self, experts: Sequence[ExpertSlots]):
        self._layers = [{w: np.asarray(a) for w, a in zip(WEIGHTS, e)} for e in experts]
        self.reads = 0
        self.bytes_read = 0

    @property
    def expert_bytes(self) -> int:
        return sum(a[0].nbytes for a in self._layers[0].values())

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def num_experts(self) -> int:
        return self._layers[0]["gate"].shape[0]

    def read(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        self.reads += 1
        self.bytes_read += self.expert_bytes
        return {w: a[expert] for w, a in self._layers[layer].items()}

    def read_async(self, items):
        return [_Done(self.read(layer, e)) for layer, e in items]


def host_memory_kind(device: jax.Device) -> str | None:
    kinds = {m.kind for m in device.addressable_memories()}
    return "pinned_host" if "pinned_host" in kinds else None


class HostTier:
    """Up to `capacity` experts (over all layers) in host memory, evicted by `policy`."""

    def __init__(self, source: ExpertSource, capacity: int, policy: str = "lru",
                 device: jax.Device | None = None, use_pinned: bool = True):
        if capacity < 1:
            raise ValueError("host tier capacity must be at least one expert")
        self.source, self.capacity = source, capacity
        self.policy: EvictionPolicy = make_policy(policy)
        self.device = device or jax.devices()[0]
        kind = host_memory_kind(self.device) if use_pinned else None
        # On CPU the "device" is host memory already; pinning buys nothing there.
        self.memory_kind = kind if self.device.platform != "cpu" else None
        self._sharding = SingleDeviceSharding(self.device, memory_kind=self.memory_kind) if self.memory_kind else None
        self._store: dict[tuple[int, int], dict] = {}
        self.stats = TierStats()

    def _place(self, arrays: dict[str, np.ndarray]) -> dict:
        if self._sharding is None:
            return arrays
        return {w: jax.device_put(a, self._sharding) for w, a in arrays.items()}

    def get_many(self, keys: Sequence[tuple[int, int]], protected: Iterable[tuple[int, int]] = ()) -> list[dict]:
        """Host copies of experts `keys`; misses are read from the source in one batch."""
        protected = set(keys) | set(protected)
        missing = [k for k in dict.fromkeys(keys) if k not in self._store]
        for k in keys:
            if k in self._store:
                self.stats.hits += 1
                self.policy.touch(k)
        if missing:
            self.stats.misses += len(missing)
            futures = self.source.read_async(missing)
            for key, fut in zip(missing, futures):
                arrays = fut.result()
                self.stats.bytes_in += sum(a.nbytes for a in arrays.values())
                self._insert(key, self._place(arrays), protected)
        out = [self._store.get(k) for k in keys]
        if any(o is None for o in out):  # capacity smaller than one request: serve directly
            out = [o if o is not None else self._place(self.source.read(*k)) for o, k in zip(out, keys)]
        return out

    def peek(self, key: tuple[int, int]) -> dict | None:
        """The host copy of `key` if held (counted as a hit), else None (not counted)."""
        arrays = self._store.get(key)
        if arrays is not None:
            self.stats.hits += 1
            self.policy.touch(key)
        return arrays

    def add(self, key: tuple[int, int], arrays: dict[str, np.ndarray]) -> dict:
        """Cache a copy read from the source by someone else (the prefetcher); counted as a miss."""
        if key in self._store:
            return self._store[key]
        self.stats.misses += 1
        self.stats.bytes_in += sum(a.nbytes for a in arrays.values())
        placed = self._place(arrays)
        self._insert(key, placed, ())
        return placed

    def _insert(self, key, arrays, protected):
        while len(self._store) >= self.capacity:
            try:
                victim = self.policy.victim(protected)
            except LookupError:
                return  # everything resident is needed now; serve this one without caching
            self.policy.remove(victim)
            del self._store[victim]
            self.stats.evictions += 1
        self._store[key] = arrays
        self.policy.insert(key)

    def __contains__(self, key) -> bool:
        return key in self._store

    def __len__(self) -> int:
        return len(self._store)


@functools.partial(jax.jit, donate_argnums=0)
def _write_slot(slots: ExpertSlots, gate, up, down, slot):
    """Write one expert into slot `slot` of the layer's buffers, in place (donated)."""
    put = lambda buf, w: jax.lax.dynamic_update_index_in_dim(buf, w.astype(buf.dtype), slot, 0)  # noqa: E731
    return ExpertSlots(put(slots.gate, gate), put(slots.up, up), put(slots.down, down))


class DeviceSlotCache:
    """S_l device slots per MoE layer l, with an expert->slot table and per-layer eviction."""

    def __init__(self, num_moe_layers: int, num_experts: int, slots: int | Sequence[int], hidden: int, inter: int,
                 dtype, policy: str = "lru", device: jax.Device | None = None, bias: bool = False):
        self.num_moe_layers, self.num_experts = num_moe_layers, num_experts
        # Slots per layer: one S for all layers, or one per layer (each distinct S compiles once).
        self.slots = [slots] * num_moe_layers if isinstance(slots, int) else list(slots)
        self.device = device or jax.devices()[0]
        sharding = SingleDeviceSharding(self.device)
        # Allocated once with jnp.zeros on the device (not from NumPy), then only updated in place.
        # bias (gpt-oss): gate/up [H+1, I], down [I+1, H], the bias as an extra row (model.moe.ExpertAct).
        b = int(bias)
        self.buffers = [ExpertSlots(jnp.zeros((s, hidden + b, inter), dtype, device=sharding),
                                    jnp.zeros((s, hidden + b, inter), dtype, device=sharding),
                                    jnp.zeros((s, inter + b, hidden), dtype, device=sharding))
                        for s in self.slots]
        self.slot_of_expert = np.full((num_moe_layers, num_experts), -1, np.int32)  # [Lm, E]
        self.expert_in_slot = [np.full(s, -1, np.int32) for s in self.slots]  # per layer [S_l]
        self.policies = [make_policy(policy) for _ in range(num_moe_layers)]
        self.stats = TierStats()
        self._device_maps: list[jax.Array | None] = [None] * num_moe_layers  # cached device copies of the table
        self.slot_bytes = (3 * hidden * inter + b * (2 * inter + hidden)) * jnp.dtype(dtype).itemsize
        # Optional emulated host->device link (GB/s): each copy also holds one serial link for
        # bytes / bandwidth. For CPU runs that model a PCIe-class link; None = the real copy only.
        self.link_gbps: float | None = None
        self._link = threading.Condition()  # guards _link_busy and _demand_waiting
        self._link_busy = False
        self._demand_waiting = 0

    @property
    def device_bytes(self) -> int:
        return self.slot_bytes * sum(self.slots)

    def device_slot_map(self, layer: int) -> jax.Array:
        """[E] int32 expert->slot table of `layer` on the device, re-uploaded only after it changed."""
        if self._device_maps[layer] is None:
            self._device_maps[layer] = jnp.asarray(self.slot_of_expert[layer])
        return self._device_maps[layer]

    def resident(self, layer: int) -> np.ndarray:
        """[E] bool: which experts of `layer` are in a slot."""
        return self.slot_of_expert[layer] >= 0

    def lookup(self, layer: int, experts: Iterable[int], late: Iterable[int] = ()) -> list[int]:
        """Count hits/misses for `experts` and return the missing ones. Experts in `late` (a
        prefetch the step had to wait for) count as misses even if they are resident now."""
        missing, late = [], set(late)
        for e in experts:
            if e in late:
                self.stats.misses += 1
                if self.slot_of_expert[layer, e] >= 0:
                    self.policies[layer].touch(int(e))
                else:
                    missing.append(int(e))
            elif self.slot_of_expert[layer, e] >= 0:
                self.stats.hits += 1
                self.policies[layer].touch(int(e))
            else:
                self.stats.misses += 1
                missing.append(int(e))
        return missing

    def free_slot(self, layer: int, protected: Iterable[int]) -> int:
        """An empty slot, or one freed by evicting the policy's victim (never a protected expert)."""
        empty = np.flatnonzero(self.expert_in_slot[layer] < 0)
        if empty.size:
            return int(empty[0])
        victim = int(self.policies[layer].victim(protected))
        slot = int(self.slot_of_expert[layer, victim])
        self.policies[layer].remove(victim)
        self.slot_of_expert[layer, victim] = -1
        self._device_maps[layer] = None
        self.expert_in_slot[layer][slot] = -1
        self.stats.evictions += 1
        return slot

    def to_device(self, weights: dict, demand: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Host->device copies of one expert's (gate, up, down); asynchronous until waited on.
        `demand=False` (prefetches) yields the emulated link to any waiting demand fetch."""
        dev = SingleDeviceSharding(self.device)
        arrays = tuple(jax.device_put(weights[w], dev) for w in WEIGHTS)
        if self.link_gbps:
            self._emulated_link(demand)
        return arrays

    def _emulated_link(self, demand: bool) -> None:
        """One serial link: copies queue behind each other, demand fetches before prefetches."""
        with self._link:
            self._demand_waiting += demand
            while self._link_busy or (not demand and self._demand_waiting):
                self._link.wait()
            self._demand_waiting -= demand
            self._link_busy = True
        try:
            time.sleep(self.slot_bytes / (self.link_gbps * 1e9))
        finally:
            with self._link:
                self._link_busy = False
                self._link.notify_all()

    def load(self, layer: int, expert: int, weights: dict, protected: Iterable[int] = ()) -> int:
        """Make `expert` resident from host `weights`; returns its slot."""
        if self.slot_of_expert[layer, expert] >= 0:
            return int(self.slot_of_expert[layer, expert])
        return self.install(layer, expert, self.to_device(weights), protected)

    def install(self, layer: int, expert: int, device_weights, protected: Iterable[int] = ()) -> int:
        """Write an expert already on the device (`to_device`) into a slot; raises LookupError
        when every slot holds a protected expert."""
        if self.slot_of_expert[layer, expert] >= 0:
            return int(self.slot_of_expert[layer, expert])
        slot = self.free_slot(layer, protected)
        g, u, d = device_weights
        self.buffers[layer] = _write_slot(self.buffers[layer], g, u, d, np.int32(slot))  # numpy: no eager op per swap
        self.stats.bytes_in += self.slot_bytes
        self.slot_of_expert[layer, expert] = slot
        self._device_maps[layer] = None
        self.expert_in_slot[layer][slot] = expert
        self.policies[layer].insert(expert)
        return slot

    def evict_all(self, layer: int) -> None:
        for e in np.flatnonzero(self.slot_of_expert[layer] >= 0):
            self.policies[layer].remove(int(e))
        self.slot_of_expert[layer] = -1
        self._device_maps[layer] = None
        self.expert_in_slot[layer][:] = -1
