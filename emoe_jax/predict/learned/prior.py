"""The causal-table prior of the learned predictor: fitted count tables, computed in-graph.

With ``LearnedConfig.table_prior`` the network learns a residual over the
``causal-table`` baseline (emoe_jax/predict/causal_table.py): at every step
s = (t, l) and distance d it gets the table's score q(e) of each expert of
step s+d, and its logits become ``net(z + W q) + a_d * logit(q)``; with the
output layer started at zero it starts exactly at the table's ranking.

Steps:
1. ``fit_table_prior(train, horizon, ...)`` fits ``CausalTables`` on the
   TRAINING prompts only (gaps 1..horizon+1, the layer-to-layer look-ups the
   horizon needs) and keeps the token table's ``max_token_rows`` most frequent
   ids (the checkpoint stays a few MB; rarer ids fall back to the layer prior,
   as ids below ``min_token_count`` do in the baseline).
2. ``prior_scores(arrays, tok_row, experts, prev_experts, has_prev, horizon)``
   evaluates ``causal_table.row_scores`` for every (t, l, d) of a batch with
   einsums over multi-hot routing (no [.., k, E] gathers), reading exactly what
   the table predictor reads at the issue step: the token id of t (targets of
   token t only), token t's experts at layer l-1, and the latest routing of the
   target layer before s (token t-1's, or token t's when the target wraps into
   token t+1). Tested equal to ``row_scores``.
3. ``save_npz`` / ``load_npz``: the fitted arrays beside the params
   (``table_prior.npz`` in the checkpoint directory), float16 for the big ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from emoe_jax.predict.learned.config import LearnedPredictorError

PRIOR_FILE = "table_prior.npz"
_KEYS = ("log_layer", "tok", "token_ids", "cond", "cross", "weights", "top_k")


@dataclass(frozen=True)
class TablePrior:
    """The fitted tables (float32 log-probability ratios against the layer prior, as in CausalTables)."""

    log_layer: np.ndarray  # [L, E] log P(e | l)
    tok: np.ndarray  # [U, L, E] token-id table, rows of ``token_ids``
    token_ids: np.ndarray  # [U] int64, sorted
    cond: np.ndarray  # [G+1, L, E, E] layer-to-layer, gap g = 1..G (row 0 unused)
    cross: np.ndarray  # [L, E, E] token-to-token at the same layer, lag 1
    weights: np.ndarray  # [3] (w_tok, w_cond, w_prev)
    top_k: int

    @property
    def max_gap(self) -> int:
        return int(self.cond.shape[0]) - 1

    def token_rows(self, token_ids: np.ndarray) -> np.ndarray:
        """int32 row of each id in the token table, -1 for ids not in it."""
        ids = np.asarray(token_ids, np.int64)
        if len(self.token_ids) == 0:
            return np.full(ids.shape, -1, np.int32)
        pos = np.minimum(np.searchsorted(self.token_ids, ids), len(self.token_ids) - 1)
        return np.where(self.token_ids[pos] == ids, pos, -1).astype(np.int32)

    def arrays(self) -> dict[str, np.ndarray]:
        """What the network holds (and ``prior_scores`` reads)."""
        return {"log_layer": self.log_layer, "tok": self.tok, "cond": self.cond, "cross": self.cross,
                "weights": self.weights}  # fmt: skip


def fit_table_prior(train: Any, horizon: int, *, max_token_rows: int = 2048, weights=(0.5, 1.2, 0.7),
                    alpha: float = 4.0, min_token_count: int = 3) -> TablePrior:  # fmt: skip
    """Fit the tables on ``train`` (the training prompts only: fitting on validation prompts would leak)."""
    from emoe_jax.predict.causal_table import CausalTables

    L = int(train.meta.num_layers)
    tables = CausalTables(train, max(1, min(horizon + 1, L - 1)), alpha, min_token_count)
    ids = np.concatenate([np.asarray(p.token_ids).astype(np.int64) for p in train])
    uniq, count = np.unique(ids, return_counts=True)
    kept_counts = count[np.searchsorted(uniq, tables.token_ids)] if len(tables.token_ids) else np.zeros(0)
    # most frequent ids first (ties: lower id), then back to sorted order for searchsorted
    order = np.lexsort((tables.token_ids, -kept_counts))[:max_token_rows]
    keep = np.sort(order)
    return TablePrior(log_layer=tables.log_layer.astype(np.float32), tok=tables.tok[keep].astype(np.float32),
                      token_ids=tables.token_ids[keep].astype(np.int64), cond=tables.cond.astype(np.float32),
                      cross=tables.cross[1].astype(np.float32), weights=np.asarray(weights, np.float32),
                      top_k=int(train.meta.top_k))  # fmt: skip


def prior_scores(arrays: dict[str, jax.Array], tok_row: jax.Array, experts: jax.Array, prev_experts: jax.Array,
                 has_prev: jax.Array, horizon: int, top_k: int) -> jax.Array:  # fmt: skip
    """Table scores q [B, T, L, horizon+1, E] (each row sums to top_k) of steps s+d, issued at s = (t, l).

    tok_row [B, T] int (-1: no token row), experts [B, T, L, k] token t's routing (only layers < l
    are read for row l), prev_experts [B, T, L, k] token t-1's routing, has_prev [B, T].
    Requires horizon < L (targets reach token t+1 at most).
    """
    log_layer, tok, cond, cross, w = (arrays[k] for k in ("log_layer", "tok", "cond", "cross", "weights"))
    L, E = log_layer.shape
    G = cond.shape[0] - 1
    D = horizon + 1
    l_idx = np.arange(L)[:, None]
    d_idx = np.arange(D)[None, :]
    tgt = l_idx + d_idx  # [L, D]
    wrap = tgt >= L  # target is token t+1's layer tgt - L
    lt = tgt % L
    logit = jnp.broadcast_to(log_layer[lt], (*tok_row.shape, L, D, E))  # [B, T, L, D, E]
    f32 = jnp.float32
    # token table: targets of token t only, ids with a row
    if tok.shape[0]:
        rows = tok[jnp.maximum(tok_row, 0)].astype(f32)  # [B, T, L, E] by target layer
        tok_term = rows[:, :, lt]  # [B, T, L, D, E]
        use = (tok_row >= 0)[:, :, None, None] & jnp.asarray(~wrap)[None, None]
        logit = logit + w[0] * jnp.where(use[..., None], tok_term, 0.0)
    # layer-to-layer: token t's experts at l-1 -> layer lt = l + d (gap d + 1)
    hot = jax.nn.one_hot(experts, E, dtype=f32).sum(-2) / top_k  # [B, T, L, E] mean over the k experts
    src = jnp.pad(hot[:, :, :-1], ((0, 0), (0, 0), (1, 0), (0, 0)))  # row l holds layer l-1
    gap = d_idx + 1 + 0 * l_idx  # [L, D]
    use_c = (~wrap) & (l_idx >= 1) & (gap <= G)
    mats = cond[np.minimum(gap, G), lt].astype(f32) * jnp.asarray(use_c, f32)[..., None, None]  # [L, D, E, E]
    logit = logit + w[1] * jnp.einsum("BTLe,LDef->BTLDf", src, mats)
    # token-to-token: the latest routing of layer lt before s (token t-1's; token t's if wrapped)
    prev_hot = jax.nn.one_hot(prev_experts, E, dtype=f32).sum(-2) / top_k  # [B, T, L, E]
    src_p = jnp.where(jnp.asarray(wrap)[None, None, :, :, None], hot[:, :, lt], prev_hot[:, :, lt])  # [B, T, L, D, E]
    use_p = jnp.asarray(wrap)[None, None] | has_prev[:, :, None, None]  # [B, T, L, D]
    cross_t = cross[lt].astype(f32)  # [L, D, E, E]
    logit = logit + w[2] * jnp.where(use_p[..., None], jnp.einsum("BTLDe,LDef->BTLDf", src_p, cross_t), 0.0)
    logit = logit - jax.lax.stop_gradient(logit.max(-1, keepdims=True))
    return top_k * jax.nn.softmax(logit, axis=-1)


def prior_logit(q: jax.Array) -> jax.Array:
    """logit(q), monotone in q over all of (0, k): q >= 1 - 1e-4 (k > 1 lets a score pass 1) keeps log q's order."""
    return jnp.log(jnp.maximum(q, 1e-6)) - jnp.log(jnp.maximum(1.0 - q, 1e-4))


def save_npz(prior: dict[str, np.ndarray], token_ids: np.ndarray, top_k: int, directory: str | os.PathLike) -> Path:
    """Write ``table_prior.npz`` into ``directory`` (temporary name, then rename)."""
    path = Path(directory) / PRIOR_FILE
    tmp = path.with_name(f".{PRIOR_FILE}.tmp-{os.getpid()}.npz")
    big = {"tok", "cond", "cross"}
    data = {k: np.asarray(v, np.float16 if k in big else np.float32) for k, v in prior.items()}
    np.savez_compressed(tmp, **data, token_ids=np.asarray(token_ids, np.int64), top_k=np.int64(top_k))
    os.replace(tmp, path)
    return path


def load_npz(directory: str | os.PathLike, num_layers: int, num_experts: int, horizon: int,
             token_rows: int) -> TablePrior:  # fmt: skip
    """The checkpoint's tables; a missing, corrupt or mismatched file raises LearnedPredictorError."""
    path = Path(directory) / PRIOR_FILE
    if not path.is_file():
        raise LearnedPredictorError(f"{path} is missing: this checkpoint's config has table_prior=true, so its "
                                    "causal-table prior must be stored beside params/ (retrain or copy the file)")  # fmt: skip
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _KEYS if k not in z.files]
            if missing:
                raise LearnedPredictorError(f"{path} lacks {missing}; the table-prior file is corrupt")
            d = {k: np.asarray(z[k]) for k in _KEYS}
    except LearnedPredictorError:
        raise
    except Exception as exc:  # zipfile / zlib / format errors
        raise LearnedPredictorError(f"cannot read the table-prior file {path}: {exc}") from exc
    L, E, U = num_layers, num_experts, token_rows
    G = max(1, min(horizon + 1, L - 1))
    want = {"log_layer": (L, E), "tok": (U, L, E), "token_ids": (U,), "cond": (G + 1, L, E, E), "cross": (L, E, E),
            "weights": (3,), "top_k": ()}  # fmt: skip
    for k, shape in want.items():
        if d[k].shape != shape:
            raise LearnedPredictorError(f"{path}: {k} has shape {d[k].shape}, the checkpoint's config expects {shape}")
    return TablePrior(log_layer=d["log_layer"].astype(np.float32), tok=d["tok"].astype(np.float32),
                      token_ids=d["token_ids"].astype(np.int64), cond=d["cond"].astype(np.float32),
                      cross=d["cross"].astype(np.float32), weights=d["weights"].astype(np.float32),
                      top_k=int(d["top_k"]))  # fmt: skip
