"""Drive a predictor over a recorded prompt, strictly in decoder order.

Steps:
1. ``begin_prompt`` with the prompt's metadata; oracles alone get ``reveal(trace)``.
2. Token-major loop: ``begin_token``, then per layer ``observe_router_input``
   (if the trace stores router inputs), ``predict``, ``observe``.
3. Each Prediction's (token_offset, layer) targets become token-major step
   indices; a target before the current step is a predictor bug and raises.
4. ``end_prompt``.

``prompt_predictions`` takes the predictor's numpy fast path
(``predict_prompt``) when it has one; ``step_predictions`` always walks the
steps and is the reference the fast paths are tested against.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from emoe_jax.predict.base import Prediction, PromptInfo, PromptPredictions, target_steps


def prompt_info(trace: Any, meta: Any) -> PromptInfo:
    """The metadata a decoder has before the first token of ``trace`` runs."""
    return PromptInfo(
        prompt_id=int(trace.prompt_id),
        task=str(trace.task),
        text=str(trace.text),
        n_prefill=int(trace.n_prefill),
        num_layers=int(meta.num_layers),
        num_experts=int(meta.num_experts),
        top_k=int(meta.top_k),
    )


def _check_targets(pred: Prediction, t: int, l: int, num_layers: int, num_experts: int, name: str) -> np.ndarray:
    """Token-major target steps of ``pred`` made at (t, l); raises on a bad target."""
    offsets, layers = pred.targets[:, 0], pred.targets[:, 1]
    if pred.scores.shape[1] != num_experts:
        raise ValueError(
            f"predictor {name!r} returned scores for {pred.scores.shape[1]} experts, "
            f"the trace has {num_experts}"
        )
    if np.any((layers < 0) | (layers >= num_layers)) or np.any(offsets < 0):
        raise ValueError(
            f"predictor {name!r} at (t={t}, l={l}) returned targets outside "
            f"(token_offset >= 0, layer in 0..{num_layers - 1}): {pred.targets.tolist()}"
        )
    target = target_steps(t, offsets, layers, num_layers)
    if np.any(target < t * num_layers + l):
        raise ValueError(
            f"predictor {name!r} at (t={t}, l={l}) predicted a step that already ran: "
            f"{pred.targets.tolist()}"
        )
    return target


def step_predictions(predictor: Any, trace: Any, meta: Any) -> PromptPredictions:
    """Reference path: call the predictor's hooks step by step."""
    num_layers, num_experts = int(meta.num_layers), int(meta.num_experts)
    experts = np.asarray(trace.experts)  # [T, L, k]
    weights = None if trace.weights is None else np.asarray(trace.weights)  # [T, L, k]
    hidden = trace.hidden  # [T, L, H] or None
    token_ids = np.asarray(trace.token_ids)  # [T]
    predictor.begin_prompt(prompt_info(trace, meta))
    if getattr(predictor, "oracle", False):
        predictor.reveal(trace)
    issue, target, scores = [], [], []
    reuse_hook = getattr(predictor, "reuse", None)
    reuse = [] if callable(reuse_hook) else None
    for t in range(experts.shape[0]):
        predictor.begin_token(t, int(token_ids[t]))
        for l in range(num_layers):
            if hidden is not None:
                predictor.observe_router_input(t, l, np.asarray(hidden[t, l]))
            pred = predictor.predict(t, l)
            if pred is not None and pred.targets.shape[0]:
                steps = _check_targets(pred, t, l, num_layers, num_experts, predictor.name)
                issue.append(np.full(steps.shape[0], t * num_layers + l, np.int64))
                target.append(steps)
                scores.append(pred.scores)
            predictor.observe(t, l, experts[t, l], None if weights is None else weights[t, l])
            if reuse is not None:
                reuse.append(np.asarray(reuse_hook(t, l), np.float32))
    predictor.end_prompt()
    reuse_arr = None if reuse is None else np.stack(reuse) if reuse else np.zeros((0, num_experts), np.float32)
    if not issue:
        empty = PromptPredictions.empty(num_experts)
        return PromptPredictions(empty.issue_step, empty.target_step, empty.scores, reuse=reuse_arr)
    return PromptPredictions(
        np.concatenate(issue), np.concatenate(target).astype(np.int64), np.concatenate(scores), reuse=reuse_arr
    )


def prompt_predictions(predictor: Any, trace: Any, meta: Any, fast: bool = True) -> PromptPredictions:
    """All predictions for one prompt; uses ``predict_prompt`` when available and ``fast``."""
    fast_path = getattr(predictor, "predict_prompt", None)
    if fast and fast_path is not None:
        out = fast_path(trace, meta)
        if out is not None:
            return out
    return step_predictions(predictor, trace, meta)


class MemoisedPredictor:
    """A fitted predictor whose per-prompt predictions are computed once and replayed.

    The simulator asks for ``predict_prompt`` first, so every cell after the
    first reuses the predictions; hooks never run twice over the same prompts.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.oracle = bool(getattr(inner, "oracle", False))
        self.eviction = getattr(inner, "eviction", "lru")
        self.lookahead = getattr(inner, "lookahead", 1)
        self._cache: dict[int, Any] = {}

    def predict_prompt(self, trace: Any, meta: Any) -> Any:
        key = int(trace.prompt_id)
        if key not in self._cache:
            self._cache[key] = prompt_predictions(self.inner, trace, meta)
        return self._cache[key]
