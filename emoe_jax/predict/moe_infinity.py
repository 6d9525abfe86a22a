"""MoE-Infinity's activation-aware prefetching (Xue et al., "MoE-Infinity").

Each request keeps an expert activation matrix (EAM) [L, E] of routing counts.
Past requests' EAMs form a collection (EAMC). While a request runs, its partial
EAM is matched to the most similar past EAM and that EAM's rows for the coming
layers become the prefetch priorities, decayed with distance.

Steps:
1. ``fit``: put every training prompt's EAM into the collection (capacity
   ``capacity``; when full, the least often matched entry, oldest first, is
   replaced, as MoE-Infinity's tracer does). ``end_prompt`` adds each replayed
   prompt's EAM too: it is a past request for the prompts that follow.
2. ``observe(t, l, experts)``: add the routing to the current EAM and update,
   for every stored EAM i, the cosine similarity of row l (incremental: one dot
   product update per stored EAM).
3. ``predict(t, l)``: similarity = mean over the layers seen so far of the
   per-layer cosine; take the nearest stored EAM (ties: lowest index); the score
   of expert e at a target d steps ahead (layer l' = l + d) is its row-normalised
   count times ``1 - d / (L + 1)`` (MoE-Infinity's ``1 - (l' - l)/(L + 1)``).
   Before anything is observed, the collection's mean EAM stands in.

Deviation, stated: MoE-Infinity's code compares row-normalised matrices over the
layers after the current one; this follows the paper and the issue (layers seen
so far). Cosine is scale-invariant per row, so normalising rows changes nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from emoe_jax.predict.base import BasePredictor, Prediction, PromptInfo, PromptPredictions, horizon_rows


class MoEInfinity(BasePredictor):
    name = "moe-infinity"

    def __init__(self, lookahead: int = 1, capacity: int = 1000) -> None:
        super().__init__(lookahead=lookahead)
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 stored requests, got {capacity}")
        self.capacity = int(capacity)
        self.store: np.ndarray | None = None  # [L, E, cap] float32 stored EAM counts (expert-major for fast gathers)
        self.store_norm: np.ndarray | None = None  # [cap, L] float32 row norms of stored EAMs
        self.store_rows: np.ndarray | None = None  # [cap, L, E] float32 row-normalised stored EAMs (the scores)
        self.access = np.zeros(0, np.int64)  # [cap] times chosen as nearest
        self.inserted = np.zeros(0, np.int64)  # [cap] insertion counter, for oldest-first ties
        self.size = 0
        self._clock = 0

    # -- collection ----------------------------------------------------------
    def _allocate(self, num_layers: int, num_experts: int) -> None:
        if self.store is None:
            cap = self.capacity
            self.store = np.zeros((num_layers, num_experts, cap), np.float32)
            self.store_norm = np.zeros((cap, num_layers), np.float32)
            self.store_rows = np.zeros((cap, num_layers, num_experts), np.float32)
            self.access = np.zeros(cap, np.int64)
            self.inserted = np.zeros(cap, np.int64)

    def add_request(self, eam: np.ndarray) -> None:
        """Store one finished request's EAM [L, E] (counts)."""
        num_layers, num_experts = eam.shape
        self._allocate(num_layers, num_experts)
        if self.size < self.capacity:
            slot = self.size
            self.size += 1
        else:  # least matched, then oldest
            slot = int(np.lexsort((self.inserted, self.access))[0])
        self.store[:, :, slot] = eam
        self.store_norm[slot] = np.sqrt((eam.astype(np.float64) ** 2).sum(-1))
        row_sums = eam.sum(-1, keepdims=True)
        self.store_rows[slot] = np.where(row_sums > 0, eam / np.maximum(row_sums, 1e-30), 0.0)
        self.access[slot] = 0
        self._clock += 1
        self.inserted[slot] = self._clock

    def fit(self, train: Any) -> None:
        meta = train.meta
        layer_idx = np.arange(meta.num_layers)[None, :, None]
        for trace in train:
            experts = np.asarray(trace.experts).astype(np.int64)  # [T, L, k]
            eam = np.zeros((meta.num_layers, meta.num_experts), np.float32)
            np.add.at(eam, (np.broadcast_to(layer_idx, experts.shape), experts), 1.0)
            self.add_request(eam)

    # -- per request ---------------------------------------------------------
    def begin_prompt(self, info: PromptInfo) -> None:
        super().begin_prompt(info)
        self._allocate(info.num_layers, info.num_experts)
        n = self.size
        self.cur = np.zeros((info.num_layers, info.num_experts), np.float32)  # [L, E] current EAM
        self.cur_norm2 = np.zeros(info.num_layers, np.float64)  # [L]
        self.dots = np.zeros((info.num_layers, n), np.float64)  # [L, N] row-l dot with stored EAMs
        self.cos = np.zeros((info.num_layers, n), np.float64)  # [L, N] per-layer cosine
        self.sim_sum = np.zeros(n, np.float64)  # [N] sum of cos over seen layers
        self.seen = 0  # number of layers with at least one routed token
        self.fallback = (
            self.store_rows[:n].mean(0) if n else np.zeros((info.num_layers, info.num_experts), np.float32)
        )  # [L, E]

    def observe(self, t: int, l: int, experts: np.ndarray, weights: np.ndarray | None = None) -> None:
        experts = np.asarray(experts, dtype=np.int64)
        row = self.cur[l]
        if self.cur_norm2[l] == 0.0:  # first routing seen at this layer
            self.seen += 1
        self.cur_norm2[l] += float((2.0 * row[experts] + 1.0).sum())  # (c+1)^2 - c^2 per routed expert
        row[experts] += 1.0
        if self.size == 0:
            return
        self.dots[l] += self.store[l, experts, : self.size].sum(0)
        denom = np.sqrt(self.cur_norm2[l]) * self.store_norm[: self.size, l]
        new = np.divide(self.dots[l], denom, out=np.zeros_like(self.dots[l]), where=denom > 0)
        self.sim_sum += new - self.cos[l]
        self.cos[l] = new

    def nearest(self) -> np.ndarray:
        """[L, E] row-normalised EAM of the nearest stored request (or the mean before any routing)."""
        if self.seen == 0 or self.size == 0:
            return self.fallback
        best = int(np.argmax(self.sim_sum))  # mean over seen layers has the same argmax
        self.access[best] += 1
        return self.store_rows[best]

    def _decay(self, num_layers: int) -> np.ndarray:
        return (1.0 - np.arange(self.lookahead + 1) / (num_layers + 1)).astype(np.float32)  # [h]

    def predict(self, t: int, l: int) -> Prediction:
        rows = self.nearest()
        num_layers = rows.shape[0]
        targets = self.target_list(t, l, num_layers)
        return Prediction(targets, rows[targets[:, 1]] * self._decay(num_layers)[:, None])

    def end_prompt(self) -> None:
        self.add_request(self.cur.copy())

    def predict_prompt(self, trace: Any, meta: Any) -> PromptPredictions:
        """Same hooks in the same order, the step loop compiled (``moe_infinity_kernel``)."""
        from emoe_jax.predict.drive import prompt_info
        from emoe_jax.predict.moe_infinity_kernel import replay_prompt

        num_layers = int(meta.num_layers)
        experts = np.ascontiguousarray(np.asarray(trace.experts), dtype=np.int64)  # [T, L, k]
        self.begin_prompt(prompt_info(trace, meta))
        num_steps = experts.shape[0] * num_layers
        issue, target = horizon_rows(num_steps, self.lookahead)
        scores = np.empty((issue.shape[0], int(meta.num_experts)), np.float32)
        replay_prompt(experts, np.ascontiguousarray(target % num_layers, dtype=np.int64), self._decay(num_layers),
                      self.store, np.ascontiguousarray(self.store_norm.T), self.store_rows, self.size,
                      np.ascontiguousarray(self.fallback, dtype=np.float32), self.access, self.cur, scores)  # fmt: skip
        self.end_prompt()
        return PromptPredictions(issue, target, scores)

    def predict_prompt_python(self, trace: Any, meta: Any) -> PromptPredictions:
        """The plain NumPy version of ``predict_prompt`` (the reference its test compares against)."""
        from emoe_jax.predict.drive import prompt_info

        num_layers = int(meta.num_layers)
        experts = np.asarray(trace.experts)  # [T, L, k]
        self.begin_prompt(prompt_info(trace, meta))
        num_steps = experts.shape[0] * num_layers
        issue, target = horizon_rows(num_steps, self.lookahead)
        h = self.lookahead + 1
        scores = np.empty((issue.shape[0], int(meta.num_experts)), np.float32)
        decay = self._decay(num_layers)[:, None]  # [h, 1]
        for s in range(num_steps):
            t, l = divmod(s, num_layers)
            rows = self.nearest()
            scores[s * h : (s + 1) * h] = rows[target[s * h : (s + 1) * h] % num_layers] * decay
            self.observe(t, l, experts[t, l])
        self.end_prompt()
        return PromptPredictions(issue, target, scores)
