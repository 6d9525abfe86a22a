"""Turn a prompt's predictions into prefetch requests, next-use tables and recall@k.

Steps (all numpy, per prompt):
1. ``select_rows``: keep predictions whose target lies inside the prompt and at
   most ``lookahead`` steps ahead; order them by issue step, then distance.
2. ``build_requests``: per kept row, the top-m experts by score (ties: lower
   expert id) whose score is above ``min_score`` become requests, as keys
   ``layer * E + expert``, grouped by issue step in CSR form.
3. ``next_use_table``: for Belady, the next global step that routes to the same
   key as each access (over the whole replay), and each key's first use.
4. ``PredictionScore``: recall@k and precision@k of every kept row against the
   experts its target actually routed to, summed per target layer and distance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from emoe_jax.predict.base import PromptPredictions
from emoe_jax.sim.kernel import NEVER, top_m


def select_rows(preds: PromptPredictions, num_steps: int, lookahead: int, name: str = "predictor") -> np.ndarray:
    """Indices of usable rows, ordered by (issue step, target step)."""
    if len(preds) == 0:
        return np.zeros(0, np.int64)
    dist = preds.target_step - preds.issue_step
    if np.any(dist < 0):
        raise ValueError(f"{name} made a prediction for a step that already ran")
    if np.isnan(preds.scores).any():
        raise ValueError(f"{name} returned NaN scores")
    keep = np.nonzero((dist <= lookahead) & (preds.target_step < num_steps))[0]
    order = np.lexsort((preds.target_step[keep], preds.issue_step[keep]))
    return keep[order]


def ranked_experts(scores: np.ndarray, m: int, min_score: float) -> tuple[np.ndarray, np.ndarray]:
    """Top-m expert ids per row by score (ties: lower id) and whether each clears ``min_score``.

    Compiled selection (``kernel.top_m``); ``ranked_experts_reference`` is the
    plain numpy definition it is tested against.
    """
    scores = np.ascontiguousarray(scores, np.float32)
    m = min(m, scores.shape[1])
    ids = np.zeros((scores.shape[0], m), np.int64)
    valid = np.zeros((scores.shape[0], m), np.bool_)
    top_m(scores, m, np.float32(min_score), ids, valid)
    return ids, valid


def ranked_experts_reference(scores: np.ndarray, m: int, min_score: float) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-np.asarray(scores, np.float32), axis=1, kind="stable")[:, :m]  # [R, m]
    valid = np.take_along_axis(np.asarray(scores, np.float32), order, axis=1) > min_score
    return order, valid


def build_requests(
    preds: PromptPredictions,
    rows: np.ndarray,
    ranked: np.ndarray,
    valid: np.ndarray,
    num_steps: int,
    num_layers: int,
    num_experts: int,
    prefetch_k: int,
    step_offset: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CSR prefetch requests: ``req_ptr`` [S+1], ``req_key`` [M] int32, ``req_target`` [M] global step,
    ``req_score`` [M] float32 (the predicted score, read by cost-aware admission).

    ``ranked``/``valid`` [R, >= m] come from ``ranked_experts`` on ``preds.scores[rows]``.
    """
    if rows.size == 0 or prefetch_k == 0:
        return np.zeros(num_steps + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.float32)
    experts, valid = ranked[:, :prefetch_k], valid[:, :prefetch_k]  # [R, m]
    layer = preds.target_step[rows] % num_layers  # [R]
    keys = (layer[:, None] * num_experts + experts)[valid].astype(np.int32)  # [M] row-major = priority order
    issue = np.broadcast_to(preds.issue_step[rows][:, None], valid.shape)[valid]  # [M]
    target = np.broadcast_to(preds.target_step[rows][:, None], valid.shape)[valid] + step_offset
    score = np.take_along_axis(preds.scores[rows], experts, axis=1)[valid].astype(np.float32)  # [M]
    req_ptr = np.zeros(num_steps + 1, np.int64)
    np.cumsum(np.bincount(issue, minlength=num_steps), out=req_ptr[1:])
    return req_ptr, keys, target.astype(np.int64), np.ascontiguousarray(score)


def score_updates(
    preds: PromptPredictions, rows: np.ndarray, num_steps: int, num_layers: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR score updates for score-driven eviction: ``upd_ptr`` [S+1], ``upd_layer`` [U], ``upd_scores`` [U, E]."""
    upd_ptr = np.zeros(num_steps + 1, np.int64)
    if rows.size == 0:
        return upd_ptr, np.zeros(0, np.int64), np.zeros((0, preds.scores.shape[1]), np.float32)
    np.cumsum(np.bincount(preds.issue_step[rows], minlength=num_steps), out=upd_ptr[1:])
    return upd_ptr, preds.target_step[rows] % num_layers, np.ascontiguousarray(preds.scores[rows], np.float32)


def next_use_table(keys: np.ndarray, num_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """For accesses ``keys`` [G, k] in replay order: next step using the same key [G, k], first use [K]."""
    num_steps, k = keys.shape
    flat = keys.reshape(-1)
    step = np.arange(flat.size, dtype=np.int64) // k  # [G*k]
    order = np.argsort(flat, kind="stable")  # by key, then by time
    sorted_keys, sorted_steps = flat[order], step[order]
    nxt = np.full(flat.size, NEVER, np.int64)
    same = sorted_keys[1:] == sorted_keys[:-1]
    nxt[order[:-1][same]] = sorted_steps[1:][same]
    first = np.full(num_keys, NEVER, np.int64)
    is_first = np.ones(flat.size, bool)
    is_first[1:] = ~same
    first[sorted_keys[is_first]] = sorted_steps[is_first]
    return nxt.reshape(num_steps, k), first


@dataclass
class PredictionScore:
    """Accumulated recall@k / precision@k of a predictor's scores."""

    num_layers: int
    lookahead: int
    top_k: int
    ks: tuple[int, ...]
    rows_per_layer: np.ndarray = field(init=False)  # [L]
    rows_per_dist: np.ndarray = field(init=False)  # [h]
    hits_per_layer: dict[int, np.ndarray] = field(init=False)  # k -> [L] summed |top-k ∩ actual|
    hits_per_dist: dict[int, np.ndarray] = field(init=False)  # k -> [h]

    def __post_init__(self) -> None:
        self.rows_per_layer = np.zeros(self.num_layers, np.int64)
        self.rows_per_dist = np.zeros(self.lookahead + 1, np.int64)
        self.hits_per_layer = {k: np.zeros(self.num_layers, np.int64) for k in self.ks}
        self.hits_per_dist = {k: np.zeros(self.lookahead + 1, np.int64) for k in self.ks}

    def add(self, preds: PromptPredictions, rows: np.ndarray, ranked: np.ndarray, valid: np.ndarray,
            experts: np.ndarray, warmup_tokens: int) -> None:  # fmt: skip
        """Score rows issued after warm-up against ``experts`` [T, L, k] of the prompt.

        ``ranked``/``valid`` [R, >= max(ks)] come from ``ranked_experts`` on ``preds.scores[rows]``.
        """
        if rows.size == 0:
            return
        after = preds.issue_step[rows] // self.num_layers >= warmup_tokens
        rows, ranked, valid = rows[after], ranked[after], valid[after]
        if rows.size == 0:
            return
        flat = np.asarray(experts).reshape(-1, experts.shape[-1]).astype(np.int64)  # [S, k]
        target = preds.target_step[rows]
        layer = target % self.num_layers
        dist = target - preds.issue_step[rows]
        actual = flat[target]  # [R, k]
        kmax = max(self.ks)
        match = (ranked[:, :kmax, None] == actual[:, None, :]).any(-1) & valid[:, :kmax]  # [R, kmax]
        cum = np.cumsum(match, axis=1)  # [R, kmax] hits within the first j+1
        self.rows_per_layer += np.bincount(layer, minlength=self.num_layers)
        self.rows_per_dist += np.bincount(dist, minlength=self.lookahead + 1)
        for k in self.ks:
            hits = cum[:, k - 1]
            self.hits_per_layer[k] += np.bincount(layer, weights=hits, minlength=self.num_layers).astype(np.int64)
            self.hits_per_dist[k] += np.bincount(dist, weights=hits, minlength=self.lookahead + 1).astype(np.int64)

    def summary(self) -> dict:
        out: dict = {"rows": int(self.rows_per_layer.sum())}
        for k in self.ks:
            rows_l = np.maximum(self.rows_per_layer, 1)
            rows_d = np.maximum(self.rows_per_dist, 1)
            total_rows = max(int(self.rows_per_layer.sum()), 1)
            hits = int(self.hits_per_layer[k].sum())
            out[f"recall@{k}"] = hits / (total_rows * self.top_k)
            out[f"precision@{k}"] = hits / (total_rows * k)
            out[f"recall@{k}_per_layer"] = (self.hits_per_layer[k] / (rows_l * self.top_k)).round(4).tolist()
            out[f"precision@{k}_per_layer"] = (self.hits_per_layer[k] / (rows_l * k)).round(4).tolist()
            out[f"recall@{k}_per_distance"] = (self.hits_per_dist[k] / (rows_d * self.top_k)).round(4).tolist()
        return out
