"""Training batches for the learned predictor: packed prompt pieces and horizon labels.

Steps:
1. ``pack_prompts``: cut prompts longer than ``row_len`` into pieces of
   ``row_len`` tokens (each piece starts fresh: position 0, no previous token)
   and pack pieces greedily, in prompt-id order, into rows of ``row_len``
   tokens. Each piece gets a segment id inside its row (1, 2, ...; 0 = padding)
   so attention never crosses prompts.
2. For every token the row also stores the previous token's routing (the
   context input) and whether there is one.
3. ``horizon_labels`` (jit-side): for step s = (t, l) and distance d, the
   multi-hot experts of step s+d, masked unless s+d lies in the same piece.
   Padding never counts: every loss and metric uses this mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from emoe_jax.predict.learned.model import token_buckets


@dataclass(frozen=True)
class PackedRows:
    tok: np.ndarray  # [N, S] int32 token bucket ids
    experts: np.ndarray  # [N, S, L, k] int16 routing of each token
    prev_experts: np.ndarray  # [N, S, L, k] int16 routing of the previous token of the same piece
    has_prev: np.ndarray  # [N, S] bool
    seg: np.ndarray  # [N, S] int32 piece id inside the row, 0 = padding
    pos: np.ndarray  # [N, S] int32 position inside the piece
    hidden: np.ndarray | None = None  # [N, S, L, H] float16 router inputs, when the traces store them
    tok_row: np.ndarray | None = None  # [N, S] int32 row in the table prior's token table (-1: none)

    def __len__(self) -> int:
        return int(self.tok.shape[0])

    @property
    def real_tokens(self) -> int:
        return int((self.seg > 0).sum())

    def batch(self, idx: np.ndarray) -> tuple[np.ndarray, ...]:
        out = (self.tok[idx], self.prev_experts[idx].astype(np.int32), self.has_prev[idx],
               self.seg[idx], self.pos[idx], self.experts[idx].astype(np.int32))  # fmt: skip
        if self.tok_row is not None:  # (..., hidden or None, tok_row): the table-prior network's inputs
            return (*out, None if self.hidden is None else self.hidden[idx], self.tok_row[idx])
        return out if self.hidden is None else (*out, self.hidden[idx])


def _pieces(prompts: Iterable[Any], row_len: int, use_hidden: bool) -> Iterable[tuple[np.ndarray, ...]]:
    for trace in prompts:
        experts = np.asarray(trace.experts)  # [T, L, k]
        ids = np.asarray(trace.token_ids)  # [T]
        hidden = np.asarray(trace.hidden) if use_hidden else None  # [T, L, H]
        for start in range(0, experts.shape[0], row_len):
            sl = slice(start, start + row_len)
            yield ids[sl], experts[sl], None if hidden is None else hidden[sl]


def pack_prompts(prompts: Iterable[Any], num_layers: int, top_k: int, row_len: int, buckets: int,
                 hidden_size: int | None = None, token_rows: Callable[[np.ndarray], np.ndarray] | None = None
                 ) -> PackedRows:  # fmt: skip
    """Pack the prompts (PromptTrace iterable) into rows of ``row_len`` tokens (router inputs too if hidden_size).

    token_rows: token ids -> table-prior token rows (``TablePrior.token_rows``), stored as ``tok_row``.
    """
    rows: list[list[tuple[np.ndarray, ...]]] = [[]]
    used = 0
    for piece in _pieces(prompts, row_len, hidden_size is not None):
        if hidden_size is not None and (piece[2] is None or piece[2].shape[-1] != hidden_size):
            raise ValueError(f"the network expects router inputs of width {hidden_size}; these traces have "
                             f"{None if piece[2] is None else piece[2].shape[-1]}")  # fmt: skip
        if used + len(piece[0]) > row_len:
            rows.append([])
            used = 0
        rows[-1].append(piece)
        used += len(piece[0])
    rows = [r for r in rows if r]
    n = len(rows)
    if n == 0:
        raise ValueError("no tokens to pack: the training trace set is empty")
    tok = np.zeros((n, row_len), np.int32)
    experts_out = np.zeros((n, row_len, num_layers, top_k), np.int16)
    prev = np.zeros_like(experts_out)
    has_prev = np.zeros((n, row_len), bool)
    seg = np.zeros((n, row_len), np.int32)
    pos = np.zeros((n, row_len), np.int32)
    hidden_out = None if hidden_size is None else np.zeros((n, row_len, num_layers, hidden_size), np.float16)
    tok_row = None if token_rows is None else np.full((n, row_len), -1, np.int32)
    for r, pieces in enumerate(rows):
        at = 0
        for j, (ids, experts, hidden) in enumerate(pieces):
            m = len(ids)
            sl = slice(at, at + m)
            tok[r, sl] = token_buckets(ids, buckets)
            if tok_row is not None:
                tok_row[r, sl] = token_rows(ids)
            experts_out[r, sl] = experts
            prev[r, at + 1 : at + m] = experts[:-1]
            has_prev[r, at + 1 : at + m] = True
            seg[r, sl] = j + 1
            pos[r, sl] = np.arange(m)
            if hidden_out is not None:
                hidden_out[r, sl] = hidden
            at += m
    return PackedRows(tok, experts_out, prev, has_prev, seg, pos, hidden_out, tok_row)


def horizon_labels(experts: jax.Array, seg: jax.Array, horizon: int, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """labels [B, S, L, h, E] float32 and mask [B, S, L, h] bool for distances 0..horizon."""
    b, s, num_layers, _ = experts.shape
    multi_hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32).sum(-2)  # [B, S, L, E]
    flat = multi_hot.reshape(b, s * num_layers, num_experts)
    seg_flat = jnp.repeat(seg, num_layers, axis=1)  # [B, S*L]
    flat = jnp.pad(flat, ((0, 0), (0, horizon), (0, 0)))
    seg_pad = jnp.pad(seg_flat, ((0, 0), (0, horizon)))
    labels = jnp.stack([flat[:, d : d + s * num_layers] for d in range(horizon + 1)], axis=2)  # [B, S*L, h, E]
    same = jnp.stack([seg_pad[:, d : d + s * num_layers] == seg_flat for d in range(horizon + 1)], axis=2)
    mask = same & (seg_flat > 0)[:, :, None]  # [B, S*L, h]
    return (labels.reshape(b, s, num_layers, horizon + 1, num_experts),
            mask.reshape(b, s, num_layers, horizon + 1))  # fmt: skip
