"""``causal-reuse``: the causal table's prefetches, with learned reuse scores for eviction.

Prefetch predictions are exactly ``causal-table``'s. The ``reuse`` rows (what
score eviction reads with ``--eviction-scores reuse``) are a logistic model's
chance that the expert is routed again at its layer within the next
``horizon`` tokens (``reuse_model``), fitted on the training traces only: the
tables are fitted on the first 80 % of the training prompts (by id), the
model's features and labels come from the last 20 % (so the table's reuse it
reads is out of sample, as at test time), then the tables are refitted on all
training prompts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from emoe_jax.predict.base import PromptInfo, PromptPredictions, require_fitted
from emoe_jax.predict.causal_table import CausalTable, CausalTables, reuse_rows
from emoe_jax.predict.reuse_model import ReuseRowHooks, fit_reuse_model, prompt_feature_rows, reuse_probability
from emoe_jax.traces.split import split_by_prompt_id


class CausalReuse(ReuseRowHooks, CausalTable):
    """Causal-table prefetch + learned P(routed again within ``horizon`` tokens) as the reuse score."""

    name = "causal-reuse"

    def __init__(self, lookahead: int = 1, eviction: str = "score", horizon: int = 2, **table_options: Any) -> None:
        super().__init__(lookahead=lookahead, eviction=eviction, **table_options)
        if int(horizon) < 1:
            raise ValueError(f"causal-reuse: horizon must be >= 1 token, got {horizon}")
        self.horizon = int(horizon)
        self.reuse_weights: np.ndarray | None = None  # [F] logistic weights (reuse_model.FEATURES)

    def fit(self, train: Any) -> None:
        if len(train) < 2:
            raise ValueError(
                f"causal-reuse needs at least 2 training prompts (its tables and its reuse model are fitted on "
                f"different prompts), got {len(train)}; pass more traces or use causal-table"
            )
        table_part, label_part = split_by_prompt_id(train, 0.2)
        tables = self._tables_for(table_part)
        experts = [np.asarray(p.experts).astype(np.int64) for p in label_part]  # [T, L, k] each
        self.reuse_weights = fit_reuse_model(experts, lambda i: reuse_rows(tables, self.weights, label_part[i]),
                                             tables.log_layer, tables.E, self.horizon)  # fmt: skip
        self.tables = self._tables_for(train)

    def _tables_for(self, traces: Any) -> CausalTables:
        saved = self.tables
        super().fit(traces)
        tables, self.tables = self.tables, saved
        return tables

    # -- step path: the same feature function, one step at a time ----------------------
    def begin_prompt(self, info: PromptInfo) -> None:
        super().begin_prompt(info)
        self._begin_reuse_rows(info.num_layers, info.num_experts, require_fitted(self, "tables").log_layer)

    def observe(self, t: int, l: int, experts: np.ndarray, weights: np.ndarray | None = None) -> None:
        super().observe(t, l, experts, weights)
        self._observe_reuse_row(t, l, experts, CausalTable.reuse(self, t, l))  # the table's reuse is a feature

    # -- fast path --------------------------------------------------------------------
    def predict_prompt(self, trace: Any, meta: Any) -> PromptPredictions:
        tables = require_fitted(self, "tables")
        base = super().predict_prompt(trace, meta)
        x = prompt_feature_rows(np.asarray(trace.experts).astype(np.int64), base.reuse, tables.log_layer)
        return PromptPredictions(base.issue_step, base.target_step, base.scores,
                                 reuse=reuse_probability(x, self.reuse_weights))  # fmt: skip
