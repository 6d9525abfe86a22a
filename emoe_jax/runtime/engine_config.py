"""The offloaded engine's settings as one frozen value (what `OffloadedEngine` is built with)."""

from __future__ import annotations

import dataclasses

MODES = ("exact", "restricted")
DECODE_PATHS = ("auto", "onejit", "staged")
ADMISSIONS = ("all", "cost")
EVICTION_SCORES = ("latest", "reuse")  # what score eviction ranks by (the simulator's --eviction-scores)


def check_eviction_scores(name: str) -> None:
    """A ValueError naming the choices for an unknown ``eviction_scores``."""
    if name not in EVICTION_SCORES:
        raise ValueError(f"unknown eviction_scores {name!r}; choose {' or '.join(EVICTION_SCORES)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """How an engine offloads. Budgets are fractions (0.25), counts (16) or per-layer lists ("4,8,...").

    device_experts: slots per MoE layer (default: all). host_experts: experts held in host memory over
    all layers (default: all; fewer means the disk tier serves the rest, on the staged path).
    policy / host_policy: device eviction (lru | lfu | score; score ranks experts by the predictor's
    latest scores, so it needs a predictor) / host eviction (lru | lfu: no predictor scores the host tier). admission: all (every prediction is
    prefetched) or cost (only one that scores above the expert it would evict; score eviction on the
    one-jit path). eviction_scores (policy score): latest (the nearest prediction of a
    layer, then its reuse row once it ran) or reuse (reuse rows only, e.g. causal-reuse's). mode: exact (outputs equal the
    all-resident model's) or restricted (eMoE, lossy). method: expert mixing kernel (auto | gather |
    sorted | blocked | reference). pad_id: padding token (default: the model's). prefetch_k: experts
    prefetched per predicted layer (default: top-k), with score above min_score. reuse=False keeps
    nothing resident between steps (the on-demand baseline). link_gbps emulates a host->device link
    on CPU (staged path). decode_path: auto (one jitted executable per decode step where it applies),
    onejit (insist) or staged (the per-layer loop)."""

    device_experts: str | float | int | None = None
    host_experts: str | float | int | None = None
    policy: str = "lru"
    host_policy: str = "lru"
    admission: str = "all"
    eviction_scores: str = "latest"
    mode: str = "exact"
    method: str = "auto"
    pad_id: int | None = None
    prefetch_k: int | None = None
    min_score: float = 0.0
    reuse: bool = True
    link_gbps: float | None = None
    decode_path: str = "auto"

    def __post_init__(self) -> None:
        if self.link_gbps is not None and self.link_gbps <= 0:
            raise ValueError(f"link_gbps must be positive, got {self.link_gbps}")
        if self.decode_path not in DECODE_PATHS:
            raise ValueError(f"unknown decode_path {self.decode_path!r}; choose {', '.join(DECODE_PATHS)}")
        if self.admission not in ADMISSIONS:
            raise ValueError(f"unknown admission {self.admission!r}; choose {', '.join(ADMISSIONS)}")
        if self.admission == "cost" and self.policy != "score":
            raise ValueError("admission='cost' compares a prediction with its victim's score: use policy='score'")
        check_eviction_scores(self.eviction_scores)
        if self.eviction_scores != "latest" and self.policy != "score":
            raise ValueError(f"eviction_scores={self.eviction_scores!r} chooses what score eviction ranks by: "
                             "use policy='score'")
        if self.host_policy == "score":
            raise ValueError("host_policy='score': nothing scores the host tier's experts; use lru or lfu "
                             "(policy='score' ranks the device slots)")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose exact or restricted")

    @classmethod
    def build(cls, base: "EngineConfig | None" = None, **options) -> "EngineConfig":
        """`base` (default: all defaults) with `options` replaced; unknown names are an error that lists
        the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; EngineConfig has {sorted(known)}")
        return dataclasses.replace(base or cls(), **options)


__all__ = ["EngineConfig", "MODES", "DECODE_PATHS", "ADMISSIONS"]
