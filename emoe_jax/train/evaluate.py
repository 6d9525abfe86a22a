"""Per-task validation loss and perplexity over every non-overlapping window of a split.

Steps: walk `sequential_batches` (deterministic, each token once, the last batch
padded with rows marked invalid), sum the next-token NLL of each valid row with
the jitted `eval_step`, and aggregate per task: loss = summed NLL / predicted
tokens, perplexity = exp(loss). 'all' is the token-weighted mean over tasks.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from emoe_jax.data import TokenStreams, sequential_batches
from emoe_jax.train.step import eval_step


def first_windows(streams: TokenStreams, windows_per_task: int, window: int) -> TokenStreams:
    """The same streams cut to their first `windows_per_task` windows (cheap periodic evaluation)."""
    keep = windows_per_task * window
    return dataclasses.replace(streams, arrays={t: a[:keep] for t, a in streams.arrays.items()})


def evaluate(trainable, graphdef, streams: TokenStreams, batch_size: int, seq_len: int,
             method: str = "blocked", progress: bool = False,
             max_windows_per_task: int | None = None) -> dict[str, dict[str, float]]:
    """seq_len counts the context; windows hold seq_len + 1 tokens. Returns {task: {loss, ppl, tokens}}."""
    if max_windows_per_task:
        streams = first_windows(streams, max_windows_per_task, seq_len + 1)
    nll = np.zeros(len(streams.tasks))
    count = np.zeros(len(streams.tasks))
    batches = sequential_batches(streams, batch_size, seq_len + 1)
    for batch in tqdm(batches, desc="eval", leave=False, disable=not progress):
        rows = np.asarray(eval_step(trainable, jnp.asarray(batch.tokens), graphdef=graphdef, method=method))
        for row in np.flatnonzero(batch.valid):
            nll[batch.task_ids[row]] += rows[row]
            count[batch.task_ids[row]] += seq_len
    out = {}
    for k, task in enumerate(streams.tasks):
        if count[k]:
            loss = nll[k] / count[k]
            out[task] = {"loss": float(loss), "ppl": float(math.exp(loss)), "tokens": int(count[k])}
    if count.sum():
        loss = nll.sum() / count.sum()
        out["all"] = {"loss": float(loss), "ppl": float(math.exp(loss)), "tokens": int(count.sum())}
    return out
