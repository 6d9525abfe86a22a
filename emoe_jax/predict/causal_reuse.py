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
from emoe_jax.predict.reuse_model import (
    CRF_DECAYS,
    NUM_FEATURES,
    fit_logistic,
    new_state,
    next_use_within,
    prompt_feature_rows,
    reuse_probability,
    step_features,
)
from emoe_jax.traces.split import split_by_prompt_id

_MAX_FIT_ROWS = 2_000_000  # (step, expert) rows the logistic model is fitted on; a strided subsample beyond


class CausalReuse(CausalTable):
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
        rows = sum(int(np.asarray(p.experts).shape[0]) * tables.L * tables.E for p in label_part)
        stride = max(1, -(-rows // _MAX_FIT_ROWS))
        xs, ys = [], []
        for trace in label_part:
            experts = np.asarray(trace.experts).astype(np.int64)  # [T, L, k]
            x = prompt_feature_rows(experts, reuse_rows(tables, self.weights, trace), tables.log_layer)
            y = next_use_within(experts, tables.E, self.horizon)  # [T*L, E]
            xs.append(x.reshape(-1, NUM_FEATURES)[::stride])
            ys.append(y.reshape(-1)[::stride])
        self.reuse_weights = fit_logistic(np.concatenate(xs), np.concatenate(ys))
        self.tables = self._tables_for(train)

    def _tables_for(self, traces: Any) -> CausalTables:
        saved = self.tables
        super().fit(traces)
        tables, self.tables = self.tables, saved
        return tables

    # -- step path: the same feature function, one step at a time ----------------------
    def begin_prompt(self, info: PromptInfo) -> None:
        super().begin_prompt(info)
        self._state = new_state(info.num_layers, info.num_experts)
        self._log_prior = require_fitted(self, "tables").log_layer.reshape(-1).astype(np.float64)  # [L*E]
        self._reuse_row: tuple[int, int, np.ndarray] | None = None

    def observe(self, t: int, l: int, experts: np.ndarray, weights: np.ndarray | None = None) -> None:
        super().observe(t, l, experts, weights)
        tables = require_fitted(self, "tables")
        table_reuse = np.asarray(super().reuse(t, l), np.float64)  # [E]
        features = np.zeros((tables.E, NUM_FEATURES))
        step_features(*self._state, t, l, np.asarray(experts, np.int64), table_reuse, self._log_prior, CRF_DECAYS,
                      features)  # fmt: skip
        self._reuse_row = (t, l, reuse_probability(features, self.reuse_weights))

    def reuse(self, t: int, l: int) -> np.ndarray:
        """After (t, l) routed: each expert's chance to be routed at layer l within the next ``horizon`` tokens."""
        if self._reuse_row is None or self._reuse_row[:2] != (t, l):
            raise RuntimeError(f"causal-reuse: reuse({t}, {l}) asked before observe({t}, {l})")
        return self._reuse_row[2]

    # -- fast path --------------------------------------------------------------------
    def predict_prompt(self, trace: Any, meta: Any) -> PromptPredictions:
        tables = require_fitted(self, "tables")
        base = super().predict_prompt(trace, meta)
        x = prompt_feature_rows(np.asarray(trace.experts).astype(np.int64), base.reuse, tables.log_layer)
        return PromptPredictions(base.issue_step, base.target_step, base.scores,
                                 reuse=reuse_probability(x, self.reuse_weights))  # fmt: skip
