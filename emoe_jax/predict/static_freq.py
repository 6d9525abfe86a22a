"""Static per-layer frequency: prefetch each layer's most used experts.

Steps:
1. ``fit``: count how often each expert of each layer is routed to over all
   training tokens; normalise per layer so a score is the fraction of tokens
   that use the expert (counts [L, E] / tokens).
2. ``predict(t, l)``: for every target layer l' in l..l+lookahead, the scores
   are that layer's training frequencies. Nothing about the current prompt is
   used, so the prediction never changes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from emoe_jax.predict.base import BasePredictor, Prediction, PromptPredictions, horizon_rows, require_fitted


def layer_expert_counts(prompts: Any, num_layers: int, num_experts: int) -> np.ndarray:
    """[L, E] float64 counts of routed (layer, expert) pairs over ``prompts``."""
    counts = np.zeros((num_layers, num_experts), np.float64)
    layer_idx = np.arange(num_layers)[None, :, None]  # [1, L, 1]
    for trace in prompts:
        experts = np.asarray(trace.experts).astype(np.int64)  # [T, L, k]
        np.add.at(counts, (np.broadcast_to(layer_idx, experts.shape), experts), 1.0)
    return counts


class StaticFrequency(BasePredictor):
    name = "static-freq"

    def __init__(self, lookahead: int = 1) -> None:
        super().__init__(lookahead=lookahead)
        self.freq: np.ndarray | None = None  # [L, E] float32

    def fit(self, train: Any) -> None:
        meta = train.meta
        counts = layer_expert_counts(train, meta.num_layers, meta.num_experts)
        tokens = max(1, sum(int(np.asarray(p.experts).shape[0]) for p in train))
        self.freq = (counts / tokens).astype(np.float32)

    def predict(self, t: int, l: int) -> Prediction:
        freq = require_fitted(self, "freq")
        targets = self.target_list(t, l, freq.shape[0])
        return Prediction(targets, freq[targets[:, 1]])

    def predict_prompt(self, trace: Any, meta: Any) -> PromptPredictions:
        freq = require_fitted(self, "freq")
        num_layers = int(meta.num_layers)
        issue, target = horizon_rows(np.asarray(trace.experts).shape[0] * num_layers, self.lookahead)
        return PromptPredictions(issue, target, freq[target % num_layers])
