"""Eviction policies for the host tier and the device slot caches.

A policy only orders keys; the tier decides what is protected (experts the
current step needs are never evicted). Keys are expert ids (device, per layer)
or (layer, expert) pairs (host).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Iterable

from ..predict.base import EVICTION_POLICIES


class EvictionPolicy:
    name = "base"
    needs_scores = False  # True: ordered by scores a predictor sets, so not a choice for --policy alone

    def insert(self, key: Hashable) -> None:
        raise NotImplementedError

    def touch(self, key: Hashable) -> None:
        raise NotImplementedError

    def remove(self, key: Hashable) -> None:
        raise NotImplementedError

    def victim(self, protected: Iterable[Hashable] = ()) -> Hashable:
        """The key to evict next, never one in `protected`."""
        raise NotImplementedError

    def order(self) -> list[Hashable]:
        """The held keys, least recently used first (the one-jit step keeps recency as clocks)."""
        raise NotImplementedError

    def restore(self, keys: Iterable[Hashable]) -> None:
        """Hold exactly `keys`, least recently used first (the one-jit step hands recency back)."""
        raise NotImplementedError


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def insert(self, key):
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key):
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key):
        self._order.pop(key, None)

    def victim(self, protected=()):
        protected = set(protected)
        for key in self._order:  # oldest first
            if key not in protected:
                return key
        raise LookupError("every resident entry is protected; nothing can be evicted")

    def order(self):
        return list(self._order)

    def restore(self, keys):
        self._order = OrderedDict((k, None) for k in keys)


class LFUPolicy(EvictionPolicy):
    """Least frequently used; ties broken by least recent use. Counts survive eviction,
    so an expert that was popular earlier is preferred when it returns."""

    name = "lfu"

    def __init__(self) -> None:
        self._counts: dict[Hashable, int] = {}
        self._lru = LRUPolicy()

    def insert(self, key):
        self._counts[key] = self._counts.get(key, 0) + 1
        self._lru.insert(key)

    def touch(self, key):
        self._counts[key] = self._counts.get(key, 0) + 1
        self._lru.touch(key)

    def remove(self, key):
        self._lru.remove(key)

    def order(self):
        return self._lru.order()

    def restore(self, keys):
        self._lru.restore(keys)

    def victim(self, protected=()):
        protected = set(protected)
        best, best_rank = None, None
        for rank, key in enumerate(self._lru._order):
            if key in protected:
                continue
            score = (self._counts.get(key, 0), rank)
            if best_rank is None or score < best_rank:
                best, best_rank = key, score
        if best is None:
            raise LookupError("every resident entry is protected; nothing can be evicted")
        return best


class ScorePolicy(EvictionPolicy):
    """Evict the resident key with the lowest externally set score (a predictor's
    belief that the expert is needed soon); ties broken by LRU."""

    name = "score"
    needs_scores = True

    def __init__(self) -> None:
        self.scores: dict[Hashable, float] = {}
        self._lru = LRUPolicy()

    def set_scores(self, scores: dict[Hashable, float]) -> None:
        self.scores.update(scores)

    def insert(self, key):
        self._lru.insert(key)

    def touch(self, key):
        self._lru.touch(key)

    def remove(self, key):
        self._lru.remove(key)

    def order(self):
        return self._lru.order()

    def restore(self, keys):
        self._lru.restore(keys)

    def victim(self, protected=()):
        protected = set(protected)
        candidates = [k for k in self._lru._order if k not in protected]
        if not candidates:
            raise LookupError("every resident entry is protected; nothing can be evicted")
        return min(enumerate(candidates), key=lambda rk: (self.scores.get(rk[1], 0.0), rk[0]))[1]


# The runtime's implementations; every name is one of the simulator's EVICTION_POLICIES (belady reads
# the future, so only the simulator has it).
POLICIES = {cls.name: cls for cls in (LRUPolicy, LFUPolicy, ScorePolicy)}
assert set(POLICIES) <= set(EVICTION_POLICIES), "a runtime policy the simulator cannot compare against"
# What --policy offers on the command lines (generate, bench replay).
CLI_POLICIES = tuple(name for name, cls in POLICIES.items() if not cls.needs_scores)


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {', '.join(POLICIES)}") from None
