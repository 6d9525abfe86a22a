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
    """Least recently used. The other policies keep the same recency order and rank keys by
    their own `_primary` first; recency breaks ties."""

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

    def _primary(self, key: Hashable) -> float:
        """The policy's own rank of a resident key (lowest is evicted first); LRU has none."""
        return 0.0

    def victim(self, protected=()):
        protected = set(protected)
        best, best_rank = None, None
        for recency, key in enumerate(self._order):  # oldest first
            if key in protected:
                continue
            rank = (self._primary(key), recency)
            if best_rank is None or rank < best_rank:
                best, best_rank = key, rank
        if best is None:
            raise LookupError("every resident entry is protected; nothing can be evicted")
        return best

    def order(self):
        return list(self._order)

    def restore(self, keys):
        self._order = OrderedDict((k, None) for k in keys)


class LFUPolicy(LRUPolicy):
    """Least frequently used; ties broken by least recent use. Counts survive eviction,
    so an expert that was popular earlier is preferred when it returns."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self._counts: dict[Hashable, int] = {}

    def insert(self, key):
        self._counts[key] = self._counts.get(key, 0) + 1
        super().insert(key)

    def touch(self, key):
        self._counts[key] = self._counts.get(key, 0) + 1
        super().touch(key)

    def _primary(self, key):
        return self._counts.get(key, 0)


class ScorePolicy(LRUPolicy):
    """Evict the resident key with the lowest externally set score (a predictor's
    belief that the expert is needed soon); ties broken by LRU. The engine sets them from
    its predictor's latest scores (staged path: `PredictorDriver.scores`; the one-jit step
    keeps them in-graph and hands them back), so it needs a predictor."""

    name = "score"
    needs_scores = True

    def __init__(self) -> None:
        super().__init__()
        self.scores: dict[Hashable, float] = {}

    def set_scores(self, scores: dict[Hashable, float]) -> None:
        self.scores.update(scores)

    def _primary(self, key):
        return self.scores.get(key, 0.0)


# The runtime's implementations; every name is one of the simulator's EVICTION_POLICIES (belady reads
# the future, so only the simulator has it).
POLICIES = {cls.name: cls for cls in (LRUPolicy, LFUPolicy, ScorePolicy)}
assert set(POLICIES) <= set(EVICTION_POLICIES), "a runtime policy the simulator cannot compare against"
# What --policy offers without a predictor; generate offers every one of POLICIES and refuses one
# that needs scores without --predictor (`check_policy`).
CLI_POLICIES = tuple(name for name, cls in POLICIES.items() if not cls.needs_scores)


def check_policy(name: str, has_predictor: bool) -> None:
    """A policy that ranks by a predictor's scores needs one: a ValueError that says so otherwise."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {', '.join(POLICIES)}")
    if cls.needs_scores and not has_predictor:
        raise ValueError(f"eviction policy {name!r} ranks experts by a predictor's scores: give a predictor "
                         "(--predictor NAME), or choose " + " or ".join(CLI_POLICIES))


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {', '.join(POLICIES)}") from None
