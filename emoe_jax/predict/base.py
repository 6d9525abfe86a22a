"""The Predictor interface shared by the simulator and the runtime prefetcher.

A predictor is driven in token-major order, exactly as a decoder runs:

1. ``begin_prompt(info)``: prompt metadata (id, task label, text, sizes).
2. for each token t:
   a. ``begin_token(t, token_id)``: the input token of step t is known.
   b. for each MoE layer l:
      - ``observe_router_input(t, l, hidden)`` (only where a trace stores router
        inputs): the input of layer l's router is known before it routes;
      - ``predict(t, l) -> Prediction | None``: scores for the (token, layer)
        targets it declares, all at or after (t, l);
      - ``observe(t, l, experts, weights)``: layer l of token t has routed.
3. ``end_prompt()``.

Because observations arrive strictly in this order, a predictor cannot see the
future: at ``predict(t, l)`` it holds the routing of all earlier tokens, of
token t at layers < l, token ids up to t, prompt metadata, and router inputs of
layers <= l. Only oracles (``oracle = True``) are handed the whole prompt, via
``reveal(trace)``, and they are marked as such in every report.

Predictors may offer a fast path ``predict_prompt(trace) -> PromptPredictions``
that computes the same predictions for a whole prompt with numpy; the tests
check it against the step path and against shuffled futures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

# Eviction policies the simulator knows. "belady" reads the future (oracle).
EVICTION_POLICIES = ("lru", "lfu", "belady", "score")


@dataclass(frozen=True)
class PromptInfo:
    """What a decoder knows about a prompt before its first token runs."""

    prompt_id: int
    task: str
    text: str
    n_prefill: int
    num_layers: int
    num_experts: int
    top_k: int


@dataclass(frozen=True)
class Prediction:
    """Expert scores for some (token, layer) targets at or after the current step.

    ``targets[i] = (token_offset, layer)``: token_offset 0 is the current token t,
    1 is token t+1 (the simulator's lookahead is at most one token). ``scores[i]`` are non-negative, higher means more likely to be
    used (probabilities, frequencies or counts); the simulator prefetches the
    top-m experts whose score is above its ``min_score``.
    """

    targets: np.ndarray  # [h, 2] int: (token_offset, layer)
    scores: np.ndarray  # [h, E] float32

    def __post_init__(self) -> None:
        targets = np.asarray(self.targets, dtype=np.int64).reshape(-1, 2)
        scores = np.asarray(self.scores, dtype=np.float32)
        if scores.ndim != 2 or scores.shape[0] != targets.shape[0]:
            raise ValueError(
                f"Prediction: scores must be [h, E] with h = len(targets) = {targets.shape[0]}, "
                f"got shape {scores.shape}"
            )
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "scores", scores)


@dataclass(frozen=True)
class PromptPredictions:
    """All predictions of one prompt, flattened; steps are token-major (s = t*L + l)."""

    issue_step: np.ndarray  # [R] int64: step at which the prediction was made
    target_step: np.ndarray  # [R] int64: step it is about (>= issue_step)
    scores: np.ndarray  # [R, E] float32
    # [S, E] float32 or None: after step s ran, each expert of s's layer's chance to be routed
    # again by the next token at that layer (predictors with a ``reuse(t, l)`` hook; read by
    # score eviction, cost-aware admission and the per-expert copy/host-compute choice)
    reuse: np.ndarray | None = None

    @staticmethod
    def empty(num_experts: int) -> "PromptPredictions":
        return PromptPredictions(
            np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, num_experts), np.float32)
        )

    def __len__(self) -> int:
        return int(self.issue_step.shape[0])


@runtime_checkable
class Predictor(Protocol):
    """What the simulator and the runtime prefetcher call. See the module docstring."""

    name: str
    oracle: bool  # True only if the predictor reads the future via reveal()
    eviction: str  # eviction policy it is meant to be paired with (EVICTION_POLICIES)

    def fit(self, train: Any) -> None: ...
    def begin_prompt(self, info: PromptInfo) -> None: ...
    def begin_token(self, t: int, token_id: int) -> None: ...
    def observe_router_input(self, t: int, l: int, hidden: np.ndarray) -> None: ...
    def predict(self, t: int, l: int) -> Prediction | None: ...
    def observe(
        self, t: int, l: int, experts: np.ndarray, weights: np.ndarray | None = None
    ) -> None: ...
    def end_prompt(self) -> None: ...


class BasePredictor:
    """Defaults for every hook: no fitting, no predictions, LRU eviction.

    Subclasses set ``name`` and override what they need. ``lookahead`` is the
    furthest target, in layers ahead of the current step (token-major, so it may
    reach into token t+1); targets are layers l .. l+lookahead.
    """

    name = "base"
    oracle = False
    eviction = "lru"
    # True if predict(t, l) reads layer l's own router input (which exists only after layer l-1's
    # expert compute and layer l's attention): the simulator then refuses to issue step s's
    # predictions right after step s-1 routed (SimConfig.prefetch_issue = "routed")
    reads_current_router_input = False

    def __init__(self, lookahead: int = 1) -> None:
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0 layers, got {lookahead}")
        self.lookahead = int(lookahead)
        self.info: PromptInfo | None = None

    # -- hooks ---------------------------------------------------------------
    def fit(self, train: Any) -> None:
        return None

    def begin_prompt(self, info: PromptInfo) -> None:
        self.info = info

    def begin_token(self, t: int, token_id: int) -> None:
        return None

    def observe_router_input(self, t: int, l: int, hidden: np.ndarray) -> None:
        return None

    def predict(self, t: int, l: int) -> Prediction | None:
        return None

    def observe(
        self, t: int, l: int, experts: np.ndarray, weights: np.ndarray | None = None
    ) -> None:
        return None

    def end_prompt(self) -> None:
        return None

    # -- helpers -------------------------------------------------------------
    def target_list(self, t: int, l: int, num_layers: int) -> np.ndarray:
        """Targets (token_offset, layer) for distances 0..lookahead from (t, l)."""
        steps = l + np.arange(self.lookahead + 1)  # [h] steps relative to token t's layer 0
        return np.stack([steps // num_layers, steps % num_layers], axis=1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, lookahead={self.lookahead})"


def require_fitted(predictor: BasePredictor, attr: str) -> Any:
    """The fitted state, or a clear error naming the missing fit() call."""
    value = getattr(predictor, attr, None)
    if value is None:
        raise RuntimeError(
            f"predictor {predictor.name!r} needs training traces: call fit(train) first "
            "(CLI: --train-traces DIR or --split)"
        )
    return value


def target_steps(token: int, offsets: np.ndarray, layers: np.ndarray, num_layers: int) -> np.ndarray:
    """Token-major step indices of a Prediction's targets made at `token`.

    Step s = token * L + layer counts (token, MoE layer) pairs in the order they run;
    target (offset, layer) is layer `layer` of token `token + offset`. The simulator's
    drive loop and the runtime's predictor driver both place predictions with this.
    """
    return (token + np.asarray(offsets, np.int64)) * num_layers + np.asarray(layers, np.int64)


def horizon_rows(num_steps: int, lookahead: int) -> tuple[np.ndarray, np.ndarray]:
    """Issue and target steps of a predictor that targets distances 0..lookahead at every step.

    Rows are ordered as the step path emits them: by issue step, then distance.
    Targets may run past the prompt's last step (token t+1 of the last token); the
    simulator drops those, exactly as it does for the step path.
    """
    dist = np.arange(lookahead + 1, dtype=np.int64)  # [h]
    issue = np.repeat(np.arange(num_steps, dtype=np.int64), lookahead + 1)  # [S*h]
    target = issue + np.tile(dist, num_steps)  # [S*h]
    return issue, target
