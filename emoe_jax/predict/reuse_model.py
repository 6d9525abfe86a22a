"""Learned eviction scores: each expert's chance to be routed again within the next few tokens.

Why: at 10 % of DeepSeek-V2-Lite's experts the cache holds about one token's
experts, and which of them to keep depends on uses two to four tokens away
(docs/simulator.md, "Copy only"). The causal table's next-token reuse alone
ranks no better than recency there. This model is a logistic regression that
mixes that reuse with per-prompt recency and frequency of each expert, fitted
to "routed again at this layer within the next ``horizon`` tokens of the
prompt" (Hawkeye/LRB-style learned caching, on features a decoder has).

Features of expert e at layer l, computed right after step (t, l) ran; the
state is per prompt (reset at its first token), so a prompt's scores depend on
that prompt's routing only (see ``FEATURES``). One compiled function updates the
state and writes the features for one step; the whole-prompt path and the
step-by-step path both call it, so they agree by construction (tested).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from emoe_jax.numba_cache import configure as _configure_numba_cache

_configure_numba_cache()  # compiled code is cached in a user cache directory, not beside this file

try:  # numba is optional: without it the feature loop runs as plain (slow) Python.
    import numba

    njit = numba.njit(cache=True, nogil=True)
except ImportError:  # pragma: no cover - exercised only where numba is absent

    def njit(f):
        return f


FEATURES = (
    "bias",
    "routed at (t, l)",
    "logit of the table's next-token reuse",
    "log CRF, decay 0.5 per token",  # CRF = sum over past uses of decay^(tokens since): LRFU's recency-frequency
    "log CRF, decay 0.8 per token",
    "log CRF, decay 0.95 per token",
    "log(1 + tokens since the last use)",
    "log P(e | l) over the training traces",
    "uses so far / tokens so far",
    "log(1 + t)",
    "log(1 + uses so far)",
)
NUM_FEATURES = len(FEATURES)
CRF_DECAYS = np.array([0.5, 0.8, 0.95])
_NEVER = 1000  # "tokens since the last use" of an expert not used yet in this prompt (capped there)


def new_state(num_layers: int, num_experts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-prompt state: (crf [3, L*E] float64, last use token [L*E] int64, use count [L*E] float64)."""
    n = num_layers * num_experts
    return np.zeros((len(CRF_DECAYS), n)), np.full(n, -_NEVER, np.int64), np.zeros(n)


@njit
def step_features(crf, last, count, t, l, routed, reuse_row, log_prior, decays, out):
    """Add step (t, l)'s routing to the state; write its layer's features into ``out`` [E, F].

    crf [3, L*E] holds each CRF as of the expert's last use (brought to token t here); last [L*E];
    count [L*E]; routed [k] experts of (t, l); reuse_row [E] the table's reuse after (t, l);
    log_prior [L*E] log P(e | l).
    """
    num_experts = out.shape[0]
    base = l * num_experts
    used = np.zeros(num_experts, np.uint8)
    for j in range(routed.shape[0]):
        key = base + routed[j]
        used[routed[j]] = 1
        for d in range(decays.shape[0]):
            crf[d, key] = crf[d, key] * decays[d] ** (t - last[key]) + 1.0  # crf is 0 before the first use
        last[key] = t
        count[key] += 1.0
    for e in range(num_experts):
        key = base + e
        r = min(max(reuse_row[e], 1e-4), 1.0 - 1e-4)
        age = min(t - last[key], _NEVER)  # _NEVER for an expert not used yet in this prompt
        out[e, 0] = 1.0
        out[e, 1] = used[e]
        out[e, 2] = np.log(r / (1.0 - r))
        for d in range(decays.shape[0]):
            out[e, 3 + d] = np.log(1e-3 + crf[d, key] * decays[d] ** (t - last[key]))
        out[e, 6] = np.log1p(age)
        out[e, 7] = log_prior[key]
        out[e, 8] = count[key] / (t + 1.0)
        out[e, 9] = np.log1p(t)
        out[e, 10] = np.log1p(count[key])


@njit
def prompt_features(experts, reuse, log_prior, decays, crf, last, count, out):
    """Write features ``out`` [T*L, E, F] of one prompt (experts [T, L, k], reuse [T*L, E])."""
    num_tokens, num_layers, _ = experts.shape
    for t in range(num_tokens):
        for l in range(num_layers):
            s = t * num_layers + l
            step_features(crf, last, count, t, l, experts[t, l], reuse[s], log_prior, decays, out[s])


def prompt_feature_rows(experts: np.ndarray, reuse: np.ndarray, log_prior: np.ndarray) -> np.ndarray:
    """Features [T*L, E, F] of one prompt, from a fresh per-prompt state."""
    experts = np.ascontiguousarray(experts, np.int64)
    T, L, _ = experts.shape
    E = reuse.shape[1]
    out = np.zeros((T * L, E, NUM_FEATURES))
    log_prior = np.ascontiguousarray(log_prior, np.float64).reshape(-1)  # [L*E]
    prompt_features(experts, np.ascontiguousarray(reuse, np.float64), log_prior, CRF_DECAYS, *new_state(L, E), out)
    return out


def next_use_within(experts: np.ndarray, num_experts: int, horizon: int) -> np.ndarray:
    """Labels [T*L, E]: is expert e routed at layer l by one of tokens t+1 .. t+horizon of the prompt?"""
    T, L, _ = experts.shape
    routed = np.zeros((T + horizon, L, num_experts), bool)  # [T + H, L, E], zero past the prompt's end
    np.put_along_axis(routed[:T], experts.astype(np.int64), True, axis=2)
    ahead = np.zeros((T, L, num_experts), bool)
    for h in range(1, horizon + 1):
        ahead |= routed[h:h + T]
    return ahead.reshape(T * L, num_experts)


def fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3, iterations: int = 25) -> np.ndarray:
    """Weights [F] of a logistic regression (Newton's method, L2 ``ridge`` per row), x [N, F], y [N] bool.

    Newton on F = 11 weights converges in a handful of steps and needs no optimiser dependency.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    n, f = x.shape
    w = np.zeros(f)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) / n + ridge * w
        hess = (x * (p * (1.0 - p))[:, None]).T @ x / n + ridge * np.eye(f)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def reuse_probability(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """P(routed again within the horizon) [...] from features [..., F]."""
    return (1.0 / (1.0 + np.exp(-(features @ weights)))).astype(np.float32)


MAX_FIT_ROWS = 2_000_000  # (step, expert) rows a reuse model is fitted on; a strided subsample beyond


def reuse_fit_rows(experts: Sequence[np.ndarray], table_reuse: Callable[[int], np.ndarray], log_prior: np.ndarray,
                   num_experts: int, horizon: int, on_prompt: Callable[[int, np.ndarray, int], None] | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, int]:  # fmt: skip
    """The rows a reuse model is fitted on over prompts ``experts`` ([T, L, k] each): features [N, F], labels
    "routed again within ``horizon`` tokens" [N], and the stride: every stride-th (step, expert) row of each
    prompt, in (step, expert) order, at most about MAX_FIT_ROWS in all. ``table_reuse(i)`` gives prompt i's
    table reuse rows [T*L, E] (computed one prompt at a time). ``on_prompt(i, features [T*L, E, F], stride)``,
    if given, sees each prompt's full features (for later stages fitted on the same prompts)."""
    rows = sum(int(x.shape[0] * x.shape[1]) * num_experts for x in experts)
    stride = max(1, -(-rows // MAX_FIT_ROWS))
    xs, ys = [], []
    for i, x in enumerate(experts):
        features = prompt_feature_rows(x, table_reuse(i), log_prior)  # [T*L, E, F]
        if on_prompt is not None:
            on_prompt(i, features, stride)
        xs.append(features.reshape(-1, NUM_FEATURES)[::stride])
        ys.append(next_use_within(x, num_experts, horizon).reshape(-1)[::stride])
    return np.concatenate(xs), np.concatenate(ys), stride


def fit_reuse_model(experts: Sequence[np.ndarray], table_reuse: Callable[[int], np.ndarray], log_prior: np.ndarray,
                    num_experts: int, horizon: int) -> np.ndarray:  # fmt: skip
    """Logistic weights [F] for "routed again within ``horizon`` tokens" (rows: ``reuse_fit_rows``)."""
    x, y, _ = reuse_fit_rows(experts, table_reuse, log_prior, num_experts, horizon)
    return fit_logistic(x, y)


class ReuseRowHooks:
    """Step-path hooks of a learned-reuse predictor: a per-prompt state, and after each observed step its
    layer's reuse row (``reuse(t, l)``), from the same ``step_features`` as the whole-prompt path.
    The predictor sets ``reuse_weights`` [F] when fitted."""

    reuse_weights: np.ndarray | None

    def _begin_reuse_rows(self, num_layers: int, num_experts: int, log_prior: np.ndarray) -> None:
        self._state = new_state(num_layers, num_experts)
        self._log_prior = np.ascontiguousarray(log_prior, np.float64).reshape(-1)  # [L*E]
        self._reuse_row: tuple[int, int, np.ndarray] | None = None

    def _reuse_features(self, t: int, l: int, experts: np.ndarray, table_reuse_row: np.ndarray) -> np.ndarray:
        """Advance the state by step (t, l); its layer's features [E, F]."""
        features = np.zeros((table_reuse_row.shape[0], NUM_FEATURES))  # [E, F]
        step_features(*self._state, t, l, np.asarray(experts, np.int64), np.asarray(table_reuse_row, np.float64),
                      self._log_prior, CRF_DECAYS, features)  # fmt: skip
        return features

    def _observe_reuse_row(self, t: int, l: int, experts: np.ndarray, table_reuse_row: np.ndarray) -> None:
        self._reuse_row = (t, l, reuse_probability(self._reuse_features(t, l, experts, table_reuse_row),
                                                   self.reuse_weights))  # fmt: skip

    def reuse(self, t: int, l: int) -> np.ndarray:
        """After (t, l) routed: each expert's chance to be routed at layer l again within the horizon [E]."""
        if self._reuse_row is None or self._reuse_row[:2] != (t, l):
            raise RuntimeError(f"{getattr(self, 'name', 'predictor')}: reuse({t}, {l}) asked before observe({t}, {l})")
        return self._reuse_row[2]
