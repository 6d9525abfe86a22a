"""Drive a Predictor from inside the engine, in decoder order, and turn its scores into prefetch requests.

The engine calls, per generate call:
  begin(prompts, tasks, texts)   -> begin_prompt for every batch row
  replay_prefill(...)            -> the prefill's routing, token by token (begin_token + observe)
  per decode step: begin_token(step, tokens, done)
    per MoE layer, after the layer's FFN is dispatched:
      layer(step, moe_layer, ids, weights, router_input, done) -> prefetch requests
      (and `scores`: the latest [E] scores per predicted layer, which score eviction ranks by; as in
      the simulator, a predictor's reuse row for the layer that just ran replaces its predictions)
  end()                          -> end_prompt

A predictor sees exactly what it sees in the simulator: at (t, l) the routing
of earlier tokens, token t's routing at layers < l, token ids up to t, the
prompt's metadata, and router inputs of layers <= l. Rows of a batch each get
their own shallow copy (fitted tables are shared; per-prompt state is reset by
``begin_prompt``), and their requests are merged.
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np

from ..predict.base import BasePredictor, PromptInfo, target_steps
from .engine_config import check_eviction_scores


class PredictorDriver:
    def __init__(self, predictor, num_moe_layers: int, num_experts: int, top_k: int,
                 prefetch_k: int | None = None, min_score: float = 0.0, keep_scores: bool = True,
                 eviction_scores: str = "latest"):
        if getattr(predictor, "oracle", False):
            raise ValueError(f"predictor {predictor.name!r} is an oracle (it reads the future); it exists only "
                             "in the simulator. Choose a causal predictor for the runtime.")
        self.predictor = predictor
        self.num_moe_layers, self.num_experts, self.top_k = num_moe_layers, num_experts, top_k
        self.prefetch_k = top_k if prefetch_k is None else int(prefetch_k)
        self.min_score = float(min_score)
        hook = getattr(type(predictor), "observe_router_input", None)
        self.wants_router_inputs = hook is not None and hook is not BasePredictor.observe_router_input
        self.rows: list = []
        self.lengths = np.zeros(0, np.int64)
        # MoE layer -> [E] float32 scores of the latest `layer` call: per row the nearest target of that
        # layer (as the simulator's score updates), then the best over rows.
        self.scores: dict[int, np.ndarray] = {}
        self.keep_scores = keep_scores  # False: only score eviction reads them, so skip the work per layer
        # "latest": predictions, then the layer's own reuse row once it ran (the simulator's default);
        # "reuse": reuse rows only (predictions still prefetch but never rank eviction), as --eviction-scores reuse
        check_eviction_scores(eviction_scores)
        self.eviction_scores = eviction_scores

    @property
    def name(self) -> str:
        return str(getattr(self.predictor, "name", type(self.predictor).__name__))

    def begin(self, prompts: Sequence[Sequence[int]], tasks: Sequence[str] | None,
              texts: Sequence[str] | None) -> None:
        b = len(prompts)
        self.rows = [self.predictor] if b == 1 else [copy.copy(self.predictor) for _ in range(b)]
        self.lengths = np.array([len(p) for p in prompts], np.int64)
        for i, (row, prompt) in enumerate(zip(self.rows, prompts)):
            row.begin_prompt(PromptInfo(
                prompt_id=i, task=(tasks[i] if tasks else "") or "", text=(texts[i] if texts else "") or "",
                n_prefill=len(prompt), num_layers=self.num_moe_layers, num_experts=self.num_experts,
                top_k=self.top_k))

    def replay_prefill(self, prompts: Sequence[Sequence[int]], ids: list[np.ndarray],
                       weights: list[np.ndarray], pad_len: np.ndarray) -> None:
        """ids/weights: per MoE layer [B, T, k] of the (left-padded) prefill."""
        for i, (row, prompt) in enumerate(zip(self.rows, prompts)):
            off = int(pad_len[i])
            for p, tok in enumerate(prompt):
                row.begin_token(p, int(tok))
                for moe_layer in range(self.num_moe_layers):
                    row.observe(p, moe_layer, ids[moe_layer][i, off + p], weights[moe_layer][i, off + p])

    def begin_token(self, step: int, tokens: np.ndarray, done: np.ndarray) -> None:
        for i, row in enumerate(self.rows):
            if not done[i]:
                row.begin_token(int(self.lengths[i] + step), int(tokens[i]))

    def layer(self, step: int, moe_layer: int, ids: np.ndarray, weights: np.ndarray, router_input,
              done: np.ndarray) -> list[tuple[int, float, int, int]]:
        """Predict at (token, moe_layer), then observe its routing. ids/weights [B, 1, k]; router_input
        [B, 1, H] (device) or None. Returns requests (target step, score, layer, expert), where a
        step counts token-major from the first decode token: step * L + layer."""
        current = step * self.num_moe_layers + moe_layer
        hidden = np.asarray(router_input, np.float32) if (self.wants_router_inputs and router_input is not None) else None
        best: dict[tuple[int, int], tuple[int, float]] = {}
        self.scores = {}
        for i, row in enumerate(self.rows):
            if done[i]:
                continue
            t = int(self.lengths[i] + step)
            if hidden is not None:
                row.observe_router_input(t, moe_layer, hidden[i, 0])
            pred = row.predict(t, moe_layer)
            row.observe(t, moe_layer, ids[i, 0], weights[i, 0])
            reuse_hook = getattr(row, "reuse", None)
            if self.keep_scores and callable(reuse_hook):  # after the layer ran: its experts' reuse scores
                reuse_row = np.asarray(reuse_hook(t, moe_layer), np.float32)
                old = self.scores.get(int(moe_layer))
                self.scores[int(moe_layer)] = reuse_row if old is None else np.maximum(old, reuse_row)
            if pred is None:
                continue
            targets = target_steps(step, pred.targets[:, 0], pred.targets[:, 1], self.num_moe_layers)
            nearest: dict[int, tuple[int, np.ndarray]] = {}
            for target, layer, scores in zip(targets.tolist(), pred.targets[:, 1].tolist(), pred.scores):
                if target <= current:
                    continue  # that layer has routed already
                if self.keep_scores and self.eviction_scores == "latest" and (
                        layer not in nearest or target < nearest[layer][0]):
                    nearest[layer] = (target, scores)
                top = np.argsort(-scores, kind="stable")[: self.prefetch_k]
                for e in top[scores[top] > self.min_score]:
                    key = (int(layer), int(e))
                    old = best.get(key)
                    if old is None or (target, -scores[e]) < (old[0], -old[1]):
                        best[key] = (target, float(scores[e]))
            for layer, (_, scores) in nearest.items():  # empty unless keep_scores
                row_scores = np.asarray(scores, np.float32)
                old = self.scores.get(int(layer))
                self.scores[int(layer)] = row_scores if old is None else np.maximum(old, row_scores)
        return [(target, score, layer, e) for (layer, e), (target, score) in best.items()]

    def end(self) -> None:
        for row in self.rows:
            row.end_prompt()
        self.rows = []


__all__ = ["PredictorDriver"]
