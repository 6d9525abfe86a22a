"""The learned predictor as a ``Predictor`` (simulator and runtime prefetcher).

Steps (step path, the reference):
1. ``begin_token(t, id)``: one incremental step of the causal context
   transformer (``incremental.context_step``: the new token attends to the
   cached keys/values of the last window positions; token t-1's routing enters
   as its input) -> h_t, equal to the full context's.
2. ``predict(t, l)``: z = h_t + layer_embed[l] + prefix sum of token t's
   routing embeddings over layers < l + token t's layer l-1 embedding; the step
   head gives sigmoid scores for steps s .. s+lookahead (lookahead <= horizon)
   (``incremental.step_logits``, one jitted call for every layer).
3. ``observe(t, l, experts)``: add layer l's routing to the prefix sums.
   With router inputs (``observe_router_input``), layer l-1's input is
   projected into z at (t, l); layer l's own input is kept for step (t, l+1).

Checkpoint choice: an explicit ``checkpoint`` or ``model``; otherwise the
checkpoint in checkpoints/predictors whose (num_layers, num_experts, top_k)
match the model (given to the constructor, or read from the traces / prompt on
first use), e.g. learned-dsv2lite for DeepSeek-V2-Lite and learned-embedded for
the embedded model (``checkpoint.find_checkpoint``).

Fast path (``predict_prompt``): the same network over the whole prompt at once
(sliding-window causal mask, prompt padded to a power-of-two length so a few
shapes compile), giving the same rows in the same order; tested against the
step path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from emoe_jax.predict.base import BasePredictor, Prediction, PromptInfo, PromptPredictions, horizon_rows
from emoe_jax.predict.learned.checkpoint import find_checkpoint, load
from emoe_jax.predict.learned.config import LearnedConfig, LearnedPredictorError
from emoe_jax.predict.learned.incremental import context_step, init_context_cache, step_logits
from emoe_jax.predict.learned.model import RoutingPredictorNet, token_buckets


def _bucket_len(n: int) -> int:
    return max(16, 1 << int(np.ceil(np.log2(max(n, 1)))))


class LearnedPredictor(BasePredictor):
    name = "learned"

    def __init__(self, lookahead: int = 1, checkpoint: str | os.PathLike | None = None,
                 eviction: str = "lru", model: RoutingPredictorNet | None = None, *,
                 num_layers: int | None = None, num_experts: int | None = None, top_k: int | None = None,
                 router_inputs: bool | None = None, search_dir: str | os.PathLike | None = None) -> None:  # fmt: skip
        """``model`` or ``checkpoint`` (a directory) give the network. With neither, the checkpoint
        under ``search_dir`` (default checkpoints/predictors) that matches the model's shape is
        loaded: now if num_layers, num_experts and top_k are given, else on the first ``fit``,
        ``begin_prompt`` or ``predict_prompt``, from the traces' or prompt's shape.
        ``router_inputs`` says whether router inputs will be fed (see ``find_checkpoint``)."""
        super().__init__(lookahead=lookahead)
        self.eviction = eviction
        self.checkpoint: Path | None = Path(checkpoint) if checkpoint is not None else None
        self.training_info: dict[str, Any] = {}
        self.router_inputs = router_inputs
        self.search_dir = search_dir
        self.cfg: LearnedConfig | None = None
        shape = (num_layers, num_experts, top_k)
        if any(x is not None for x in shape) and not all(x is not None for x in shape):
            raise LearnedPredictorError(
                "pass all of num_layers, num_experts and top_k (to pick a checkpoint by shape) or none of them"
            )
        if model is not None:
            self._install(model)
        elif self.checkpoint is not None:
            self._install_checkpoint(self.checkpoint)
        elif num_layers is not None:
            self._select(int(num_layers), int(num_experts), int(top_k), router_inputs)

    def _select(self, num_layers: int, num_experts: int, top_k: int, router_inputs: bool | None,
                hidden_size: int | None = None) -> None:  # fmt: skip
        path = find_checkpoint(num_layers, num_experts, top_k, router_inputs=router_inputs, hidden_size=hidden_size,
                               root=self.search_dir)  # fmt: skip
        self._install_checkpoint(path)

    def _install_checkpoint(self, path: Path) -> None:
        model, self.training_info = load(path)
        self.checkpoint = Path(path)
        self._install(model)

    def _install(self, model: RoutingPredictorNet) -> None:
        self.cfg = model.cfg
        if self.lookahead > self.cfg.horizon:
            raise LearnedPredictorError(
                f"lookahead {self.lookahead} exceeds the checkpoint's horizon {self.cfg.horizon}; "
                f"use --lookahead-layers <= {self.cfg.horizon} or train with a larger --horizon"
            )
        graphdef, state = nnx.split(model)
        self._graphdef, self._state = graphdef, state  # the runtime's in-graph version reuses both
        # Pure functions of (state, arrays) closing over the GraphDef (as a static jit
        # argument it would be re-hashed on every call): jit traces them once per shape
        # and the predictor never closes over mutable module objects.
        self._all_logits = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))
        self._context_step = jax.jit(lambda st, *a: context_step(nnx.merge(graphdef, st), *a))
        self._step_scores = jax.jit(lambda st, *a: jax.nn.sigmoid(step_logits(nnx.merge(graphdef, st), *a)))
        self._token_rows = None
        if self.cfg.table_prior:  # the causal-table prior: host-side token rows, in-graph scores
            self._token_rows = model.table_prior().token_rows
            # one token's table scores [1, 1, L, horizon+1, E]; row l reads only layers < l of token t
            self._prior_q = jax.jit(lambda st, *a: nnx.merge(graphdef, st).prior_q(*a))
        self._empty_cache = init_context_cache(self.cfg, 1)  # immutable arrays: every prompt starts from it
        # Embedding tables used by the step path's incremental sums.
        self._prefix_table = np.asarray(model.prefix_embed.embedding[...])  # [L*E, d]
        self._last_table = np.asarray(model.last_embed.embedding[...])  # [L*E, d]

    def _ensure(self, num_layers: int, num_experts: int, top_k: int, hidden_size: int | None = None,
                hidden_known: bool = False) -> None:  # fmt: skip
        """Load the matching checkpoint on first use (no model yet), then check the shape."""
        if self.cfg is None:
            router_inputs = self.router_inputs
            if router_inputs is None and hidden_known:
                router_inputs = hidden_size is not None  # the traces say whether router inputs exist
            self._select(num_layers, num_experts, top_k, router_inputs, hidden_size)
        self._check_meta(num_layers, num_experts, top_k)

    def _require_model(self) -> LearnedConfig:
        if self.cfg is None:
            raise LearnedPredictorError(
                "no learned-predictor network loaded yet: pass checkpoint=DIR or num_layers/num_experts/top_k, "
                "or call fit(traces) first so the matching checkpoint is picked"
            )
        return self.cfg

    # -- shape checks ---------------------------------------------------------
    def _check_meta(self, num_layers: int, num_experts: int, top_k: int) -> None:
        c = self.cfg
        if (num_layers, num_experts, top_k) != (c.num_layers, c.num_experts, c.top_k):
            raise LearnedPredictorError(
                f"the learned predictor was trained for L={c.num_layers}, E={c.num_experts}, k={c.top_k}; "
                f"these traces have L={num_layers}, E={num_experts}, k={top_k}"
            )

    def fit(self, train: Any) -> None:
        """Training is offline (``python -m emoe_jax.predict.learned train``); this only checks shapes."""
        m = train.meta
        self._ensure(int(m.num_layers), int(m.num_experts), int(m.top_k), m.hidden_size, hidden_known=True)

    # -- fast path ------------------------------------------------------------
    def all_scores(self, trace: Any) -> np.ndarray:
        """Sigmoid scores [T, L, horizon+1, E] for every step of ``trace`` and every distance."""
        self._require_model()
        experts = np.asarray(trace.experts).astype(np.int32)  # [T, L, k]
        num_tokens = experts.shape[0]
        n = _bucket_len(num_tokens)
        pad = n - num_tokens
        tok = np.pad(token_buckets(np.asarray(trace.token_ids), self.cfg.token_buckets), (0, pad))[None]
        ex = np.pad(experts, ((0, pad), (0, 0), (0, 0)))[None]  # [1, n, L, k]
        prev = np.concatenate([np.zeros_like(ex[:, :1]), ex[:, :-1]], axis=1)
        has_prev = (np.arange(n) >= 1)[None]
        seg = (np.arange(n) < num_tokens).astype(np.int32)[None]
        pos = np.arange(n, dtype=np.int32)[None]
        extra = ()
        if self.cfg.hidden_size is not None:
            if trace.hidden is None:
                raise LearnedPredictorError("this checkpoint was trained with router inputs; the traces have none")
            extra = (np.pad(np.asarray(trace.hidden), ((0, pad), (0, 0), (0, 0)))[None],)  # [1, n, L, H]
        if self._token_rows is not None:
            rows = np.pad(self._token_rows(np.asarray(trace.token_ids)), (0, pad), constant_values=-1)[None]
            extra = (extra[0] if extra else None, rows)
        logits = self._all_logits(self._state, tok, prev, has_prev, seg, pos, ex, *extra)  # [1, n, L, h, E]
        return np.asarray(jax.nn.sigmoid(logits[0, :num_tokens]), np.float32)

    def predict_prompt(self, trace: Any, meta: Any) -> PromptPredictions:
        num_layers, num_experts = int(meta.num_layers), int(meta.num_experts)
        self._ensure(num_layers, num_experts, int(meta.top_k), getattr(meta, "hidden_size", None), hidden_known=True)
        scores = self.all_scores(trace)  # [T, L, H+1, E]
        num_steps = scores.shape[0] * num_layers
        issue, target = horizon_rows(num_steps, self.lookahead)
        h = self.lookahead + 1
        rows = scores[:, :, :h].reshape(num_steps * h, num_experts)  # issue-major, then distance
        return PromptPredictions(issue, target, np.ascontiguousarray(rows))

    # -- step path ------------------------------------------------------------
    def begin_prompt(self, info: PromptInfo) -> None:
        super().begin_prompt(info)
        self._ensure(info.num_layers, info.num_experts, info.top_k)
        c = self.cfg
        self._cache = self._empty_cache
        self._current = np.zeros((c.num_layers, c.top_k), np.int32)  # routing of the token being decoded
        self._previous = np.zeros((c.num_layers, c.top_k), np.int32)  # routing of token t-1
        self._h: jax.Array | None = None  # [1, d]
        self._router_inputs: dict[int, np.ndarray] = {}

    def begin_token(self, t: int, token_id: int) -> None:
        c = self.cfg
        tok = token_buckets(np.asarray([token_id]), c.token_buckets)  # [1]
        prev = self._current[None]  # token t-1's routing [1, L, k] (ignored at t = 0)
        self._previous = self._current
        self._has_prev = t > 0
        if self._token_rows is not None:
            self._tok_row = self._token_rows(np.asarray([token_id]))[None]  # [1, 1]
        self._h, self._cache = self._context_step(self._state, self._cache, tok, prev, np.asarray([t > 0]),
                                                  np.asarray([t], np.int32), np.ones(1, bool))  # fmt: skip
        self._current = np.zeros((c.num_layers, c.top_k), np.int32)
        self._router_inputs = {}
        self._prefix = np.zeros((1, c.d_model), np.float32)
        self._last = np.zeros((1, c.d_model), np.float32)

    def observe_router_input(self, t: int, l: int, hidden: np.ndarray) -> None:
        self._router_inputs[l] = np.asarray(hidden)

    def predict(self, t: int, l: int) -> Prediction:
        hidden = None
        if self.cfg.hidden_size is not None:
            if l > 0 and l - 1 not in self._router_inputs:
                raise LearnedPredictorError("this checkpoint was trained with router inputs; the traces have none")
            # float32 whatever the trace stores, so one shape and dtype compiles; layer 0 ignores it.
            hidden = np.zeros((1, self.cfg.hidden_size), np.float32)
            if l > 0:
                hidden[0] = self._router_inputs[l - 1]
        prior_q = None
        if self._token_rows is not None:  # token t's routing is known at layers < l only; row l reads no more
            q = self._prior_q(self._state, self._tok_row, self._current[None, None], self._previous[None, None],
                              np.asarray([[self._has_prev]]))  # fmt: skip
            prior_q = q[0, 0, l][None]  # [1, horizon+1, E]
        probs = self._step_scores(self._state, self._h, np.int32(l), self._prefix, self._last, hidden, prior_q)
        targets = self.target_list(t, l, self.cfg.num_layers)
        return Prediction(targets, np.asarray(probs)[0, : self.lookahead + 1])

    def observe(self, t: int, l: int, experts: np.ndarray, weights: np.ndarray | None = None) -> None:
        experts = np.asarray(experts, np.int64)
        keys = l * self.cfg.num_experts + experts
        self._current[l] = experts
        self._prefix = self._prefix + self._prefix_table[keys].sum(0)  # [1, d]
        self._last = self._last_table[keys].sum(0)[None]
