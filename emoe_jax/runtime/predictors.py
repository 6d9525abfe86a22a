"""Build a Predictor for the runtime prefetcher from a CLI name (`--predictor NAME`).

The runtime drives the very predictor objects the simulator replays
(emoe_jax.predict). This module only adds what a running model needs:
- oracles are refused (they read the future);
- speculative gating gets the model's own router weights (the checkpoint);
- predictors fitted on traces (static frequency, MoE-Infinity, eMoE) get a
  trace set of the same model shape (`--train-traces DIR`), checked first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emoe_jax.errors import EmoeError
from ..config import MoEConfig

NO_PREDICTOR = ("none", "on-demand")
NEEDS_TRACES = ("static-freq", "causal-table", "causal-reuse", "cross-reuse", "recency-reuse", "moe-infinity", "moe-infinity-beyond",
                "emoe", "emoe-profiles")


class PredictorSetupError(EmoeError):
    """A predictor that cannot drive this model as asked; the message says what to pass."""


def runtime_predictor(name: str | None, cfg: MoEConfig, model_dir: str | Path | None = None,
                      train_traces: Any = None, lookahead: int | None = None,
                      checkpoint: str | Path | None = None, **options: Any):
    """The predictor called `name` ready to drive `cfg`'s engine, or None for no prefetching.
    train_traces: a trace set directory, or a loaded TraceSet, for predictors fitted on traces."""
    if name is None or name in NO_PREDICTOR:
        return None
    from ..predict import get_predictor
    from ..predict.registry import UnknownPredictorError

    kwargs: dict[str, Any] = dict(options)
    if lookahead is not None:
        kwargs["lookahead"] = lookahead
    if name == "spec-gating":
        if model_dir is None:
            raise PredictorSetupError("spec-gating needs the model's router weights: give the checkpoint directory")
        kwargs["model_checkpoint"] = str(model_dir)
    if name == "learned":
        if checkpoint is not None:
            kwargs["checkpoint"] = str(checkpoint)
        else:  # the checkpoint in checkpoints/predictors trained for this model's shape
            kwargs.update(num_layers=cfg.num_moe_layers, num_experts=cfg.num_experts, top_k=cfg.top_k)
    try:
        if name == "learned" and checkpoint is None:
            predictor = _learned_for_shape(get_predictor, kwargs)
        else:
            predictor = get_predictor(name, ignore_unknown=True, **kwargs)
    except UnknownPredictorError as e:
        raise PredictorSetupError(str(e)) from None
    if getattr(predictor, "oracle", False):
        raise PredictorSetupError(f"predictor {name!r} is an oracle: it reads the future and exists only in the "
                                  "simulator (python -m emoe_jax.sim); choose a causal predictor")
    if name in NEEDS_TRACES:
        if train_traces is None:
            raise PredictorSetupError(
                f"predictor {name!r} is fitted on routing traces of this model: pass --train-traces DIR "
                "(record them with python -m emoe_jax.traces collect --model MODEL ...)")
        predictor.fit(_load_matching_traces(train_traces, cfg))
    return predictor


def _learned_for_shape(get_predictor, kwargs):
    """The engine hands predictors the router inputs, so prefer a checkpoint trained with them
    (stronger); fall back to one trained on routing alone."""
    from ..predict.learned import LearnedPredictorError

    try:
        return get_predictor("learned", ignore_unknown=True, router_inputs=True, **kwargs)
    except (LearnedPredictorError, FileNotFoundError):
        return get_predictor("learned", ignore_unknown=True, **kwargs)


def _load_matching_traces(path, cfg: MoEConfig):
    """`path`: a trace set directory, or a loaded TraceSet (a benchmark's training split)."""
    from ..traces import TraceSet

    if isinstance(path, (str, Path)):
        path = Path(path)
        if not path.exists():
            raise PredictorSetupError(f"--train-traces {path} does not exist")
        traces = TraceSet.load(path)
    else:
        traces, path = path, "(training split)"
    meta = traces.meta
    want = (cfg.num_moe_layers, cfg.num_experts, cfg.top_k)
    have = (int(meta.num_layers), int(meta.num_experts), int(meta.top_k))
    if have != want:
        raise PredictorSetupError(
            f"--train-traces {path} has (MoE layers, experts, top-k) = {have} but the model has {want}; "
            "record traces of this model with python -m emoe_jax.traces collect")
    return traces


__all__ = ["runtime_predictor", "PredictorSetupError", "NO_PREDICTOR"]
