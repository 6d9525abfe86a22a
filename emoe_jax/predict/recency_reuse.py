"""``recency-reuse``: learned eviction from recency and frequency alone, no prefetch.

The reuse model of ``causal-reuse`` (``reuse_model``) without its one table
feature: the chance that an expert is routed again at its layer within the next
``horizon`` tokens, from the per-prompt recency-frequency state (CRF at three
decays, tokens since the last use, use counts) and the layer's expert prior.
It predicts nothing to prefetch: it is an eviction policy learned from traces,
for ``--eviction score --eviction-scores reuse`` (simulator) or ``--policy score
--eviction-scores reuse`` (runtime, staged path). Everything it reads could be
kept per (layer, expert) inside a decode step, which is why it exists beside
``causal-reuse``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from emoe_jax.predict.base import BasePredictor, PromptInfo, PromptPredictions, require_fitted
from emoe_jax.predict.reuse_model import ReuseRowHooks, fit_reuse_model, prompt_feature_rows, reuse_probability

_NO_TABLE = 0.5  # the table-reuse feature held at logit 0: this model reads no table


class RecencyReuse(ReuseRowHooks, BasePredictor):
    """No prefetch; reuse rows = learned P(routed again within ``horizon`` tokens) from recency and frequency."""

    name = "recency-reuse"

    def __init__(self, eviction: str = "score", horizon: int = 2) -> None:
        super().__init__(lookahead=0)
        if int(horizon) < 1:
            raise ValueError(f"recency-reuse: horizon must be >= 1 token, got {horizon}")
        self.eviction, self.horizon = eviction, int(horizon)
        self.log_prior: np.ndarray | None = None  # [L*E] log P(e | l), add-one smoothed
        self.reuse_weights: np.ndarray | None = None  # [F]

    def fit(self, train: Any) -> None:
        meta = train.meta
        L, E = int(meta.num_layers), int(meta.num_experts)
        experts = [np.asarray(p.experts).astype(np.int64) for p in train]  # [T, L, k] each
        if not experts or sum(x.shape[0] for x in experts) == 0:
            raise ValueError("recency-reuse needs training traces with at least one token")
        counts = np.ones((L, E))
        for x in experts:
            np.add.at(counts, (np.broadcast_to(np.arange(L)[None, :, None], x.shape), x), 1.0)
        self.log_prior = np.log(counts / counts.sum(1, keepdims=True)).reshape(-1)
        self.reuse_weights = fit_reuse_model(experts, lambda i: np.full((experts[i].shape[0] * L, E), _NO_TABLE),
                                             self.log_prior, E, self.horizon)  # fmt: skip

    # -- step path ---------------------------------------------------------------
    def begin_prompt(self, info: PromptInfo) -> None:
        super().begin_prompt(info)
        require_fitted(self, "reuse_weights")
        self._begin_reuse_rows(info.num_layers, info.num_experts, self.log_prior)

    def observe(self, t: int, l: int, experts: np.ndarray, weights: np.ndarray | None = None) -> None:
        self._observe_reuse_row(t, l, experts, np.full(self.info.num_experts, _NO_TABLE))

    # -- fast path ----------------------------------------------------------------
    def predict_prompt(self, trace: Any, meta: Any) -> PromptPredictions:
        weights = require_fitted(self, "reuse_weights")
        experts = np.asarray(trace.experts).astype(np.int64)  # [T, L, k]
        feats = prompt_feature_rows(experts, np.full((experts.shape[0] * experts.shape[1], int(meta.num_experts)),
                                                     _NO_TABLE), self.log_prior)  # fmt: skip
        empty = PromptPredictions.empty(int(meta.num_experts))
        return PromptPredictions(empty.issue_step, empty.target_step, empty.scores,
                                 reuse=reuse_probability(feats, weights))  # fmt: skip
