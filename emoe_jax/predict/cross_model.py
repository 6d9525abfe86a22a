"""Cross-expert reuse: which experts of a layer the next tokens use, from the recent routing of *all* experts.

Why: the reuse model (``reuse_model``) sees each expert alone (its own recency and
frequency). Experts co-occur: the set a prompt has been routed to across all
layers (its topic, language, code vs prose) says which experts of layer l come
next. A ridge regression from the prompt's recency-frequency vector over all
L*E layer-experts (CRF, one decay) to "routed at (l, e) within the next
``horizon`` tokens" captures that linearly. On the DeepSeek-V2-Lite traces it
lifts recall@12 of that target from 0.43 (causal-reuse's reuse rows) to 0.50
(docs/simulator.md, "Cross-expert reuse").

Causal at every step. The row of layer l at step (t, l) reads the state
  x(t, l) = decay * CRF(t-1) + routing of token t at layers <= l
            + the token table's expected use of token t at layers > l
(token t's id is known; its later layers have not routed yet), so
row(t, l) = x(t, l) @ W[:, layer l] + b[layer l], a linear score near [0, 1].
One compiled function advances the state and writes a row; the whole-prompt
path and the step path both call it, so they agree by construction.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from emoe_jax.predict.reuse_model import next_use_within, njit

DECAY = 0.5  # CRF decay per token of the input vector (chosen on training prompts: 0.3 / 0.5 / 0.8 / 0.95)
RIDGE = 10.0  # L2 penalty of the ridge regression (on a [L*E + 1]-square normal matrix)


def crf_vectors(experts: np.ndarray, num_experts: int, decay: float) -> np.ndarray:
    """[T, L*E] float64: each token's end-of-token CRF over all layer-experts of one prompt (experts [T, L, k])."""
    T, L, _ = experts.shape
    used = np.zeros((T, L * num_experts))
    np.put_along_axis(used, (experts + (np.arange(L) * num_experts)[None, :, None]).reshape(T, -1), 1.0, axis=1)
    crf = np.zeros_like(used)
    running = np.zeros(L * num_experts)
    for t in range(T):
        running = running * decay + used[t]
        crf[t] = running
    return crf


def fit_cross_model(experts: Sequence[np.ndarray], num_experts: int, horizon: int, decay: float = DECAY,
                    ridge: float = RIDGE) -> np.ndarray:  # fmt: skip
    """Ridge weights [L*E + 1, L*E] (last row: intercept) from end-of-token CRF vectors to "routed within
    ``horizon`` tokens", over prompts ``experts`` ([T, L, k] each). Normal equations summed prompt by prompt,
    so memory stays at two [L*E + 1]-square matrices."""
    if not experts:
        raise ValueError("the cross-expert model needs at least one training prompt")
    n = experts[0].shape[1] * num_experts
    gram = np.zeros((n + 1, n + 1))
    moment = np.zeros((n + 1, n))
    for x in experts:
        feats = np.hstack([crf_vectors(x, num_experts, decay), np.ones((x.shape[0], 1))])  # [T, N+1]
        labels = next_use_within(x, num_experts, horizon).reshape(x.shape[0], n)  # [T, N] bool
        gram += feats.T @ feats
        moment += feats.T @ labels
    gram[np.diag_indices_from(gram)] += ridge
    return np.linalg.solve(gram, moment)


@njit
def begin_token(crf, state, expected, decay):
    """Token start: crf [N] decays; state [N] = crf + expected [N] (the token table's expected use of every layer)."""
    for q in range(crf.shape[0]):
        crf[q] *= decay
        state[q] = crf[q] + expected[q]


@njit
def layer_row(state, l, weights, out):
    """Layer l's row ``out`` [E] = state @ weights[:N, layer l] + weights[N, layer l] of the current state."""
    num_experts = out.shape[0]
    base = l * num_experts
    n = state.shape[0]
    for e in range(num_experts):
        out[e] = weights[n, base + e]
    for q in range(n):
        v = state[q]
        if v != 0.0:
            for e in range(num_experts):
                out[e] += v * weights[q, base + e]


@njit
def cross_step(crf, state, l, routed, weights, out):
    """Step (t, l): token t's experts ``routed`` [k] at layer l replace layer l's expected use in ``state``;
    write layer l's row ``out`` [E] of the new state."""
    num_experts = out.shape[0]
    base = l * num_experts
    for j in range(routed.shape[0]):
        crf[base + routed[j]] += 1.0
    for e in range(num_experts):
        state[base + e] = crf[base + e]
    layer_row(state, l, weights, out)


@njit
def _prompt_rows(experts, expected, weights, decay, before, after):
    num_tokens, num_layers, _ = experts.shape
    n = expected.shape[1]
    crf = np.zeros(n)
    state = np.zeros(n)
    for t in range(num_tokens):
        begin_token(crf, state, expected[t], decay)
        for l in range(num_layers):
            s = t * num_layers + l
            layer_row(state, l, weights, before[s])
            cross_step(crf, state, l, experts[t, l], weights, after[s])


def prompt_cross_rows(experts: np.ndarray, expected: np.ndarray, weights: np.ndarray,
                      decay: float = DECAY) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Rows (before, after) [T*L, E] each of one prompt: layer l's row at step (t, l) before and after
    token t's routing at layer l enters the state. experts [T, L, k], expected [T, L, E] (token table's
    expected use)."""
    T, L, _ = experts.shape
    E = expected.shape[2]
    before, after = np.zeros((T * L, E)), np.zeros((T * L, E))
    _prompt_rows(np.ascontiguousarray(experts, np.int64), np.ascontiguousarray(expected.reshape(T, L * E), np.float64),
                 np.ascontiguousarray(weights, np.float64), float(decay), before, after)  # fmt: skip
    return before, after
