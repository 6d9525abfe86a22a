"""Simulator settings: cache size, cost model, lookahead, protocol.

``SimConfig()`` is the honest default (transfers take time, one serial link,
cache persists across prompts, starts empty). ``SimConfig.moe_beyond()`` is
MoE-Beyond's protocol: zero transfer time, a fresh randomly filled cache per
prompt, the first 10 tokens of each prompt as uncounted warm-up (no prefetch
during warm-up), and prefetches for layer l inserted right before layer l runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from emoe_jax.errors import EmoeError
from emoe_jax.predict.base import EVICTION_POLICIES


class SimConfigError(EmoeError):
    """A simulator setting is out of range or inconsistent with the traces."""


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    capacity: float = 0.1  # <= 1: fraction of all L*E layer-experts; > 1: a count of layer-experts
    per_layer: bool = False  # False: one global pool; True: capacity split evenly over layers
    expert_bytes: float = 17.3e6  # one routed expert (DeepSeek-V2-Lite, bf16: 3*2048*1408*2)
    bandwidth_gbps: float = 25.0  # per link, GB/s with 1 GB = 1e9 bytes
    layer_compute_ms: float = 0.5  # time from one layer's router to the next's, experts resident
    links: int = 1  # serial transfer links working in parallel
    zero_latency: bool = False  # transfers take no time (MoE-Beyond's simulator)
    lookahead_layers: int = 1  # furthest prefetch target, in layers ahead (token-major)
    prefetch_k: int | None = None  # experts prefetched per target layer; None = the model's top-k
    min_score: float = 0.0  # only scores above this are prefetched (and count in recall@k)
    eviction: str | None = None  # None = the predictor's own choice
    warmup_tokens: int = 0  # per prompt: tokens replayed without prefetch and left out of metrics
    reset_per_prompt: bool = False  # fresh cache for every prompt (MoE-Beyond) or one running cache
    initial_fill: str = "empty"  # "empty" or "random" (random resident experts, random recency)
    seed: int = 0  # for the random fill
    metric_k: tuple[int, ...] = ()  # recall/precision@k cut-offs; () = (top_k,)
    # "all": every queued prefetch starts when a link is free; "cost": only if it can arrive
    # before its layer runs and its score beats the victim's predicted reuse (kernel._advance)
    admission: str = "all"
    # what a miss costs: "copy" it over the link; compute it on the "host" (not cached);
    # "choose" per expert (copy what the predictor expects to be reused)
    miss_mode: str = "copy"
    host_bandwidth_gbps: float = 50.0  # host memory bandwidth a host-computed expert streams at
    host_overhead_ms: float = 0.05  # fixed cost of a step that computes experts on the host
    # "all": every copied miss is inserted into the cache; "bypass": a copied miss whose predicted
    # reuse is below the score of the victim it would evict is computed from a scratch slot and not
    # cached. The scratch slots (top-k of them, the experts of one step) come out of the capacity.
    demand_admission: str = "all"
    # when step s's predictions are issued: "step" = at the start of step s (before it routes); "routed" =
    # right after step s-1 routed, queued behind its demand fetches (the earliest their inputs exist for a
    # predictor that reads no router inputs; refused for one that does on traces that carry them)
    prefetch_issue: str = "step"
    # what score eviction (and admission, choose, bypass) reads: "latest" = the nearest prediction targeting
    # the layer or, after the layer ran, its reuse score, whichever came last; "reuse" = reuse scores only
    # (prefetch predictions still drive the requests, but never overwrite the eviction scores)
    eviction_scores: str = "latest"
    # LRFU-like score eviction: rank score + crf_weight x CRF, CRF = sum over the expert's past accesses of
    # crf_decay ** (tokens since the access); 0 = the score alone
    crf_weight: float = 0.0
    crf_decay: float = 0.9
    # distance-aware score eviction: the victim is the expert with the longest expected wait to its next use,
    # distance_weight x (layers until its layer runs again) / L + (1 - p) / p tokens for its score p
    # (the odds against reuse); 0 = rank by the score alone (the same order as (1 - p) / p)
    distance_weight: float = 0.0

    @classmethod
    def moe_beyond(cls, **overrides) -> "SimConfig":
        """MoE-Beyond's zero-latency protocol (cache_simulator/infinity_moe_sim.py)."""
        base = dict(
            zero_latency=True,
            reset_per_prompt=True,
            initial_fill="random",
            warmup_tokens=10,
            lookahead_layers=0,
        )
        base.update(overrides)
        return cls(**base)

    def with_(self, **changes) -> "SimConfig":
        return replace(self, **changes)

    # -- derived ---------------------------------------------------------------
    def transfer_seconds(self) -> float:
        """Seconds to move one expert over one link."""
        if self.zero_latency:
            return 0.0
        return self.expert_bytes / (self.bandwidth_gbps * 1e9)

    def host_seconds(self) -> tuple[float, float]:
        """(seconds per host-computed expert, fixed seconds per step with host work)."""
        return self.expert_bytes / (self.host_bandwidth_gbps * 1e9), self.host_overhead_ms * 1e-3

    def compute_seconds(self) -> float:
        return 0.0 if self.zero_latency else self.layer_compute_ms * 1e-3

    def scratch_slots(self, num_layers: int, top_k: int) -> int:
        """Slots per pool held back for bypassed demand experts (0 unless ``demand_admission='bypass'``):
        top-k in all, the most one step can need, so ceil(top_k / pools) per pool."""
        if self.demand_admission != "bypass":
            return 0
        return -(-top_k // num_layers) if self.per_layer else top_k

    def pools(self, num_layers: int, num_experts: int, top_k: int) -> tuple[int, int]:
        """(number of pools, cache slots per pool) for a model of this shape (scratch slots deducted)."""
        total_keys = num_layers * num_experts
        if self.capacity <= 0:
            raise SimConfigError(f"capacity must be > 0, got {self.capacity}")
        if self.capacity <= 1:
            total = int(self.capacity * total_keys)  # MoE-Beyond: int(1664 * 0.1) = 166
        else:
            if self.capacity != int(self.capacity):
                raise SimConfigError(f"capacity > 1 is a count of experts and must be whole, got {self.capacity}")
            total = int(self.capacity)
        total = min(total, total_keys)
        scratch = self.scratch_slots(num_layers, top_k)
        if self.per_layer:
            per = total // num_layers - scratch
            if per < top_k:
                raise SimConfigError(
                    f"per-layer capacity {per} (= {total} // {num_layers} layers - {scratch} scratch) is below top-k={top_k}: "
                    "a layer could not hold its own experts; raise --capacity or use the global pool"
                )
            return num_layers, per
        if total - scratch < top_k:
            raise SimConfigError(f"capacity {total} experts (- {scratch} scratch) is below top-k={top_k}; raise --capacity")
        return 1, total - scratch

    def validate(self, num_layers: int, num_experts: int, top_k: int) -> None:
        self.pools(num_layers, num_experts, top_k)
        if not self.zero_latency and (self.bandwidth_gbps <= 0 or self.expert_bytes <= 0):
            raise SimConfigError("bandwidth and expert bytes must be > 0 (or use zero-latency mode)")
        if self.layer_compute_ms < 0:
            raise SimConfigError(f"layer compute time must be >= 0 ms, got {self.layer_compute_ms}")
        if self.links < 1:
            raise SimConfigError(f"links must be >= 1, got {self.links}")
        if not 0 <= self.lookahead_layers <= num_layers:
            raise SimConfigError(
                f"lookahead must be 0..{num_layers} layers (at most one token ahead), got {self.lookahead_layers}"
            )
        if self.prefetch_k is not None and not 0 <= self.prefetch_k <= num_experts:
            raise SimConfigError(f"prefetch_k must be 0..{num_experts}, got {self.prefetch_k}")
        if self.eviction is not None and self.eviction not in EVICTION_POLICIES:
            raise SimConfigError(f"unknown eviction policy {self.eviction!r}; choose from {EVICTION_POLICIES}")
        if self.warmup_tokens < 0:
            raise SimConfigError(f"warmup_tokens must be >= 0, got {self.warmup_tokens}")
        if self.initial_fill not in ("empty", "random"):
            raise SimConfigError(f"initial_fill must be 'empty' or 'random', got {self.initial_fill!r}")
        if self.admission not in ("all", "cost"):
            raise SimConfigError(f"admission must be 'all' or 'cost', got {self.admission!r}")
        if self.crf_weight < 0 or not 0 < self.crf_decay <= 1:
            raise SimConfigError(f"crf_weight must be >= 0 and crf_decay in (0, 1], got {self.crf_weight}, {self.crf_decay}")
        if self.distance_weight < 0:
            raise SimConfigError(f"distance_weight must be >= 0, got {self.distance_weight}")
        if self.eviction_scores not in ("latest", "reuse"):
            raise SimConfigError(f"eviction_scores must be 'latest' or 'reuse', got {self.eviction_scores!r}")
        if self.prefetch_issue not in ("step", "routed"):
            raise SimConfigError(f"prefetch_issue must be 'step' or 'routed', got {self.prefetch_issue!r}")
        if self.demand_admission not in ("all", "bypass"):
            raise SimConfigError(f"demand_admission must be 'all' or 'bypass', got {self.demand_admission!r}")
        if self.miss_mode not in ("copy", "host", "choose"):
            raise SimConfigError(f"miss_mode must be 'copy', 'host' or 'choose', got {self.miss_mode!r}")
        if self.miss_mode != "copy" and (self.zero_latency or self.host_bandwidth_gbps <= 0 or self.host_overhead_ms < 0):
            raise SimConfigError(
                "host compute of misses needs timed transfers (no --zero-latency), host bandwidth > 0 "
                "and host overhead >= 0"
            )
        for k in self.metric_k:
            if not 1 <= k <= num_experts:
                raise SimConfigError(f"metric k={k} outside 1..{num_experts}")
