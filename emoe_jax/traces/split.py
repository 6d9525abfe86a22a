"""Train/validation split of a trace set by prompt id.

Consecutive prompt ids are often turns of one conversation, so the split is
contiguous: the lowest ids train, the highest ``val_fraction`` validate. No
conversation straddles the boundary except at most one.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def split_by_prompt_id(traces: Any, val_fraction: float = 0.2) -> tuple[Any, Any]:
    """(train, validation) views of ``traces``, each in ascending prompt-id order."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {val_fraction}")
    if len(traces) < 2:
        raise ValueError(f"cannot split {len(traces)} prompt(s) into train and validation")
    order = np.argsort(np.asarray(traces.prompt_ids), kind="stable")
    n_val = min(max(1, int(round(len(order) * val_fraction))), len(order) - 1)
    return traces.select(order[:-n_val]), traces.select(order[-n_val:])
