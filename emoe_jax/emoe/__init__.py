"""The eMoE serving system (arXiv 2503.06823): sensitivity profiling, Eq. 3 latency estimate,
Alg. 1 SLO-aware admission, and the task-aware restricted-mode loader around the offloaded engine.

    python -m emoe_jax.emoe.sensitivity --out checkpoints/predictors/emoe-sensitivity.json
    python -m emoe_jax.bench serve

See docs/emoe.md.
"""

from emoe_jax.emoe.latency import LatencyModel, LatencyModelError
from emoe_jax.emoe.scheduler import Request, SchedulerError, fcfs, slo_admit, ttft_estimates
from emoe_jax.emoe.system import EMoESystem, EMoESystemError, ReloadStats, fit_emoe_predictor

_SENSITIVITY = ("SensitivityError", "output_similarity", "profile_sensitivity", "random_routing", "write_profile")


def __getattr__(name):
    # Lazy: `python -m emoe_jax.emoe.sensitivity` must not find its module already imported by the package.
    if name in _SENSITIVITY:
        from emoe_jax.emoe import sensitivity

        return getattr(sensitivity, name)
    raise AttributeError(f"module 'emoe_jax.emoe' has no attribute {name!r}")


__all__ = [
    "EMoESystem", "EMoESystemError", "LatencyModel", "LatencyModelError", "ReloadStats", "Request",
    "SchedulerError", "SensitivityError", "fcfs", "output_similarity", "fit_emoe_predictor", "profile_sensitivity", "random_routing",
    "slo_admit", "ttft_estimates", "write_profile",
]
