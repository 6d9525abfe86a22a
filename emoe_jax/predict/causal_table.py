"""A strong causal baseline built from fitted tables only: what a learned predictor must beat.

For a target (token t', layer l') predicted at step (t, l) (before layer l of
token t routes), three table look-ups are combined with the per-layer expert
frequency P(e | l') as a naive-Bayes-style product of likelihood ratios:

    log s(e) = log P(e | l')
             + w_tok  * [log P(e | l', token id of t') - log P(e | l')]        only if t' = t (its id is known)
             + w_cond * [log P(e | l', experts of t at l-1) - log P(e | l')]   only if t' = t and l >= 1
             + w_prev * [log P(e | l', experts of the latest token at l') - log P(e | l')]

* token table: per token id (ids seen >= ``min_token_count`` times in training)
  and layer, expert counts, smoothed towards P(e | l') with ``alpha`` pseudo-tokens;
* layer-to-layer table: P(e' at l' | e at l'-g) for the gap g = l' - (l-1) of the
  same token (g = 1 is "layer l given layer l-1"), averaged over the k source experts;
* token-to-token table: P(e' at l' | e at l' of the token `lag` = 1 or 2 tokens
  earlier), averaged over that token's k experts (lag 2 when the previous token
  has not reached l' yet).

Scores are normalised to sum to k per row (an estimate of each expert's chance
to be routed). ``reuse`` rows give, after step (t, l) ran, each expert's chance
to be routed again by token t+1 at layer l: the eviction side of the same
tables (``score`` eviction and cost-aware admission read it).

Every look-up reads only what a decoder has at the issue step, and the step path
calls the same row function on the routing observed so far, so the fast path
equals it by construction (tested, with shuffled futures).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from emoe_jax.predict.base import BasePredictor, Prediction, PromptInfo, PromptPredictions, horizon_rows, require_fitted

_FLOOR = 1e-6  # probabilities are floored before the log: an unseen pair is unlikely, not impossible


class CausalTables:
    """The fitted tables (all float32 log-probability ratios against the layer prior)."""

    def __init__(self, train: Any, max_gap: int, alpha: float, min_token_count: int) -> None:
        meta = train.meta
        L, E, k = int(meta.num_layers), int(meta.num_experts), int(meta.top_k)
        self.L, self.E, self.k, self.max_gap = L, E, k, max_gap
        experts = [np.asarray(p.experts).astype(np.int64) for p in train]  # [T, L, k] each
        tokens = [np.asarray(p.token_ids).astype(np.int64) for p in train]
        allx = np.concatenate(experts) if experts else np.zeros((0, L, k), np.int64)  # [N, L, k]
        n = max(allx.shape[0], 1)

        def pair_counts(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
            """[E, E] counts of (e in src row, e' in dst row) over rows of src, dst [P, k]."""
            idx = (src[:, :, None] * E + dst[:, None, :]).reshape(-1)
            return np.bincount(idx, minlength=E * E).reshape(E, E).astype(np.float64)

        layer_counts = np.stack([np.bincount(allx[:, l].reshape(-1), minlength=E) for l in range(L)])  # [L, E]
        layer = (layer_counts + 1.0) / (n + E / k)  # [L, E] P(e | l), add-one smoothed
        self.log_layer = np.log(layer).astype(np.float32)

        def ratio(counts: np.ndarray, totals: np.ndarray, prior: np.ndarray) -> np.ndarray:
            p = (counts + alpha * prior) / (totals + alpha)
            return (np.log(np.maximum(p, _FLOOR)) - np.log(prior)).astype(np.float32)

        # Layer-to-layer: cond[g, l', e, e'] for source layer l'-g of the same token.
        self.cond = np.zeros((max_gap + 1, L, E, E), np.float32)
        for g in range(1, max_gap + 1):
            for dst in range(g, L):
                pair = pair_counts(allx[:, dst - g], allx[:, dst])
                self.cond[g, dst] = ratio(pair, layer_counts[dst - g][:, None], layer[dst][None, :])
        # Token-to-token at the same layer: cross[lag, l, e, e'] (lag 1, 2) within a prompt.
        self.cross = np.zeros((3, L, E, E), np.float32)
        starts = np.cumsum([0] + [x.shape[0] for x in experts])
        for lag in (1, 2):
            # source rows with a row lag tokens later inside the same prompt
            src_rows = np.concatenate([np.arange(a, b - lag) for a, b in zip(starts[:-1], starts[1:]) if b - a > lag]
                                      or [np.zeros(0, np.int64)]).astype(np.int64)  # fmt: skip
            for l in range(L):
                src = allx[src_rows, l]  # [P, k]
                pair = pair_counts(src, allx[src_rows + lag, l])
                totals = np.bincount(src.reshape(-1), minlength=E).astype(np.float64)
                self.cross[lag, l] = ratio(pair, totals[:, None], layer[l][None, :])
        # Token id -> row of the token table; rarer ids fall back to the layer prior.
        ids = np.concatenate(tokens) if tokens else np.zeros(0, np.int64)
        uniq, inverse, count = np.unique(ids, return_inverse=True, return_counts=True)
        keep = (count >= min_token_count) & (uniq >= 0)
        self.token_ids = uniq[keep]  # [U] sorted
        row_of_uniq = np.cumsum(keep) - 1  # index into kept rows
        rows = np.where(keep[inverse], row_of_uniq[inverse], -1)  # [N]
        U = int(keep.sum())
        sel = rows >= 0
        flat = (rows[sel][:, None, None] * L + np.arange(L)[None, :, None]) * E + allx[sel]  # [N', L, k]
        tok_counts = np.bincount(flat.reshape(-1), minlength=U * L * E).reshape(U, L, E).astype(np.float32)
        self.tok = ratio(tok_counts, count[keep].astype(np.float32)[:, None, None], layer[None]) if U else np.zeros((0, L, E), np.float32)

    def token_rows(self, token_ids: np.ndarray) -> np.ndarray:
        """Row of each id in the token table, -1 for ids not in it."""
        ids = np.asarray(token_ids, np.int64)
        pos = np.searchsorted(self.token_ids, ids)
        pos = np.minimum(pos, max(len(self.token_ids) - 1, 0))
        found = (len(self.token_ids) > 0) & (self.token_ids[pos] == ids) if len(self.token_ids) else np.zeros(ids.shape, bool)
        return np.where(found, pos, -1)


def row_scores(tables: CausalTables, weights: tuple[float, float, float], tok_rows: np.ndarray,
               experts: np.ndarray, issue: np.ndarray, target: np.ndarray, id_known_upto: np.ndarray) -> np.ndarray:  # fmt: skip
    """Scores [R, E] for targets ``target`` [R] given what is known at ``issue`` [R].

    Known at issue step s = (t, l): ``experts`` [T, L, k] of every step < s, and the
    token ids of tokens <= ``id_known_upto`` [R] (t for predictions; t-1... for
    reuse rows issued right after a step). Nothing else of ``experts`` is read.
    """
    L, k = tables.L, tables.k
    w_tok, w_cond, w_prev = weights
    t, l = issue // L, issue % L
    tt, lt = target // L, target % L
    logit = tables.log_layer[lt].copy()  # [R, E]
    if w_tok and tables.tok.shape[0]:
        use = (tt <= id_known_upto) & (tok_rows[np.minimum(tt, len(tok_rows) - 1)] >= 0)
        r = np.nonzero(use)[0]
        logit[r] += w_tok * tables.tok[tok_rows[tt[r]], lt[r]]
    if w_cond:
        gap = lt - (l - 1)
        use = (tt == t) & (l >= 1) & (gap >= 1) & (gap <= tables.max_gap)
        r = np.nonzero(use)[0]
        src = experts[t[r], l[r] - 1]  # [R', k] routed at step s-1 < s
        logit[r] += w_cond * tables.cond[gap[r][:, None], lt[r][:, None], src].mean(1)
    if w_prev:
        tau = (issue - lt - 1) // L  # latest token routed at lt strictly before the issue step
        lag = tt - tau
        use = (tau >= 0) & (lag >= 1) & (lag <= 2)
        r = np.nonzero(use)[0]
        src = experts[tau[r], lt[r]]  # [R', k]
        logit[r] += w_prev * tables.cross[lag[r][:, None], lt[r][:, None], src].mean(1)
    logit -= logit.max(1, keepdims=True)
    p = np.exp(logit)
    return (k * p / p.sum(1, keepdims=True)).astype(np.float32)


def reuse_rows(tables: CausalTables, weights: tuple[float, float, float], trace: Any) -> np.ndarray:
    """Reuse rows [T*L, E] of one prompt: after step s ran, each expert's chance to be routed by token t+1."""
    L = tables.L
    experts = np.asarray(trace.experts).astype(np.int64)  # [T, L, k]
    tok_rows = tables.token_rows(np.asarray(trace.token_ids))
    step = np.arange(experts.shape[0] * L)
    padded = np.concatenate([experts, np.zeros((1,) + experts.shape[1:], np.int64)])
    return row_scores(tables, weights, tok_rows, padded, step + 1, step + L, step // L)


class CausalTable(BasePredictor):
    """Token-id, layer-to-layer and token-to-token tables combined (module docstring)."""

    name = "causal-table"

    def __init__(self, lookahead: int = 1, eviction: str = "lru", w_tok: float = 0.5, w_cond: float = 1.2,
                 w_prev: float = 0.7, alpha: float = 4.0, min_token_count: int = 3) -> None:  # fmt: skip
        super().__init__(lookahead=lookahead)
        self.eviction = eviction
        self.weights = (float(w_tok), float(w_cond), float(w_prev))
        self.alpha, self.min_token_count = float(alpha), int(min_token_count)
        self.tables: CausalTables | None = None

    def fit(self, train: Any) -> None:
        # Gaps up to lookahead + 1: a target lookahead steps ahead of (t, l) is lookahead + 1 layers past l-1.
        self.tables = CausalTables(train, max(1, min(self.lookahead + 1, int(train.meta.num_layers) - 1)),
                                   self.alpha, self.min_token_count)  # fmt: skip

    # -- step path: the same row function on the routing observed so far -------------
    # Per-prompt arrays are grown once per token (not per step): `_experts` [T+1, L, k] always ends in one zero
    # row, the token after the last begun (what `reuse` rows target; its routing is never read), and the
    # token-table rows of the ids are looked up once each.
    def begin_prompt(self, info: PromptInfo) -> None:
        super().begin_prompt(info)
        self._ids: list[int] = []
        self._tok_rows = np.zeros(0, np.int64)
        self._experts = np.zeros((1, info.num_layers, info.top_k), np.int64)

    def begin_token(self, t: int, token_id: int) -> None:
        self._ids.append(int(token_id))
        self._experts = np.concatenate([self._experts, np.zeros((1,) + self._experts.shape[1:], np.int64)])

    def observe(self, t: int, l: int, experts: np.ndarray, weights: np.ndarray | None = None) -> None:
        self._experts[t, l] = np.asarray(experts, np.int64)

    def _token_rows(self, tables: CausalTables) -> np.ndarray:
        """Token-table row of every id begun so far [T] (new ids looked up once)."""
        done = len(self._tok_rows)
        if done < len(self._ids):
            self._tok_rows = np.concatenate([self._tok_rows, tables.token_rows(np.asarray(self._ids[done:]))])
        return self._tok_rows

    def predict(self, t: int, l: int) -> Prediction:
        tables = require_fitted(self, "tables")
        targets = self.target_list(t, l, tables.L)
        s = t * tables.L + l
        target = s + np.arange(self.lookahead + 1)
        issue = np.full(target.shape, s)
        scores = row_scores(tables, self.weights, self._token_rows(tables), self._experts, issue, target,
                            np.full(target.shape, t))  # fmt: skip
        return Prediction(targets, scores)

    def reuse(self, t: int, l: int) -> np.ndarray:
        """After (t, l) routed: each expert's chance to be routed by token t+1 at layer l [E]."""
        tables = require_fitted(self, "tables")
        s = t * tables.L + l
        return row_scores(tables, self.weights, self._token_rows(tables), self._experts, np.array([s + 1]),
                          np.array([s + tables.L]), np.array([t]))[0]  # fmt: skip

    # -- fast path --------------------------------------------------------------------
    def predict_prompt(self, trace: Any, meta: Any) -> PromptPredictions:
        tables = require_fitted(self, "tables")
        L = tables.L
        experts = np.asarray(trace.experts).astype(np.int64)  # [T, L, k]
        tok_rows = tables.token_rows(np.asarray(trace.token_ids))
        num_steps = experts.shape[0] * L
        issue, target = horizon_rows(num_steps, self.lookahead)
        scores = row_scores(tables, self.weights, tok_rows, experts, issue, target, issue // L)
        return PromptPredictions(issue, target, scores, reuse=reuse_rows(tables, self.weights, trace))
