"""MoE-Beyond's "MoE-Infinity" baseline, as its published simulator runs it.

In github.com/ngavhane/moe-beyond, ``cache_simulator/infinity_moe_sim.py`` builds
an "EAMC" from prompts 1..9 (``range(1, EAMC_SIZE)`` with ``EAMC_SIZE = 10``),
each an [L, E] matrix of expert counts over the prompt, then clusters it with
k-means using ``NUM_CLUSTERS = 1``; the single centroid is the mean matrix, and
every (token, layer) prefetches the top-6 experts of that centroid's row for
the layer. So the prediction is static and the same for every prompt.

Steps:
1. ``fit``: take the ``num_prompts`` (9) training prompts with the smallest
   prompt ids, count routed experts per prompt into [L, E], average them.
2. ``predict(t, l)``: targets l..l+lookahead (0 in MoE-Beyond: the prefetch for
   layer l is issued right before layer l runs), scores = the mean row.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from emoe_jax.predict.base import BasePredictor, Prediction, PromptPredictions, horizon_rows, require_fitted
from emoe_jax.predict.static_freq import layer_expert_counts


class MoEInfinityBeyond(BasePredictor):
    name = "moe-infinity-beyond"

    def __init__(self, lookahead: int = 0, num_prompts: int = 9) -> None:
        super().__init__(lookahead=lookahead)
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
        self.num_prompts = int(num_prompts)
        self.centroid: np.ndarray | None = None  # [L, E] float32 mean per-prompt counts
        self.fit_prompt_ids: list[int] = []

    def fit(self, train: Any) -> None:
        if len(train) == 0:
            raise ValueError("moe-infinity-beyond: the training trace set is empty")
        meta = train.meta
        ids = np.asarray(train.prompt_ids)
        chosen = np.argsort(ids, kind="stable")[: self.num_prompts]
        self.fit_prompt_ids = [int(ids[i]) for i in chosen]
        counts = layer_expert_counts([train[int(i)] for i in chosen], meta.num_layers, meta.num_experts)
        self.centroid = (counts / len(chosen)).astype(np.float32)

    def predict(self, t: int, l: int) -> Prediction:
        centroid = require_fitted(self, "centroid")
        targets = self.target_list(t, l, centroid.shape[0])
        return Prediction(targets, centroid[targets[:, 1]])

    def predict_prompt(self, trace: Any, meta: Any) -> PromptPredictions:
        centroid = require_fitted(self, "centroid")
        num_layers = int(meta.num_layers)
        issue, target = horizon_rows(np.asarray(trace.experts).shape[0] * num_layers, self.lookahead)
        return PromptPredictions(issue, target, centroid[target % num_layers])
