"""The eMoE serving system (arXiv 2503.06823): sensitivity profiling, Eq. 3 latency estimate,
Alg. 1 SLO-aware admission, and the task-aware restricted-mode loader around the offloaded engine.

    python -m emoe_jax.emoe.sensitivity --out checkpoints/predictors/emoe-sensitivity.json
    python -m emoe_jax.bench serve

See docs/emoe.md.
"""

from emoe_jax.emoe.latency import LatencyModel, LatencyModelError
from emoe_jax.emoe.scheduler import Request, SchedulerError, fcfs, slo_admit, ttft_estimates
from emoe_jax.emoe.sensitivity import SensitivityError, profile_sensitivity, random_routing, write_profile
from emoe_jax.emoe.system import EMoESystem, EMoESystemError, ReloadStats, fit_emoe_predictor

__all__ = [
    "EMoESystem", "EMoESystemError", "LatencyModel", "LatencyModelError", "ReloadStats", "Request",
    "SchedulerError", "SensitivityError", "fcfs", "fit_emoe_predictor", "profile_sensitivity", "random_routing",
    "slo_admit", "ttft_estimates", "write_profile",
]
