"""Expert-activation predictors and cache policies.

One interface (``Predictor``) serves the trace-replay simulator and the
runtime prefetcher. Build predictors by name with ``get_predictor``.
"""

from emoe_jax.predict.base import (
    EVICTION_POLICIES,
    BasePredictor,
    Prediction,
    Predictor,
    PromptInfo,
    PromptPredictions,
)
from emoe_jax.predict.drive import prompt_info, prompt_predictions, step_predictions
from emoe_jax.predict.registry import (
    UnknownPredictorError,
    available_predictors,
    get_predictor,
    register_predictor,
)

__all__ = [
    "EVICTION_POLICIES",
    "BasePredictor",
    "Prediction",
    "Predictor",
    "PromptInfo",
    "PromptPredictions",
    "UnknownPredictorError",
    "available_predictors",
    "get_predictor",
    "prompt_info",
    "prompt_predictions",
    "register_predictor",
    "step_predictions",
]
