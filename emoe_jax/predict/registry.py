"""Predictors by name, so CLIs can take ``--predictor NAME``.

``get_predictor(name, **kwargs)`` builds one; ``available_predictors()`` lists
the names with a one-line description. Keyword arguments a predictor does not
take (e.g. ``lookahead`` for LRU) are an error unless ``ignore_unknown=True``,
which CLIs use to pass shared options to every predictor.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from emoe_jax.errors import EmoeError
from emoe_jax.predict.base import BasePredictor
from emoe_jax.predict.causal_reuse import CausalReuse, CrossReuse
from emoe_jax.predict.causal_table import CausalTable
from emoe_jax.predict.moe_infinity import MoEInfinity
from emoe_jax.predict.moe_infinity_beyond import MoEInfinityBeyond
from emoe_jax.predict.no_prefetch import NoPrefetch
from emoe_jax.predict.oracle import OraclePrefetch
from emoe_jax.predict.prev_token import PreviousToken
from emoe_jax.predict.recency_reuse import RecencyReuse
from emoe_jax.predict.static_freq import StaticFrequency


class UnknownPredictorError(EmoeError):
    """Raised for a predictor name that is not registered."""


def _no_prefetch(eviction: str) -> Callable[..., BasePredictor]:
    def build() -> BasePredictor:
        return NoPrefetch(eviction=eviction)

    return build


# name -> (factory, description)
_REGISTRY: dict[str, tuple[Callable[..., BasePredictor], str]] = {
    "lru": (_no_prefetch("lru"), "no prefetch, least-recently-used eviction"),
    "lfu": (_no_prefetch("lfu"), "no prefetch, least-frequently-used eviction"),
    "belady": (_no_prefetch("belady"), "ORACLE: no prefetch, Belady/MIN eviction (reads the future)"),
    "static-freq": (StaticFrequency, "per-layer expert frequency of the training traces"),
    "prev-token": (PreviousToken, "experts the previous token used at each layer"),
    "causal-table": (
        CausalTable,
        "causal baseline: token-id, layer l-1 -> l and previous-token tables (fitted counts only)",
    ),
    "causal-reuse": (
        CausalReuse,
        "causal-table's prefetch + learned reuse for eviction: P(routed again within 2 tokens), logistic on "
        "recency-frequency features",
    ),
    "cross-reuse": (
        CrossReuse,
        "causal-reuse + a cross-expert model (the prompt's routing over all layers -> which experts come back) "
        "in its reuse scores, and a within-token model (the token's routed layers -> this layer) in its prefetch",
    ),
    "recency-reuse": (
        RecencyReuse,
        "no prefetch; eviction by a learned reuse model on recency and frequency alone (P(routed again within "
        "2 tokens); no table)",
    ),
    "moe-infinity-beyond": (
        MoEInfinityBeyond,
        "MoE-Beyond's MoE-Infinity baseline: mean counts of the first 9 training prompts",
    ),
    "moe-infinity": (MoEInfinity, "MoE-Infinity: nearest past request EAM by cosine, layer-decayed"),
    "oracle-prefetch": (OraclePrefetch, "ORACLE: perfect prefetch within the lookahead, Belady eviction"),
}
_ALIASES = {"min": "belady", "none": "lru", "oracle": "oracle-prefetch"}


def available_predictors() -> dict[str, str]:
    """Registered names -> one-line descriptions."""
    return {name: desc for name, (_, desc) in _REGISTRY.items()}


def register_predictor(name: str, factory: Callable[..., BasePredictor], description: str) -> None:
    """Add a predictor (used by later subpackages: learned, eMoE, speculative gating)."""
    if name in _REGISTRY or name in _ALIASES:
        raise ValueError(f"predictor name {name!r} is already registered")
    _REGISTRY[name] = (factory, description)


def get_predictor(name: str, ignore_unknown: bool = False, **kwargs: Any) -> BasePredictor:
    """Build the predictor registered as ``name`` with ``kwargs``."""
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise UnknownPredictorError(
            f"unknown predictor {name!r}; available: {', '.join(sorted(_REGISTRY))} "
            f"(aliases: {', '.join(f'{a}={b}' for a, b in sorted(_ALIASES.items()))})"
        )
    factory = _REGISTRY[key][0]
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in params and not takes_any]
    if unknown and not ignore_unknown:
        raise ValueError(
            f"predictor {key!r} does not take {', '.join(sorted(unknown))}; "
            f"it takes: {', '.join(params) or 'no options'}"
        )
    return factory(**{k: v for k, v in kwargs.items() if k not in unknown})


# -- learned and eMoE predictors (emoe_jax/predict/learned, emoe_jax/predict/emoe.py) --
# Factories import lazily so listing predictors does not load JAX or a checkpoint.
def _learned(lookahead: int = 1, checkpoint: str | None = None, eviction: str = "lru", num_layers: int | None = None,
             num_experts: int | None = None, top_k: int | None = None, router_inputs: bool | None = None) -> BasePredictor:  # fmt: skip
    from emoe_jax.predict.learned.predictor import LearnedPredictor

    # Without a checkpoint, the one in checkpoints/predictors matching the model's shape
    # (given here, or read from the traces/prompt on first use) is loaded.
    return LearnedPredictor(lookahead=lookahead, checkpoint=checkpoint, eviction=eviction, num_layers=num_layers,
                            num_experts=num_experts, top_k=top_k, router_inputs=router_inputs)  # fmt: skip


def _emoe(sequence_model: bool) -> Callable[..., BasePredictor]:
    def build(lookahead: int = 1, period: int = 40, history: int = 2, task_source: str = "keywords",
              classifier: str | None = None, sensitivity: str | None = None, budget: int | None = None,
              eviction: str = "lru") -> BasePredictor:  # fmt: skip
        from emoe_jax.predict.emoe import EMoEPredictor

        return EMoEPredictor(lookahead=lookahead, period=period, history=history, task_source=task_source,
                             classifier=classifier, sensitivity=sensitivity, budget=budget,
                             sequence_model=sequence_model, eviction=eviction)  # fmt: skip

    return build


register_predictor("learned", _learned, "causal transformer trained on traces (checkpoints/predictors/learned-*, picked by model shape)")
register_predictor("emoe", _emoe(True), "eMoE: task profiles + eMoE-A forecast every p prompts, Eq. 2 selection")
register_predictor("emoe-profiles", _emoe(False), "eMoE without eMoE-A: per-task expert frequency profiles, Eq. 2")


# -- speculative next-layer gating (emoe_jax/predict/spec_gating.py) --
def _spec_gating(lookahead: int = 1, model_checkpoint: str | None = None, eviction: str = "lru") -> BasePredictor:
    from emoe_jax.predict.spec_gating import SpeculativeGating

    return SpeculativeGating(lookahead=lookahead, model_checkpoint=model_checkpoint, eviction=eviction)


register_predictor("spec-gating", _spec_gating, "next layers' routers applied to the current router input (needs --model-checkpoint and traces with router inputs)")
