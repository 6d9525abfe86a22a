"""The learned predictor inside the one-jit decode step, with an incremental context.

Per decode token: one `context_step` (one new position per row against the cached
keys/values of the last `window` positions: no window recompute), then at layer 0
and after each MoE layer l routes, the step head scores layer l+1 from features that
include layer l's routing and, for checkpoints trained with them, layer l's router
input. That is the network's distance-0 row of step (t, l+1): the best-informed
prediction of layer l+1 that exists before layer l+1 routes.
The network's parameters are an argument of the step (`params()`), its state
(context cache, h_t, prefix sums, the previous token's routing) is carried and donated.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import MoEConfig
from ..predict.learned.incremental import (ContextCache, context_step, init_context_cache, prefill_context,
                                           routing_update, step_logits)
from ..predict.learned.model import token_buckets
from .ingraph_predictors import PrefillRouting


class LearnedState(NamedTuple):
    cache: ContextCache
    h: jax.Array  # [B, d] context of the current token
    prefix: jax.Array  # [B, d] routing embeddings of the current token's layers so far
    last: jax.Array  # [B, d] the latest layer's routing embedding
    prev: jax.Array  # [B, Lm, k] int32 the previous token's routing


class LearnedInGraph:
    name = "learned"

    def __init__(self, predictor, cfg: MoEConfig):
        net_cfg = predictor.cfg
        want = (cfg.num_moe_layers, cfg.num_experts, cfg.top_k)
        have = (net_cfg.num_layers, net_cfg.num_experts, net_cfg.top_k)
        if have != want:
            raise ValueError(f"the learned predictor was trained for (MoE layers, experts, top-k) = {have}; "
                             f"the model has {want}")
        if net_cfg.hidden_size is not None and net_cfg.hidden_size != cfg.hidden_size:
            raise ValueError(f"the learned predictor takes router inputs of {net_cfg.hidden_size} features; "
                             f"the model's hidden size is {cfg.hidden_size}")
        self.cfg, self.net_cfg = cfg, net_cfg
        self._graphdef, self._state = predictor._graphdef, predictor._state
        graphdef = self._graphdef
        self._prefill = jax.jit(lambda st, cache, *a: prefill_context(nnx.merge(graphdef, st), cache, *a))

    def cache_key(self):
        return (self.name, self.cfg, id(self._graphdef))

    def params(self):
        return self._state

    def _net(self, pparams):
        return nnx.merge(self._graphdef, pparams)

    def init_state(self, prefill: PrefillRouting) -> LearnedState:
        b = prefill.tokens.shape[0]
        tok = token_buckets(prefill.tokens, self.net_cfg.token_buckets)
        _, cache = self._prefill(self._state, init_context_cache(self.net_cfg, b), tok, prefill.ids, prefill.valid)
        zeros = jnp.zeros((b, self.net_cfg.d_model), jnp.float32)
        return LearnedState(cache, zeros, zeros, zeros, jnp.asarray(prefill.ids[:, -1], jnp.int32))

    def begin_step(self, model, pparams, pstate: LearnedState, tokens, positions):
        net = self._net(pparams)
        buckets = self.net_cfg.token_buckets
        tok = jnp.where(tokens < 0, buckets, tokens % buckets).astype(jnp.int32)  # as token_buckets
        b = tokens.shape[0]
        h, cache = context_step(net, pstate.cache, tok, pstate.prev, jnp.ones(b, bool), positions, jnp.ones(b, bool))
        zeros = jnp.zeros_like(h)
        hidden = None if self.net_cfg.hidden_size is None else jnp.zeros((b, self.net_cfg.hidden_size), jnp.float32)
        scores = jax.nn.sigmoid(step_logits(net, h, 0, zeros, zeros, hidden)[:, 0])
        return scores, pstate._replace(cache=cache, h=h, prefix=zeros, last=zeros)

    def after_routing(self, model, pparams, pstate: LearnedState, moe_layer, normed, ids):
        net = self._net(pparams)
        prefix, last = routing_update(net, moe_layer, ids, pstate.prefix)
        hidden = normed if self.net_cfg.hidden_size is not None else None
        scores = jax.nn.sigmoid(step_logits(net, pstate.h, moe_layer + 1, prefix, last, hidden)[:, 0])
        return scores, pstate._replace(prefix=prefix, last=last)

    def end_step(self, pparams, pstate: LearnedState, ids):
        return pstate._replace(prev=jnp.swapaxes(ids, 0, 1).astype(jnp.int32))  # [Lm, B, k] -> [B, Lm, k]


def learned_in_graph(predictor, cfg: MoEConfig) -> LearnedInGraph | None:
    """The one-jit version of a loaded learned predictor, or None for a network with a causal-table
    prior: its prior is computed from host tables the one-jit step does not carry, so it runs on
    the host path (the staged loop's prefetch worker)."""
    if getattr(predictor, "cfg", None) is None:
        raise ValueError("the learned predictor has no network loaded; give it a checkpoint")
    if getattr(predictor.cfg, "table_prior", False):
        return None
    return LearnedInGraph(predictor, cfg)


__all__ = ["LearnedInGraph", "LearnedState", "learned_in_graph"]
