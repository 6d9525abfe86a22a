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

from emoe_jax.predict.base import Prediction, PromptInfo, PromptPredictions, require_fitted
from emoe_jax.predict.causal_table import CausalTable, CausalTables, reuse_rows, row_scores
from emoe_jax.predict.cross_model import DECAY as CROSS_DECAY
from emoe_jax.predict.cross_model import begin_token as cross_begin_token
from emoe_jax.predict.cross_model import cross_step, fit_cross_model, layer_row, prompt_cross_rows
from emoe_jax.predict.reuse_model import (NUM_FEATURES, ReuseRowHooks, fit_logistic, fit_reuse_model,
                                          prompt_feature_rows, reuse_fit_rows, reuse_probability)
from emoe_jax.predict.within_token import fit_within_model, prompt_within_rows, within_row
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


def expected_use(tables: CausalTables, token_ids: np.ndarray) -> np.ndarray:
    """[T, L, E] the token table's expected use of each expert by each token (about k per layer; the layer
    prior for ids the table does not know)."""
    rows = tables.token_rows(np.asarray(token_ids))
    log_p = np.broadcast_to(tables.log_layer[None], (len(rows), tables.L, tables.E)).astype(np.float64)
    known = rows >= 0
    log_p[known] += tables.tok[rows[known]]
    return np.exp(log_p)


def stack_features(reuse_logit: np.ndarray, cross_row: np.ndarray) -> np.ndarray:
    """[..., E, 3]: bias, causal-reuse's reuse logit, logit of the (clipped) cross-expert row."""
    c = np.clip(cross_row, 1e-3, 1.0 - 1e-3)
    return np.stack([np.ones_like(reuse_logit), reuse_logit, np.log(c / (1.0 - c))], axis=-1)


def predict_features(table_scores: np.ndarray, cross_before: np.ndarray, within: np.ndarray,
                     last_features: np.ndarray) -> np.ndarray:  # fmt: skip
    """[..., E, 4 + NUM_FEATURES]: bias, log of the table's prediction (about k x a probability), logits of
    the (clipped) cross row and within-token row (``within_token``) of the layer about to route from the
    state before it routes, and the reuse model's features [..., E, NUM_FEATURES] of that layer's experts as
    its last run left them (zeros before its first run in the prompt: their bias column is 0 there, so the
    first token gets its own intercept).

    Why the last run's features: an expert's recency and frequency in this prompt say whether it comes back
    at the next token; with them the step's top prefetch among experts its layer did not just use is right
    74 % of the time instead of 72 % (Puffin training prompts), and each wrong one is a wasted copy."""
    c = np.clip(cross_before, 1e-3, 1.0 - 1e-3)
    w = np.clip(within, 1e-3, 1.0 - 1e-3)
    head = np.stack([np.ones_like(c), np.log(np.maximum(table_scores, 1e-4)), np.log(c / (1.0 - c)),
                     np.log(w / (1.0 - w))], axis=-1)  # fmt: skip
    return np.concatenate([head, np.asarray(last_features, head.dtype)], axis=-1)


def last_run_features(features: np.ndarray, num_layers: int) -> np.ndarray:
    """[T*L, E, F]: at step s = (t, l), the features ``features`` [T*L, E, F] of step (t-1, l); zeros at t = 0."""
    out = np.zeros_like(features)
    out[num_layers:] = features[:-num_layers]
    return out


class CrossReuse(CausalReuse):
    """causal-reuse whose reuse rows also read the cross-expert model (``cross_model``): a second logistic
    stage on [causal-reuse's reuse logit, the cross row's logit]; with ``cross_prefetch`` the prediction of
    the step about to run is a logistic stage on [the table's prediction, that layer's cross row before it
    routes] (further targets keep the table's scores). Fitted like causal-reuse on held-out prompts (tables
    and the cross model on the first 80 % of the training prompts, the logistic stages on the last 20 %;
    then tables and cross model refitted on all)."""

    name = "cross-reuse"

    def __init__(self, lookahead: int = 1, eviction: str = "score", horizon: int = 2, decay: float = CROSS_DECAY,
                 cross_prefetch: bool = True, **table_options: Any) -> None:  # fmt: skip
        super().__init__(lookahead=lookahead, eviction=eviction, horizon=horizon, **table_options)
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"cross-reuse: decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.cross_prefetch = bool(cross_prefetch)
        self.cross_weights: np.ndarray | None = None  # [L*E + 1, L*E] ridge weights (cross_model)
        self.stack_weights: np.ndarray | None = None  # [3] second-stage logistic weights (stack_features)
        # [4 + NUM_FEATURES] logistic weights of the step-about-to-run predictions (predict_features); None: the
        # table's own
        self.predict_weights: np.ndarray | None = None
        self.within_weights: np.ndarray | None = None  # [L, L*E + 1, E] within-token ridge weights (cross_prefetch)

    def fit(self, train: Any) -> None:
        if len(train) < 2:
            raise ValueError(f"cross-reuse needs at least 2 training prompts (its tables and its reuse models are "
                             f"fitted on different prompts), got {len(train)}; pass more traces or use causal-table")
        table_part, label_part = split_by_prompt_id(train, 0.2)
        tables = self._tables_for(table_part)
        E = tables.E
        cross = fit_cross_model([np.asarray(p.experts).astype(np.int64) for p in table_part], E, self.horizon,
                                self.decay)  # fmt: skip
        experts = [np.asarray(p.experts).astype(np.int64) for p in label_part]  # [T, L, k] each
        within = self._fit_within(table_part, tables)
        after_rows, px, py = [], [], []

        def stage_rows(i: int, features: np.ndarray, stride: int) -> None:
            """The later stages' rows of label prompt i, from its first-stage features [T*L, E, F]."""
            p, x = label_part[i], experts[i]
            expected = expected_use(tables, p.token_ids)  # [T, L, E]
            before, after = prompt_cross_rows(x, expected, cross, self.decay)
            after_rows.append(after.reshape(-1)[::stride])  # the (step, expert) rows of reuse_fit_rows
            if self.cross_prefetch:  # the step about to run: the state before it routes
                steps = np.arange(x.shape[0] * tables.L)
                table = row_scores(tables, self.weights, tables.token_rows(np.asarray(p.token_ids)), x, steps, steps,
                                   steps // tables.L)  # fmt: skip
                routed = np.zeros((x.shape[0], tables.L, E), bool)
                np.put_along_axis(routed, x, True, axis=2)
                rows = predict_features(table, before, prompt_within_rows(x, expected, within, self.decay),
                                        last_run_features(features, tables.L))  # fmt: skip
                px.append(rows.reshape(-1, rows.shape[-1])[::stride])
                py.append(routed.reshape(-1)[::stride])

        # The first stage's rows (features once per prompt); the later stages read the same prompts' features.
        x_rows, labels, stride = reuse_fit_rows(experts, lambda i: reuse_rows(tables, self.weights, label_part[i]),
                                                tables.log_layer, E, self.horizon, on_prompt=stage_rows)  # fmt: skip
        self.reuse_weights = fit_logistic(x_rows, labels)
        self.stack_weights = fit_logistic(stack_features(x_rows @ self.reuse_weights, np.concatenate(after_rows)),
                                          labels)  # fmt: skip
        self.predict_weights = fit_logistic(np.concatenate(px), np.concatenate(py)) if self.cross_prefetch else None
        self.tables = self._tables_for(train)
        self.cross_weights = fit_cross_model([np.asarray(p.experts).astype(np.int64) for p in train], E,
                                             self.horizon, self.decay)  # fmt: skip
        self.within_weights = self._fit_within(train, self.tables)

    def _fit_within(self, traces: Any, tables: CausalTables) -> np.ndarray | None:
        """The within-token model over ``traces`` (None without the prefetch stage)."""
        if not self.cross_prefetch:
            return None
        return fit_within_model([np.asarray(p.experts).astype(np.int64) for p in traces],
                                lambda i: expected_use(tables, traces[i].token_ids), tables.E, self.decay)  # fmt: skip

    # -- step path ------------------------------------------------------------------------
    def begin_prompt(self, info: PromptInfo) -> None:
        super().begin_prompt(info)
        require_fitted(self, "cross_weights")
        n = info.num_layers * info.num_experts
        self._crf, self._cross_state = np.zeros(n), np.zeros(n)
        # [L, E, F] each layer's reuse features as its last run left them (zeros before its first run)
        self._last_features = np.zeros((info.num_layers, info.num_experts, NUM_FEATURES))

    def begin_token(self, t: int, token_id: int) -> None:
        super().begin_token(t, token_id)
        expected = expected_use(self.tables, np.array([token_id])).reshape(-1)  # [L*E]
        cross_begin_token(self._crf, self._cross_state, expected, self.decay)

    def predict(self, t: int, l: int) -> Prediction:
        pred = super().predict(t, l)
        if self.predict_weights is None:
            return pred
        before = np.zeros(self.tables.E)
        layer_row(self._cross_state, l, self.cross_weights, before)  # the state before (t, l) routes
        scores = pred.scores.copy()
        within = within_row(self._cross_state, l, self.within_weights)
        scores[0] = reuse_probability(predict_features(scores[0], before, within, self._last_features[l]),
                                      self.predict_weights)  # row 0: (t, l)  # fmt: skip
        return Prediction(pred.targets, scores)

    def observe(self, t: int, l: int, experts: np.ndarray, weights: np.ndarray | None = None) -> None:
        CausalTable.observe(self, t, l, experts, weights)
        routed = np.asarray(experts, np.int64)
        features = self._reuse_features(t, l, routed, CausalTable.reuse(self, t, l))  # [E, F]
        self._last_features[l] = features
        logit = features @ self.reuse_weights  # [E]
        row = np.zeros(self.tables.E)
        cross_step(self._crf, self._cross_state, l, routed, self.cross_weights, row)
        self._reuse_row = (t, l, reuse_probability(stack_features(logit, row), self.stack_weights))

    # -- fast path --------------------------------------------------------------------------
    def predict_prompt(self, trace: Any, meta: Any) -> PromptPredictions:
        tables = require_fitted(self, "tables")
        base = CausalTable.predict_prompt(self, trace, meta)
        experts = np.asarray(trace.experts).astype(np.int64)
        features = prompt_feature_rows(experts, base.reuse, tables.log_layer)  # [T*L, E, F]
        logit = features @ self.reuse_weights  # [T*L, E]
        expected = expected_use(tables, trace.token_ids)  # [T, L, E]
        before, after = prompt_cross_rows(experts, expected, self.cross_weights, self.decay)
        scores = base.scores
        if self.predict_weights is not None:
            scores = scores.copy()
            now = base.target_step == base.issue_step  # the step about to run
            last = last_run_features(features, tables.L)
            within = prompt_within_rows(experts, expected, self.within_weights, self.decay)  # [T*L, E]
            target = base.target_step[now]
            scores[now] = reuse_probability(predict_features(scores[now], before[target], within[target],
                                                             last[target]), self.predict_weights)  # fmt: skip
        return PromptPredictions(base.issue_step, base.target_step, scores,
                                 reuse=reuse_probability(stack_features(logit, after), self.stack_weights))  # fmt: skip
