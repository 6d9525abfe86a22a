"""Within-token model: which experts layer l of token t routes to, from the layers token t already routed.

Why: a prefetch for step (t, l) is issued once (t, l-1) routed, and a wrong one is
a wasted copy on a link that is busy all the time. The causal table reads layer
l-1 of the token alone; the cross-expert model (``cross_model``) is fitted for the
next tokens, not this one. Layers 0 .. l-1 of the same token together say much
more about layer l: a ridge regression per layer l from the cross model's state
before (t, l) routes,

  x(t, l) = decay * CRF(t-1) + token t's routing at layers < l + the table's expected use of token t at layers >= l,

to "routed at (t, l)" ranks the step's top expert (among those its layer did not
just use) right 82 % of the time on Puffin training prompts, against 74 % for the
table with the recency features (docs/simulator.md, "Prefetch that reads the token's earlier
layers").

Fitting: L ridge regressions over the same tokens. x(t, l) differs from x(t, l-1)
only in layer l-1's block (E columns: expected use -> routing), so the L normal
matrices come from one [N+1]-square Gram matrix plus rank-E corrections per layer
(N = L*E): about the cost of three Gram matrices instead of L.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from emoe_jax.predict.cross_model import DECAY, RIDGE, crf_vectors

CHUNK_TOKENS = 2048  # tokens per Gram update (fewer, larger matrix products)


def token_start_states(experts: np.ndarray, expected: np.ndarray,
                       decay: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Of one prompt (experts [T, L, k], expected [T, L, E]): x(t, 0) [T, N] (decay * CRF(t-1) + expected use
    of token t at every layer), token t's routing [T, N] (0/1) and what it changes in the state, routing -
    expected use [T, N]."""
    T, L, _ = experts.shape
    E = expected.shape[2]
    used = np.zeros((T, L * E))
    np.put_along_axis(used, (experts + (np.arange(L) * E)[None, :, None]).reshape(T, -1), 1.0, axis=1)
    expected = expected.reshape(T, L * E).astype(np.float64)
    start = expected.copy()
    if T > 1:
        start[1:] += decay * crf_vectors(experts, E, decay)[:-1]
    return start, used, used - expected


def fit_within_model(experts: Sequence[np.ndarray], expected: Callable[[int], np.ndarray], num_experts: int,
                     decay: float = DECAY, ridge: float = RIDGE) -> np.ndarray:  # fmt: skip
    """Ridge weights [L, N+1, E] (row N: intercept): x(t, l) -> routed at (t, l), over prompts ``experts``
    ([T, L, k] each); ``expected(i)`` gives prompt i's expected use [T, L, E]."""
    if not experts:
        raise ValueError("the within-token model needs at least one training prompt")
    L, E = experts[0].shape[1], num_experts
    n = L * E
    gram0 = np.zeros((n + 1, n + 1))  # sum of x(t, 0) x(t, 0)^T (with the intercept column)
    cross = np.zeros((L, n + 1, E))  # layer l: sum of x(t, l-1)^T d(t, l) over layer l-1's block
    corr = np.zeros((L, E, E))  # layer l: sum of d^T d
    moment = np.zeros((L, n + 1, E))  # layer l: sum of x(t, l)^T routed(t, l)
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def flush() -> None:
        start, used, delta = (np.concatenate(parts) for parts in zip(*pending))  # [n_tok, N] each
        x = np.hstack([start, np.ones((len(start), 1))])
        gram0[:] += x.T @ x
        for l in range(L):
            if l > 0:  # layer l-1's block: expected use -> routing
                block = slice((l - 1) * E, l * E)
                d = delta[:, block]  # [n_tok, E]
                cross[l] += x.T @ d
                corr[l] += d.T @ d
                x[:, block] += d
            moment[l] += x.T @ used[:, l * E:(l + 1) * E]
        pending.clear()

    pending_tokens = 0
    for i, x in enumerate(experts):
        pending.append(token_start_states(np.asarray(x, np.int64), expected(i), decay))
        pending_tokens += len(x)
        if pending_tokens >= CHUNK_TOKENS:
            flush()
            pending_tokens = 0
    if pending:
        flush()
    weights = np.zeros((L, n + 1, E))
    gram = gram0
    for l in range(L):
        if l > 0:
            block = slice((l - 1) * E, l * E)
            gram[:, block] += cross[l]
            gram[block, :] += cross[l].T
            gram[block, block] += corr[l]
        weights[l] = np.linalg.solve(gram + ridge * np.eye(n + 1), moment[l])
    return weights


def prompt_within_rows(experts: np.ndarray, expected: np.ndarray, weights: np.ndarray,
                       decay: float = DECAY) -> np.ndarray:  # fmt: skip
    """Rows [T*L, E]: x(t, l) @ W[l] + b[l] at every step of one prompt (experts [T, L, k], expected [T, L, E])."""
    T, L, _ = experts.shape
    E = expected.shape[2]
    n = L * E
    start, _, delta = token_start_states(np.asarray(experts, np.int64), expected, decay)  # [T, N] each
    w = weights[:, :n]  # [L, N, E]
    rows = (start @ w.transpose(1, 0, 2).reshape(n, L * E)).reshape(T, L, E) + weights[:, n][None]
    for l in range(1, L):
        rows[:, l] += delta[:, :l * E] @ w[l, :l * E]
    return rows.reshape(T * L, E)


def within_row(state: np.ndarray, l: int, weights: np.ndarray) -> np.ndarray:
    """[E]: layer l's row from the cross model's state before (t, l) routes (step path)."""
    n = state.shape[0]
    return state @ weights[l, :n] + weights[l, n]
