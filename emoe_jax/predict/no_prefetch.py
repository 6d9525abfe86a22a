"""Cache policies without prediction: LRU, LFU and Belady's MIN (an oracle).

These predictors never prefetch; they only name the eviction policy the
simulator runs:

- ``lru``: evict the least recently used expert.
- ``lfu``: evict the expert accessed least often since the replay (or, with a
  per-prompt reset, the prompt) began; ties go to the least recently used.
- ``belady`` (alias ``min``): evict the expert whose next use is furthest in the
  future. This reads the future, so it is an oracle: the best any cache can do
  without prefetching, reported as the ceiling next to real policies.
"""

from __future__ import annotations

from typing import Any

from emoe_jax.predict.base import BasePredictor, PromptPredictions


class NoPrefetch(BasePredictor):
    """Never predicts; the simulator's eviction policy does all the work."""

    def __init__(self, eviction: str = "lru", lookahead: int = 0) -> None:
        super().__init__(lookahead=lookahead)
        self.eviction = eviction
        self.name = {"lru": "lru", "lfu": "lfu", "belady": "belady"}.get(eviction, f"no-prefetch-{eviction}")
        # Belady needs the future; the simulator computes next uses from the trace
        # for it, so the report must mark this policy as an oracle.
        self.oracle = eviction == "belady"

    def reveal(self, trace: Any) -> None:
        # MIN's future knowledge lives in the simulator's next-use table.
        return None

    def predict_prompt(self, trace: Any, meta: Any) -> PromptPredictions:
        return PromptPredictions.empty(int(meta.num_experts))
