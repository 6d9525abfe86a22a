"""Previous-token predictor: a layer will use the experts it used last time.

Steps:
1. Keep, per layer, the experts of the most recent token routed there.
2. ``predict(t, l)``: for each target layer l' in l..l+lookahead, score 1 for
   the experts of the latest token already routed at l' (token t-1 for layers
   not yet reached by token t, token t for a target in token t+1 at a layer
   token t has passed), 0 for the rest. Before any token has routed at l' the
   row is all zeros (no prediction).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from emoe_jax.predict.base import BasePredictor, Prediction, PromptInfo, PromptPredictions, horizon_rows


class PreviousToken(BasePredictor):
    name = "prev-token"

    def __init__(self, lookahead: int = 1) -> None:
        super().__init__(lookahead=lookahead)
        self.last: np.ndarray | None = None  # [L, E] float32 one-hot of the latest routing per layer

    def begin_prompt(self, info: PromptInfo) -> None:
        super().begin_prompt(info)
        self.last = np.zeros((info.num_layers, info.num_experts), np.float32)

    def observe(self, t: int, l: int, experts: np.ndarray, weights: np.ndarray | None = None) -> None:
        self.last[l] = 0.0
        self.last[l, np.asarray(experts, dtype=np.int64)] = 1.0

    def predict(self, t: int, l: int) -> Prediction:
        targets = self.target_list(t, l, self.last.shape[0])
        return Prediction(targets, self.last[targets[:, 1]].copy())

    def predict_prompt(self, trace: Any, meta: Any) -> PromptPredictions:
        num_layers, num_experts = int(meta.num_layers), int(meta.num_experts)
        experts = np.asarray(trace.experts).astype(np.int64)  # [T, L, k]
        num_tokens = experts.shape[0]
        issue, target = horizon_rows(num_tokens * num_layers, self.lookahead)
        layer = target % num_layers
        # Latest token tau routed at `layer` strictly before the issue step:
        # tau*L + layer < issue  <=>  tau <= (issue - layer - 1) // L  (-1: none yet).
        source_token = (issue - layer - 1) // num_layers  # [R]
        scores = np.zeros((issue.shape[0], num_experts), np.float32)
        known = source_token >= 0
        rows = np.nonzero(known)[0]
        picked = experts[source_token[known], layer[known]]  # [R', k]
        scores[rows[:, None], picked] = 1.0
        return PromptPredictions(issue, target, scores)
