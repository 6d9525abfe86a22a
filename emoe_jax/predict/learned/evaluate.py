"""Validation recall@k of the learned predictor over real tokens only.

For every real step s = (t, l) of every prompt and every distance d with s+d
inside the prompt: recall@k = |top-k scored experts ∩ experts routed at s+d| / top_k,
summed per target layer and per distance. No padding enters: prompts are scored
one by one with the fast path and only their own T*L steps are counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm import tqdm


def recall_at_k(predictor: Any, traces: Any, k: int | None = None, progress: bool = False) -> dict[str, Any]:
    """{'recall@k', 'recall@k_per_layer' [L], 'recall@k_per_distance' [h], 'targets'} over ``traces``."""
    meta = traces.meta
    num_layers, top_k = int(meta.num_layers), int(meta.top_k)
    k = top_k if k is None else int(k)
    if getattr(predictor, "cfg", None) is None:
        predictor.fit(traces)  # only picks the checkpoint matching the traces' shape; nothing is trained
    horizon = predictor.cfg.horizon
    hits_layer = np.zeros((horizon + 1, num_layers), np.int64)  # [h, L] by distance and target layer
    rows_layer = np.zeros((horizon + 1, num_layers), np.int64)
    for trace in tqdm(traces, desc="recall", disable=not progress, unit="prompt"):
        scores = predictor.all_scores(trace)  # [T, L, h, E]
        experts = np.asarray(trace.experts).astype(np.int64)  # [T, L, k]
        num_steps = experts.shape[0] * num_layers
        flat_actual = experts.reshape(num_steps, -1)
        top = np.argsort(-scores, axis=-1, kind="stable")[..., :k].reshape(num_steps, horizon + 1, k)
        for d in range(horizon + 1):
            src = np.arange(num_steps - d)
            tgt = src + d
            match = (top[src, d][:, :, None] == flat_actual[tgt][:, None, :]).any(-1).sum(-1)  # [S-d]
            layer = tgt % num_layers
            hits_layer[d] += np.bincount(layer, weights=match, minlength=num_layers).astype(np.int64)
            rows_layer[d] += np.bincount(layer, minlength=num_layers)
    per_layer = hits_layer / np.maximum(rows_layer * top_k, 1)  # [h, L]
    return {
        f"recall@{k}": float(hits_layer[0].sum() / max(rows_layer[0].sum() * top_k, 1)),
        f"recall@{k}_per_layer": per_layer[0].round(4).tolist(),
        f"recall@{k}_per_distance": (hits_layer.sum(1) / np.maximum(rows_layer.sum(1) * top_k, 1)).round(4).tolist(),
        f"recall@{k}_per_distance_layer": per_layer.round(4).tolist(),
        "targets": int(rows_layer[0].sum()),
    }
