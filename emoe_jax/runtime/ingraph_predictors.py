"""Predictors that run inside the one-jit decode step (`onejit.py`).

An in-graph predictor is a set of pure functions of in-graph state; the step calls
  begin_step(model, pparams, pstate, tokens [B], positions [B]) -> (scores [B, E] for MoE layer 0 or None, pstate)
  after_routing(model, pparams, pstate, moe_layer, normed [B, H], ids [B, k]) -> (scores [B, E] for MoE layer moe_layer+1 or None, pstate)
  end_step(pparams, pstate, ids [Lm, B, k]) -> pstate
where `model` is the merged decoder (its own router weights are in reach), `pparams`
the predictor's own parameters (an argument of the step, not a baked-in constant),
and `pstate` a pytree carried and donated from step to step. `init_state(prefill)`
builds the state on the host from the prompt's routing after prefill.

Each sees what its host version (emoe_jax.predict) sees at the same point, and
predicts the next MoE layer of the current token, issued before the current
layer's expert compute:
- spec-gating: the next layer's router applied to this layer's router input;
- prev-token: the experts the previous token used at the next layer;
- learned: the MoE-Beyond-style network with an incremental (KV-cached) context.
A predictor may also give eviction scores for the layer that just ran:
  reuse_row(pparams, pstate, moe_layer, ids [B, k]) -> (reuse [B, E], pstate)
called after each MoE layer's fetches when the step evicts by score (recency-reuse,
`ingraph_reuse.py`: it predicts nothing to prefetch and only ranks slots).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..config import MoEConfig


class PrefillRouting(NamedTuple):
    """The prompt batch after prefill, for `init_state` (host arrays)."""

    tokens: np.ndarray  # [B, T] int32, left-padded
    ids: np.ndarray  # [B, T, Lm, k] int32 routing of every prompt token
    valid: np.ndarray  # [B, T] bool: real tokens
    positions: np.ndarray  # [B, T] int32 index in the prompt (-1: padding)


def _multi_hot(ids, num_experts: int):
    """ids [B, k] -> [B, E] float32 with 1 at the chosen experts."""
    return jnp.zeros((ids.shape[0], num_experts), jnp.float32).at[jnp.arange(ids.shape[0])[:, None], ids].set(1.0)


class InGraphPredictor:
    """Defaults of the interface: no parameters, no state, no prediction at the token start."""

    name = "in-graph"

    def __init__(self, cfg: MoEConfig):
        self.cfg = cfg

    def cache_key(self):
        """Equal keys share one compiled decode step (the step closes over the predictor)."""
        return (self.name, self.cfg)

    def params(self):
        return ()

    def init_state(self, prefill: PrefillRouting):
        return ()

    def begin_step(self, model, pparams, pstate, tokens, positions):
        return None, pstate

    def after_routing(self, model, pparams, pstate, moe_layer, normed, ids):
        raise NotImplementedError

    def end_step(self, pparams, pstate, ids):
        return pstate


class SpecGatingInGraph(InGraphPredictor):
    """Speculative gating: softmax(router of layer moe_layer+1 (normed input of layer moe_layer)). Layer 0 of a
    new token has no router input yet, so nothing is predicted at the token start."""

    name = "spec-gating"

    def after_routing(self, model, pparams, pstate, moe_layer, normed, ids):
        nxt = model.layers[self.cfg.moe_layers[moe_layer + 1]].mlp
        return jax.nn.softmax(nxt.router_logits(normed), axis=-1), pstate


class PrevTokenState(NamedTuple):
    prev: jax.Array  # [Lm, B, k] int32 the previous token's experts per MoE layer


class PrevTokenInGraph(InGraphPredictor):
    """The experts the previous token used at the predicted layer."""

    name = "prev-token"

    def init_state(self, prefill: PrefillRouting):
        # Left padding: the last position is each row's last prompt token.
        return PrevTokenState(jnp.asarray(np.transpose(prefill.ids[:, -1], (1, 0, 2)), jnp.int32))

    def begin_step(self, model, pparams, pstate, tokens, positions):
        return _multi_hot(pstate.prev[0], self.cfg.num_experts), pstate

    def after_routing(self, model, pparams, pstate, moe_layer, normed, ids):
        return _multi_hot(pstate.prev[moe_layer + 1], self.cfg.num_experts), pstate

    def end_step(self, pparams, pstate, ids):
        return PrevTokenState(ids.astype(jnp.int32))


IN_GRAPH = {"spec-gating": SpecGatingInGraph, "prev-token": PrevTokenInGraph}
# Host predictors (by name) with an in-graph version: these and the two built from fitted host objects.
IN_GRAPH_NAMES = (*IN_GRAPH, "learned", "recency-reuse")


def is_in_graph(predictor: Any) -> bool:
    return all(hasattr(predictor, m) for m in ("begin_step", "after_routing", "end_step", "init_state"))


def in_graph_predictor(predictor: Any, cfg: MoEConfig):
    """The in-graph version of a host predictor object, or None when it has none."""
    if predictor is None:
        return None
    if is_in_graph(predictor):
        return predictor
    name = getattr(predictor, "name", None)
    if name == "learned":
        from .ingraph_learned import learned_in_graph

        return learned_in_graph(predictor, cfg)
    if name == "recency-reuse":
        from .ingraph_reuse import RecencyReuseInGraph

        return RecencyReuseInGraph(predictor, cfg)
    cls = IN_GRAPH.get(name)
    return None if cls is None else cls(cfg)


__all__ = ["PrefillRouting", "InGraphPredictor", "SpecGatingInGraph", "PrevTokenInGraph", "in_graph_predictor", "is_in_graph", "IN_GRAPH",
           "IN_GRAPH_NAMES"]
