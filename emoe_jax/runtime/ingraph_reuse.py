"""`recency-reuse`'s learned eviction scores inside the one-jit decode step.

The host predictor (emoe_jax.predict.recency_reuse) ranks each expert by a
logistic model of "routed again at this layer within the next few tokens" on
per-prompt recency and frequency (CRF at three decays, tokens since the last
use, use counts) and the layer's prior. All of that is per (row, layer, expert)
state a step can carry, so here it is a pytree updated in-graph: after MoE layer
l routes, `reuse_row` adds the routing to layer l's state and returns layer l's
reuse row [B, E], which the step books as that layer's eviction rank (the
staged path's `reuse(t, l)` hook, the simulator's reuse scores). It predicts
nothing to prefetch. `init_state` replays the prompt's routing through the host
predictor's own feature code (one compiled function, `reuse_model.step_features`),
so the in-graph state starts where the host's would be; the in-graph update is
the same arithmetic in float32 (tested against the host step path to 1e-5).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..config import MoEConfig
from ..predict.reuse_model import _NEVER, CRF_DECAYS, NUM_FEATURES, new_state, step_features
from .ingraph_predictors import InGraphPredictor, PrefillRouting, _multi_hot

_NO_TABLE = 0.5  # recency-reuse's table feature: held at logit 0 (it reads no table)


class ReuseState(NamedTuple):
    crf: jax.Array  # [B, 3, Lm, E] float32 CRF per decay as of each expert's last use
    last: jax.Array  # [B, Lm, E] int32 token of the last use (-_NEVER: not used yet in this prompt)
    count: jax.Array  # [B, Lm, E] float32 uses so far in this prompt
    t: jax.Array  # [B] int32 the current token's index in its prompt


class ReuseParams(NamedTuple):
    weights: jax.Array  # [F] float32 logistic weights (reuse_model.FEATURES order)
    log_prior: jax.Array  # [Lm, E] float32 log P(e | l) over the training traces


class RecencyReuseInGraph(InGraphPredictor):
    """No prefetch; after each MoE layer routes, that layer's learned reuse row for score eviction."""

    name = "recency-reuse"

    def __init__(self, predictor, cfg: MoEConfig):
        super().__init__(cfg)
        weights = getattr(predictor, "reuse_weights", None)
        log_prior = getattr(predictor, "log_prior", None)
        if weights is None or log_prior is None:
            raise ValueError("recency-reuse is not fitted; fit it on training traces (--train-traces DIR)")
        lm, e = cfg.num_moe_layers, cfg.num_experts
        if np.size(log_prior) != lm * e:
            raise ValueError(f"recency-reuse was fitted on traces of {np.size(log_prior)} layer-experts; the model "
                             f"has {lm} MoE layers x {e} experts = {lm * e}: fit it on this model's traces")
        self._weights = np.asarray(weights, np.float64)  # [F]
        self._log_prior = np.asarray(log_prior, np.float64).reshape(lm, e)  # [Lm, E]
        self._decays = jnp.asarray(CRF_DECAYS, jnp.float32)  # [3]

    def cache_key(self):
        return (self.name, self.cfg)  # weights and prior are arguments of the step, not constants

    def params(self) -> ReuseParams:
        return ReuseParams(jnp.asarray(self._weights, jnp.float32), jnp.asarray(self._log_prior, jnp.float32))

    def init_state(self, prefill: PrefillRouting) -> ReuseState:
        """Replay each row's prompt (left-padded [B, T]) through the host feature code."""
        b = prefill.tokens.shape[0]
        lm, e = self.cfg.num_moe_layers, self.cfg.num_experts
        crf = np.zeros((b, len(CRF_DECAYS), lm * e))
        last = np.zeros((b, lm * e), np.int64)
        count = np.zeros((b, lm * e))
        t_next = np.zeros(b, np.int32)
        prior = np.ascontiguousarray(self._log_prior.reshape(-1))
        table = np.full(e, _NO_TABLE)
        scratch = np.zeros((e, NUM_FEATURES))  # [E, F]: the features are not needed here
        for i in range(b):
            state = new_state(lm, e)
            for p in np.flatnonzero(prefill.valid[i]):
                t = int(prefill.positions[i, p])
                for layer in range(lm):
                    step_features(*state, t, layer, np.asarray(prefill.ids[i, p, layer], np.int64), table, prior,
                                  CRF_DECAYS, scratch)  # fmt: skip
                t_next[i] = t + 1
            crf[i], last[i], count[i] = state
        return ReuseState(jnp.asarray(crf.reshape(b, len(CRF_DECAYS), lm, e), jnp.float32),
                          jnp.asarray(np.maximum(last, -_NEVER).reshape(b, lm, e), jnp.int32),
                          jnp.asarray(count.reshape(b, lm, e), jnp.float32), jnp.asarray(t_next))  # fmt: skip

    def begin_step(self, model, pparams, pstate: ReuseState, tokens, positions):
        return None, pstate._replace(t=positions.astype(jnp.int32))

    def after_routing(self, model, pparams, pstate, moe_layer, normed, ids):
        return None, pstate  # nothing to prefetch

    def reuse_row(self, pparams: ReuseParams, pstate: ReuseState, moe_layer: int, ids):
        """Add token t's routing ids [B, k] at `moe_layer` to the state; its reuse row [B, E] float32."""
        t = pstate.t[:, None]  # [B, 1]
        used = _multi_hot(ids, self.cfg.num_experts) > 0  # [B, E]
        crf, last, count = pstate.crf[:, :, moe_layer], pstate.last[:, moe_layer], pstate.count[:, moe_layer]
        decay = self._decays[None, :, None]  # [1, 3, 1]
        since_last = (t - last).astype(jnp.float32)[:, None]  # [B, 1, E]
        crf = jnp.where(used[:, None], crf * decay ** since_last + 1.0, crf)  # [B, 3, E]
        last = jnp.where(used, t, last)
        count = count + used
        age = (t - last).astype(jnp.float32)  # [B, E]
        tf = t.astype(jnp.float32)
        ones = jnp.ones_like(age)
        features = [ones, used.astype(jnp.float32), jnp.zeros_like(age)]  # bias, routed now, table logit 0
        features += [jnp.log(1e-3 + crf[:, d] * self._decays[d] ** age) for d in range(crf.shape[1])]
        features += [jnp.log1p(jnp.minimum(age, _NEVER)), ones * pparams.log_prior[moe_layer], count / (tf + 1.0),
                     ones * jnp.log1p(tf), jnp.log1p(count)]  # fmt: skip
        logits = jnp.stack(features, axis=-1) @ pparams.weights  # [B, E]
        new = pstate._replace(crf=pstate.crf.at[:, :, moe_layer].set(crf), last=pstate.last.at[:, moe_layer].set(last),
                              count=pstate.count.at[:, moe_layer].set(count))  # fmt: skip
        return jax.nn.sigmoid(logits), new


__all__ = ["RecencyReuseInGraph", "ReuseState", "ReuseParams"]
