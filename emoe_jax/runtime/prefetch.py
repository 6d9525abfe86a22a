"""Background expert prefetching driven by a Predictor's scores.

The engine hands the prefetcher requests (target step, score, MoE layer, expert)
built from the same `Prediction` objects the simulator replays. One worker
thread serves them nearest target first, then highest score:

    host copy (host tier hit, else a disk read)  ->  host->device copy  ->  slot write

The disk read and the host->device copy run outside the tiers' lock, so they
overlap the main thread's compute; only the bookkeeping and the in-place slot
write take the lock. On a GPU the copy is a DMA from pinned host memory on its
own stream.

Rules that keep the runtime exact and the accounting honest:
- A new round of requests replaces the queued (not yet started) ones: stale
  predictions are dropped, counted as `dropped`.
- The worker never evicts an expert of the layer the main thread is running
  (`begin_layer` protects that step's experts), nor a prefetched expert whose
  layer has not run yet; when no slot can be freed, the request is dropped.
- When a layer needs an expert whose prefetch is still in flight, the main
  thread waits for it: the wait is charged as stall time and the access is
  counted as a miss and a `late` prefetch, never as a hit. Requests still
  queued for a needed expert are cancelled and it is fetched on demand.
Outputs never depend on what was prefetched: a layer runs only once every
expert its tokens routed to is in a slot.
"""

from __future__ import annotations

import dataclasses
import heapq
import threading
import time
from collections.abc import Callable

import jax

from .tiers import DeviceSlotCache, HostTier


@dataclasses.dataclass
class PrefetchStats:
    issued: int = 0  # requests accepted into the queue
    started: int = 0  # requests the worker began (host copy + transfer)
    completed: int = 0  # arrived in a device slot
    timely: int = 0  # arrived before a step needed them: device hits thanks to a prefetch
    late: int = 0  # needed while still queued or in flight: the step waited (stall), counted as a miss
    wasted: int = 0  # arrived, but their layer then ran without needing them
    dropped: int = 0  # replaced by a newer round before starting, or no slot could be freed
    bytes: int = 0  # host->device bytes moved by prefetches
    late_wait_s: float = 0.0  # time the main thread waited on late prefetches

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Prefetcher:
    """One worker thread filling device slots ahead of the layers that need them.

    `lock` guards every tier structure (slot tables, slot buffers, host store,
    policies); the engine holds it from a layer's routing to its FFN dispatch.
    """

    def __init__(self, cache: DeviceSlotCache, host_of: Callable[[], HostTier], lock: threading.Lock):
        # host_of() -> the current host tier: the engine swaps its tier for stacked host arrays on
        # first use, and the worker must read from whichever tier holds the experts then.
        self.cache, self._host_of, self.lock = cache, host_of, lock
        self.stats = PrefetchStats()
        self._cond = threading.Condition()  # guards _queue, _queued, _inflight
        self._queue: list[tuple[int, float, int, int]] = []  # heap of (target step, -score, layer, expert)
        self._queued: set[tuple[int, int]] = set()
        self._inflight: dict[tuple[int, int], threading.Event] = {}
        # Guarded by `lock`: experts that arrived but whose layer has not run yet, and the
        # experts of the layer the main thread is running now.
        self._arrived_unused: list[set[int]] = [set() for _ in range(cache.num_moe_layers)]
        self._protected: dict[int, set[int]] = {}
        self._thread: threading.Thread | None = None
        self._closed = False

    # ---- main thread: requests ------------------------------------------------
    def submit(self, requests: list[tuple[int, float, int, int]]) -> None:
        """Replace the queued requests by `requests`: (target step, score, layer, expert)."""
        fresh: dict[tuple[int, int], tuple[int, float, int, int]] = {}
        for step, score, layer, expert in requests:
            key = (int(layer), int(expert))
            if self.cache.slot_of_expert[key] >= 0 or key in fresh:
                continue  # resident already (the worker re-checks under the lock), or a duplicate
            fresh[key] = (int(step), -float(score), *key)
        with self._cond:
            fresh = {k: v for k, v in fresh.items() if k not in self._inflight}
            self.stats.dropped += len(self._queued - fresh.keys())
            self.stats.issued += len(fresh.keys() - self._queued)
            self._queue = list(fresh.values())
            heapq.heapify(self._queue)
            self._queued = set(fresh)
            if self._queue:
                self._ensure_worker()
                self._cond.notify()

    def _ensure_worker(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="emoe-prefetch", daemon=True)
            self._thread.start()

    # ---- main thread: a layer is about to run (caller holds `lock`) -------------
    def begin_layer(self, layer: int, needed: list[int]) -> list[threading.Event]:
        """Protect `needed`, settle the layer's earlier prefetches, and return the events of
        needed experts still in flight (the caller waits on them outside the lock)."""
        needed_set = set(int(e) for e in needed)
        self._protected[layer] = needed_set
        arrived = self._arrived_unused[layer]
        resident = self.cache.slot_of_expert[layer]
        self.stats.timely += sum(1 for e in arrived & needed_set if resident[e] >= 0)
        self.stats.wasted += len(arrived - needed_set)
        arrived.clear()
        with self._cond:
            cancel = {(layer, e) for e in needed_set} & self._queued
            if cancel:  # too late to start: fetched on demand now, counted as late prefetches
                self._queue = [r for r in self._queue if (r[2], r[3]) not in cancel]
                heapq.heapify(self._queue)
                self._queued -= cancel
                self.stats.late += len(cancel)
            return [ev for (lay, e), ev in self._inflight.items() if lay == layer and e in needed_set
                    and resident[e] < 0]

    def settle_late(self, layer: int, experts) -> None:
        """Late arrivals the caller waited for are misses already: not timely, not wasted."""
        self._arrived_unused[layer].difference_update(int(e) for e in experts)

    def end_layer(self, layer: int) -> None:
        """The layer's FFN is dispatched: its experts may be evicted again (caller holds `lock`)."""
        self._protected.pop(layer, None)

    # ---- worker -----------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                _, _, layer, expert = heapq.heappop(self._queue)
                key = (layer, expert)
                self._queued.discard(key)
                event = threading.Event()
                self._inflight[key] = event
            try:
                self._fetch(layer, expert)
            finally:
                with self._cond:
                    self._inflight.pop(key, None)
                    event.set()
                    self._cond.notify_all()

    def _fetch(self, layer: int, expert: int) -> None:
        key = (layer, expert)
        with self.lock:
            if self.cache.slot_of_expert[key] >= 0:
                return
            self.stats.started += 1
            arrays = self.host.peek(key)
        if arrays is None:
            arrays = self.host.source.read(layer, expert)  # disk read, outside the lock
            with self.lock:
                arrays = self.host.add(key, arrays)
        device_arrays = self.cache.to_device(arrays, demand=False)
        jax.block_until_ready(device_arrays)  # the host->device copy, overlapping the main thread
        with self.lock:
            if self.cache.slot_of_expert[key] >= 0:
                return  # fetched on demand meanwhile
            protected = self._protected.get(layer, set()) | self._arrived_unused[layer]
            try:
                self.cache.install(layer, expert, device_arrays, protected)
            except LookupError:  # every slot holds an expert that is needed or not yet used
                self.stats.dropped += 1
                return
            self._arrived_unused[layer].add(expert)
            self.stats.completed += 1
            self.stats.bytes += self.cache.slot_bytes

    # ---- lifecycle --------------------------------------------------------------
    def drain(self) -> None:
        """Drop queued requests and wait for in-flight ones (end of a generate call)."""
        with self._cond:
            self.stats.dropped += len(self._queue)
            self._queue, self._queued = [], set()
            while self._inflight:
                self._cond.wait()
        with self.lock:
            self.stats.wasted += sum(len(s) for s in self._arrived_unused)
            for s in self._arrived_unused:
                s.clear()
            self._protected.clear()

    @property
    def host(self) -> HostTier:
        return self._host_of()

    def reset_stats(self) -> None:
        self.stats = PrefetchStats()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)


def wait_for(events: list[threading.Event]) -> float:
    """Wait for late prefetches; returns the seconds waited."""
    t0 = time.perf_counter()
    for ev in events:
        ev.wait()
    return time.perf_counter() - t0


__all__ = ["Prefetcher", "PrefetchStats", "wait_for"]
