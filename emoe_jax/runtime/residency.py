"""Residency: where every expert of one engine is, and the lock that guards it.

One object owns the state that the decoding thread, the prefetch worker and the
one-jit step all change:
  - the host tier: a `HostTier` (an LRU-bounded cache over the disk tier), or, when
    every expert fits in host memory and the backend has a `pinned_host` memory
    kind, a `StackedHostTier` over one stacked array per layer and weight
    (`host_layers`), the arrays the one-jit step fetches from in-graph;
  - the device slot cache (`DeviceSlotCache`: slot buffers, expert->slot and
    slot->expert tables, one eviction policy per MoE layer);
  - `lock`, held by whoever reads or writes either of them.

It makes experts resident for the staged path (`make_resident`, `preload`) and
hands the device cache to the one-jit step as per-layer `SlotState`s and takes it
back (`to_slot_states` / `from_slot_states`), so both paths continue from the same
residency.
"""

from __future__ import annotations

import threading
import time
from typing import Sequence

import jax
import numpy as np

from .host_stack import HostExpertStacks, StackedHostTier
from .onejit import SlotState
from .prefetch import Prefetcher, wait_for
from .tiers import DeviceSlotCache, ExpertSource, HostTier, TierStats


class Residency:
    def __init__(self, source: ExpertSource, *, num_moe_layers: int, num_experts: int, slots: Sequence[int],
                 hidden: int, inter: int, dtype, policy: str = "lru", host_capacity: int, host_policy: str = "lru",
                 link_gbps: float | None = None, stack_host: bool = False, device: jax.Device | None = None,
                 expert_bias: bool = False):
        """slots: device slots per MoE layer; host_capacity: experts (all layers) the host tier holds;
        stack_host: keep every expert in pinned host stacks (needs host_capacity == all experts);
        expert_bias: experts carry biases as an extra weight row (gpt-oss)."""
        self.source, self.dtype = source, dtype
        self.num_moe_layers, self.num_experts = num_moe_layers, num_experts
        self.device = device or jax.devices()[0]
        self.stack_host = stack_host
        self.host: HostTier = HostTier(source, host_capacity, host_policy)
        self.host_layers = None  # per MoE layer ExpertSlots in pinned_host, once `fill_host_stacks` ran
        self.device_cache = DeviceSlotCache(num_moe_layers, num_experts, list(slots), hidden, inter, dtype, policy,
                                            bias=expert_bias)
        self.device_cache.link_gbps = link_gbps
        # Guards both tiers: the prefetch worker and the decoding thread write slots.
        self.lock = threading.Lock()

    # ---- host tier ------------------------------------------------------------------
    def fill_host_stacks(self) -> bool:
        """With `stack_host`, read every expert into the pinned host stacks once (a damaged store
        fails here, naming the expert) and serve the host tier from them. Returns True when this
        call filled them (the caller re-points anything holding the old host tier)."""
        if not self.stack_host or self.host_layers is not None:
            return False
        stacks = HostExpertStacks(self.source, self.num_moe_layers, self.num_experts, self.dtype, self.device)
        self.host_layers = stacks.layers
        self.host = StackedHostTier(stacks, self.source)
        return True

    def reset_stats(self) -> None:
        """Stats are per generate call: a warm cache from earlier calls shows up as hits."""
        self.device_cache.stats = TierStats()
        self.host.stats = TierStats()
        if isinstance(self.host, StackedHostTier):
            self.host.count_load()

    def evict_all(self) -> None:
        """Empty every device slot (a cold start for the next measurement)."""
        with self.lock:
            for moe_layer in range(self.num_moe_layers):
                self.device_cache.evict_all(moe_layer)

    # ---- staged path: make experts resident ---------------------------------------------
    def preload(self, moe_layer: int, experts: Sequence[int]) -> None:
        """Make `experts` resident in `moe_layer` (restricted mode's resident set, warm starts);
        the copies are counted in the device tier's bytes moved, not as hits or misses."""
        self.fill_host_stacks()  # before any copy, so the copies come from the tier that stays
        experts = list(dict.fromkeys(int(x) for x in experts))[: self.device_cache.slots[moe_layer]]
        with self.lock:
            self.make_resident(moe_layer, experts, count=False)

    def make_resident(self, moe_layer: int, experts: Sequence[int], count: bool = True,
                      prefetcher: Prefetcher | None = None) -> tuple[float, float]:
        """Caller holds `lock`. Fetch the missing ones of `experts` into the layer's slots (never
        evicting one of them). With a prefetcher, needed experts still in flight are waited for
        (lock released meanwhile): that wait is stall time and the access a miss, not a hit.
        Returns (seconds waited on late prefetches, seconds spent fetching)."""
        cache = self.device_cache
        late: set[int] = set()
        waited = 0.0
        if count and prefetcher is not None:
            events = prefetcher.begin_layer(moe_layer, list(experts))
            if events:
                late = {int(e) for e in experts if cache.slot_of_expert[moe_layer, e] < 0}
                self.lock.release()
                try:
                    waited = wait_for(events)
                finally:
                    self.lock.acquire()
                prefetcher.settle_late(moe_layer, late)
                prefetcher.stats.late += len(events)
                prefetcher.stats.late_wait_s += waited
        if count:
            missing = cache.lookup(moe_layer, experts, late)
        else:
            missing = [e for e in experts if cache.slot_of_expert[moe_layer, e] < 0]
        if not missing:
            return waited, 0.0
        t0 = time.perf_counter()
        host_copies = self.host.get_many([(moe_layer, e) for e in missing])
        for e, weights in zip(missing, host_copies):
            cache.load(moe_layer, e, weights, protected=experts)
        jax.block_until_ready(cache.buffers[moe_layer])
        return waited, time.perf_counter() - t0

    # ---- one-jit path: the device cache as slot states ------------------------------------
    def to_slot_states(self) -> list[SlotState]:
        """The device cache as per-layer SlotStates (NumPy tables; the caller commits them to the
        device). The slot buffers move into the states: the step donates them from now on."""
        cache = self.device_cache
        states = []
        for moe_layer in range(cache.num_moe_layers):
            owner = cache.expert_in_slot[moe_layer]
            last_use = np.zeros(len(owner), np.int32)  # [S] rank in the LRU order, oldest 0
            policy = cache.policies[moe_layer]
            for rank, expert in enumerate(policy.order()):
                last_use[cache.slot_of_expert[moe_layer, expert]] = rank
            score = np.zeros(self.num_experts, np.float32)  # [E] score eviction's ranks (ScorePolicy)
            for expert, value in getattr(policy, "scores", {}).items():
                score[int(expert)] = value
            states.append(SlotState(cache.buffers[moe_layer], cache.slot_of_expert[moe_layer].copy(), owner.copy(), last_use,
                                    np.zeros(len(owner), bool), score))
            cache.buffers[moe_layer] = None
        return states

    def from_slot_states(self, states: Sequence[SlotState]) -> None:
        """Take the cache back from the one-jit step: tables, LRU order, scores and slot buffers."""
        cache = self.device_cache
        for moe_layer, st in enumerate(states):
            table, owner, last_use = (np.asarray(a) for a in (st.table, st.owner, st.last_use))
            cache.buffers[moe_layer] = st.slots
            cache.slot_of_expert[moe_layer] = table
            cache.expert_in_slot[moe_layer][:] = owner
            cache._device_maps[moe_layer] = None
            held = np.flatnonzero(owner >= 0)
            order = held[np.lexsort((held, last_use[held]))]  # oldest first, ties by slot (the step's argmin)
            policy = cache.policies[moe_layer]
            policy.restore([int(owner[s]) for s in order])
            if hasattr(policy, "set_scores"):  # score eviction continues from the step's latest scores
                policy.set_scores(dict(enumerate(np.asarray(st.score).tolist())))

    @property
    def lru_clock(self) -> int:
        """A clock value above every rank `to_slot_states` gives."""
        return max(self.device_cache.slots)


__all__ = ["Residency"]
