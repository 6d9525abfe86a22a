"""Tiny in-memory trace sets for predictor and simulator tests."""

from __future__ import annotations

import numpy as np

from emoe_jax.traces import PromptTrace, TraceMeta, TraceSet


def make_traces(experts_per_prompt, num_experts, ids=None) -> TraceSet:
    """A TraceSet from a list of [T, L, k] expert arrays."""
    first = np.asarray(experts_per_prompt[0])
    L, k = first.shape[1], first.shape[2]
    meta = TraceMeta(model="test", num_layers=L, num_experts=num_experts, top_k=k,
                     moe_layer_ids=tuple(range(L)), hidden_size=None, source="test")  # fmt: skip
    ids = ids or list(range(len(experts_per_prompt)))
    prompts = [
        PromptTrace(prompt_id=pid, task="", text="", token_ids=np.arange(len(x), dtype=np.int32),
                    experts=np.asarray(x, np.int16), weights=None, n_prefill=len(x))  # fmt: skip
        for pid, x in zip(ids, experts_per_prompt)
    ]
    return TraceSet.from_prompts(meta, prompts)
