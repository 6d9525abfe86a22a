"""The learned expert-activation predictor (MoE-Beyond, with its flaws fixed).

A small strictly causal Flax NNX network predicts, at every (token, layer) step,
the experts of that layer and the next ``horizon`` steps (into the next token's
early layers) from token ids, past routing and the current token's routing at
earlier layers. Train with ``python -m emoe_jax.predict.learned train``; use
as ``get_predictor("learned")``: it loads the checkpoint under ``checkpoints/predictors``
trained for the model's shape (learned-dsv2lite: L=26, E=64, k=6; learned-embedded:
L=8, E=32, k=4), picked by ``find_checkpoint`` from the traces or the given shape.
"""

from emoe_jax.predict.learned.checkpoint import (
    DEFAULT_CHECKPOINT,
    PREDICTORS_DIR,
    find_checkpoint,
    list_checkpoints,
    load,
    save,
)
from emoe_jax.predict.learned.config import LearnedConfig, LearnedPredictorError
from emoe_jax.predict.learned.evaluate import recall_at_k
from emoe_jax.predict.learned.model import RoutingPredictorNet
from emoe_jax.predict.learned.predictor import LearnedPredictor
from emoe_jax.predict.learned.train import TrainResult, TrainSettings, train_model

__all__ = [
    "DEFAULT_CHECKPOINT",
    "PREDICTORS_DIR",
    "LearnedConfig",
    "LearnedPredictor",
    "LearnedPredictorError",
    "RoutingPredictorNet",
    "find_checkpoint",
    "list_checkpoints",
    "TrainResult",
    "TrainSettings",
    "load",
    "recall_at_k",
    "save",
    "train_model",
]
