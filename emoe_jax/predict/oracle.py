"""Perfect-knowledge prefetcher (ORACLE: reads the future).

The best any predictor can do under the same lookahead and bandwidth: at (t, l)
it scores 1 exactly the experts that targets l..l+lookahead will route to. It
is handed the whole prompt through ``reveal(trace)``, which only oracles get,
and pairs with Belady eviction by default. Reports mark it as an oracle.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from emoe_jax.predict.base import BasePredictor, Prediction, PromptPredictions, horizon_rows


class OraclePrefetch(BasePredictor):
    name = "oracle-prefetch"
    oracle = True
    eviction = "belady"

    def __init__(self, lookahead: int = 1, eviction: str = "belady") -> None:
        super().__init__(lookahead=lookahead)
        self.eviction = eviction
        self.future: np.ndarray | None = None  # [T, L, k] the revealed prompt

    def reveal(self, trace: Any) -> None:
        self.future = np.asarray(trace.experts).astype(np.int64)

    def predict(self, t: int, l: int) -> Prediction:
        num_tokens, num_layers, _ = self.future.shape
        targets = self.target_list(t, l, num_layers)
        scores = np.zeros((targets.shape[0], self.info.num_experts), np.float32)
        for i, (offset, layer) in enumerate(targets):
            if t + offset < num_tokens:
                scores[i, self.future[t + offset, layer]] = 1.0
        return Prediction(targets, scores)

    def predict_prompt(self, trace: Any, meta: Any) -> PromptPredictions:
        num_layers, num_experts = int(meta.num_layers), int(meta.num_experts)
        experts = np.asarray(trace.experts).astype(np.int64)  # [T, L, k]
        num_steps = experts.shape[0] * num_layers
        issue, target = horizon_rows(num_steps, self.lookahead)
        scores = np.zeros((issue.shape[0], num_experts), np.float32)
        inside = np.nonzero(target < num_steps)[0]
        flat = experts.reshape(num_steps, -1)  # [S, k]
        scores[inside[:, None], flat[target[inside]]] = 1.0
        return PromptPredictions(issue, target, scores)
