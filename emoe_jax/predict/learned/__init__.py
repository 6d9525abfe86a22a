"""The learned expert-activation predictor (MoE-Beyond, with its flaws fixed).

A small strictly causal Flax NNX network predicts, at every (token, layer) step,
the experts of that layer and the next ``horizon`` steps (into the next token's
early layers) from token ids, past routing and the current token's routing at
earlier layers. Train with ``python -m emoe_jax.predict.learned train``; use
as ``get_predictor("learned")`` (loads ``checkpoints/predictors/learned-dsv2lite``).
"""

from emoe_jax.predict.learned.checkpoint import DEFAULT_CHECKPOINT, load, save
from emoe_jax.predict.learned.config import LearnedConfig, LearnedPredictorError
from emoe_jax.predict.learned.evaluate import recall_at_k
from emoe_jax.predict.learned.model import RoutingPredictorNet
from emoe_jax.predict.learned.predictor import LearnedPredictor
from emoe_jax.predict.learned.train import TrainResult, TrainSettings, train_model

__all__ = [
    "DEFAULT_CHECKPOINT",
    "LearnedConfig",
    "LearnedPredictor",
    "LearnedPredictorError",
    "RoutingPredictorNet",
    "TrainResult",
    "TrainSettings",
    "load",
    "recall_at_k",
    "save",
    "train_model",
]
