"""Compiled replay of one prompt for MoE-Infinity's real policy (``moe_infinity.MoEInfinity``).

The Python path of ``MoEInfinity.predict_prompt`` does, per step s = (t, l): pick
the nearest stored EAM (argmax of the summed per-layer cosines), emit its rows
for the targets, then add token t's routing at layer l to the current EAM and
update row l's cosine with every stored EAM. With ~1,600 stored requests and a
million steps that is ~100 s of NumPy calls; this kernel does the same loop in
one numba function (plain Python where numba is absent).

It reproduces the Python path's arithmetic exactly, in the same types and order:
per-step dot updates summed in float32 over the k routed experts, then added
in float64; the current row's squared norm updated in float32 per step;
cosines and their sums in float64; ties of the nearest request to the lowest
index. The test suite compares both paths on random traces (bit for bit).
"""

from __future__ import annotations

import numpy as np

from emoe_jax.numba_cache import configure as _configure_numba_cache

_configure_numba_cache()  # compiled code is cached in a user cache directory, not beside this file

try:  # numba is optional: without it the kernel runs as plain (slow) Python.
    import numba

    njit = numba.njit(cache=True, nogil=True)
    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is absent
    HAVE_NUMBA = False

    def njit(f):
        return f


@njit
def replay_prompt(
    experts,  # [T, L, k] int64 routed experts of the prompt
    target_layer,  # [R] int64 layer of each prediction row (issue-major, h rows per step)
    decay,  # [h] float32 distance decay 1 - d / (L + 1)
    store,  # [L, E, cap] float32 stored EAM counts
    store_norm_t,  # [L, cap] float32 row norms of the stored EAMs (layer-major: contiguous per layer)
    store_rows,  # [cap, L, E] float32 row-normalised stored EAMs
    size,  # stored requests in use (the first `size` of cap)
    fallback,  # [L, E] float32 mean stored EAM: the prediction before anything is routed
    access,  # [cap] int64 times chosen as nearest (updated in place)
    cur,  # [L, E] float32 current EAM (zeros on entry; filled in place)
    scores,  # [R, E] float32 output
):
    num_tokens, num_layers, k = experts.shape
    num_experts = cur.shape[1]
    h = decay.shape[0]
    cur_norm2 = np.zeros(num_layers, np.float64)  # [L]
    dots = np.zeros((num_layers, size), np.float64)  # [L, N]
    cos = np.zeros((num_layers, size), np.float64)  # [L, N]
    sim_sum = np.zeros(size, np.float64)  # [N]
    acc = np.zeros(size, np.float32)  # [N] this step's dot increments
    seen = 0
    for s in range(num_tokens * num_layers):
        t = s // num_layers
        l = s - t * num_layers
        # nearest(): the stored EAM with the highest summed cosine (first on ties), or the mean.
        best = -1
        if seen > 0 and size > 0:
            best = 0
            top = sim_sum[0]
            for i in range(1, size):
                if sim_sum[i] > top:
                    top = sim_sum[i]
                    best = i
            access[best] += 1
        for j in range(h):
            row = s * h + j
            lt = target_layer[row]
            for e in range(num_experts):
                src = fallback[lt, e] if best < 0 else store_rows[best, lt, e]
                scores[row, e] = np.float32(src * decay[j])
        # observe(t, l): routing of token t at layer l.
        if cur_norm2[l] == 0.0:
            seen += 1
        inc = np.float32(0.0)
        for j in range(k):
            inc += np.float32(2.0) * cur[l, experts[t, l, j]] + np.float32(1.0)
        cur_norm2[l] += np.float64(inc)
        for j in range(k):
            cur[l, experts[t, l, j]] += np.float32(1.0)
        if size == 0:
            continue
        # Row l's dot product with every stored EAM grows by the stored counts of the routed
        # experts, summed in float32 in routing order (as NumPy's .sum(0) does), then added in
        # float64. Loops run over the contiguous stored-request axis.
        e0 = experts[t, l, 0]
        for i in range(size):
            acc[i] = store[l, e0, i]
        for j in range(1, k):
            e = experts[t, l, j]
            for i in range(size):
                acc[i] = np.float32(acc[i] + store[l, e, i])
        norm = np.sqrt(cur_norm2[l])
        for i in range(size):
            dots[l, i] += np.float64(acc[i])
            denom = norm * np.float64(store_norm_t[l, i])
            new = dots[l, i] / denom if denom > 0 else 0.0
            sim_sum[i] += new - cos[l, i]
            cos[l, i] = new
