"""eMoE's Eq. 2 (expected token load per expert) and the top-S selection it drives.

One home for the rule both users apply: the eMoE predictor (predict/emoe.py)
scores a prompt's experts with it, and the serving system (emoe/system.py)
chooses which experts to load for the scheduled requests with it. Pure NumPy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from emoe_jax.errors import EmoeError


class EMoEError(EmoeError):
    """Bad eMoE settings or inputs (sensitivity file, budget, task source)."""


def expected_load(
    freq: Mapping[str, np.ndarray],
    requests: Sequence[tuple[str, int]],
    output_tokens: Mapping[str, float] | float = 0.0,
    sensitivity: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Eq. 2: N [L, E] = sum over task types of (sum_j W_j + T * W_o) * s[task, l] * f[task][l, i].

    ``freq[task]`` [L, E] expert frequencies; ``requests`` (task, W_j) pairs;
    ``output_tokens`` W_o per task (or one number); ``sensitivity[task]`` [L]
    (missing tasks: 1).
    """
    if not requests:
        raise EMoEError("expected_load needs at least one request (task, prompt length)")
    shape = next(iter(freq.values())).shape
    total = np.zeros(shape, np.float64)
    by_task: dict[str, list[int]] = {}
    for task, w in requests:
        if task not in freq:
            raise EMoEError(f"no expert frequencies for task {task!r}; known: {sorted(freq)}")
        by_task.setdefault(task, []).append(int(w))
    for task, lengths in by_task.items():
        w_o = output_tokens if np.isscalar(output_tokens) else float(output_tokens.get(task, 0.0))
        tokens = sum(lengths) + len(lengths) * float(w_o)
        s = np.ones(shape[0]) if sensitivity is None or task not in sensitivity else np.asarray(sensitivity[task], np.float64)
        total += tokens * s[:, None] * np.asarray(freq[task], np.float64)
    return total


def select_experts(load: np.ndarray, budget: int | Sequence[int]) -> np.ndarray:
    """[L, E] bool: per layer the top ``budget`` experts by load (ties: lower id), only where load > 0."""
    num_layers, num_experts = load.shape
    budgets = np.broadcast_to(np.asarray(budget, np.int64), (num_layers,))
    if np.any(budgets < 0) or np.any(budgets > num_experts):
        raise EMoEError(f"per-layer budget must be 0..{num_experts}, got {budget}")
    order = np.argsort(-load, axis=1, kind="stable")  # [L, E]
    keep = np.arange(num_experts)[None, :] < budgets[:, None]  # [L, E] rank < budget
    mask = np.zeros_like(load, dtype=bool)
    np.put_along_axis(mask, order, keep, axis=1)
    return mask & (load > 0)


def load_sensitivity(path: str | os.PathLike, num_layers: int) -> dict[str, np.ndarray]:
    """``{"task": [s_0, ..., s_{L-1}], ...}`` from a JSON file; tasks not listed get s = 1."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sensitivity file {path} does not exist (JSON: {{task: [s per layer]}})")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EMoEError(f"sensitivity file {path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise EMoEError(f"sensitivity file {path} must hold an object {{task: [s per layer]}}")
    out = {}
    for task, values in raw.items():
        arr = np.asarray(values, np.float64)
        if arr.shape != (num_layers,) or np.any(arr < 0):
            raise EMoEError(f"sensitivity of task {task!r} in {path} must be {num_layers} non-negative numbers, "
                            f"got shape {arr.shape}")  # fmt: skip
        out[str(task)] = arr
    return out


__all__ = ["EMoEError", "expected_load", "select_experts", "load_sensitivity"]
