"""Replay routing traces for one predictor and one cache size; report hit rates and costs.

Steps:
1. Check the configuration against the traces (pool sizes, lookahead, policy).
2. For Belady eviction, build the next-use table over the whole replay (the
   only place the simulator reads the future; such results are marked oracle).
3. For each prompt in stored order: run the predictor over it in decoder order
   (``emoe_jax.predict.drive``), turn its scores into prefetch requests and
   recall@k counts (``requests``), reset/fill the cache if asked, and replay it
   in the compiled kernel (``kernel.run_prompt``), which carries the cache,
   the link queue and the clock from prompt to prompt.
4. Turn the counters into rates per access and costs per token (``SimResult``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from emoe_jax.predict.drive import prompt_predictions
from emoe_jax.sim import kernel as K
from emoe_jax.sim.config import SimConfig, SimConfigError
from emoe_jax.sim.requests import (
    PredictionScore,
    build_requests,
    next_use_table,
    ranked_experts,
    score_updates,
    select_rows,
)


@dataclass
class SimResult:
    predictor: str
    eviction: str
    oracle: bool  # True if the predictor or the eviction policy read the future
    config: dict
    capacity_experts: int  # total cache slots over all pools (scratch slots not included)
    scratch_slots: int  # slots held back from the capacity for bypassed demand experts
    prompts: int
    tokens: int  # counted tokens (after warm-up)
    accesses: int  # counted (token, layer, expert) routings
    steps: int  # counted (token, layer) steps
    hits: int  # expert resident and arrived when its layer ran (timely prefetches included)
    timely_prefetches: int  # hits on a prefetched, not yet used expert
    late_prefetches: int  # expert prefetched (or queued) but not arrived: stall charged, not a hit
    demand_misses: int  # expert absent and not requested: full transfer charged
    prefetches_issued: int
    prefetches_started: int  # transfers actually started for prefetches
    prefetches_used: int  # prefetched experts later routed to
    prefetches_wasted: int  # prefetched, then evicted without use
    prefetches_cancelled: int  # queued but dropped (target passed, no free slot) or abandoned
    prefetches_refused: int  # refused by cost-aware admission (would arrive late, or victim more likely used)
    host_computes: int  # misses computed on the host instead of copied (miss_mode host/choose)
    demand_bypassed: int  # copied misses computed from a scratch slot and not cached (demand bypass)
    host_seconds: float  # host compute time (overlaps the link; stall counts only what exceeds the layer)
    demand_transfers: int
    evictions: int
    stall_seconds: float
    bytes_moved: float
    wall_seconds: float
    prediction: dict = field(default_factory=dict)  # recall@k / precision@k summary
    # task label -> counters of that task's prompts (their share of the one replay: the cache,
    # link and clock carry over between prompts of different tasks exactly as in the totals)
    per_task: dict = field(default_factory=dict)
    # per prompt, in replay order: prompt_id, accesses, hits, stall_seconds arrays (for paired
    # bootstraps over prompts); left out of to_dict()
    per_prompt: dict = field(default_factory=dict, repr=False)

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.accesses, 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("per_prompt")
        tokens = max(self.tokens, 1)
        d.update(
            hit_rate=self.hit_rate,
            miss_rate=self.demand_misses / max(self.accesses, 1),
            late_prefetch_rate=self.late_prefetches / max(self.accesses, 1),
            timely_prefetch_rate=self.timely_prefetches / max(self.timely_prefetches + self.late_prefetches, 1),
            prefetch_coverage=self.timely_prefetches / max(self.accesses, 1),
            prefetch_accuracy=self.prefetches_used / max(self.prefetches_started, 1),
            prefetch_waste_rate=self.prefetches_wasted / max(self.prefetches_started, 1),
            stall_ms_per_token=1e3 * self.stall_seconds / tokens,
            # decode time per token: compute of every layer plus stall (tokens/s-equivalent = 1e3 / this)
            ms_per_token=1e3 * (self.stall_seconds + self.steps * (0.0 if self.config["zero_latency"]
                                                                   else self.config["layer_compute_ms"] * 1e-3)) / tokens,
            host_compute_rate=self.host_computes / max(self.accesses, 1),
            bytes_per_token=self.bytes_moved / tokens,
        )
        for counters in d["per_task"].values():
            counters.update(
                hit_rate=counters["hits"] / max(counters["accesses"], 1),
                stall_ms_per_token=1e3 * counters["stall_seconds"] / max(counters["tokens"], 1),
            )
        return d


# Counters split by task (names of kernel.INT_COUNTERS / FLOAT_COUNTERS).
_TASK_COUNTERS = ("tokens", "accesses", "hits", "timely_prefetches", "late_prefetches", "demand_misses",
                  "stall_seconds")  # fmt: skip


def _add_task_share(per_task: dict, task: str, before: dict, after: dict) -> None:
    """Add what one prompt changed in the running counters to its task's entry."""
    entry = per_task.setdefault(task, {"prompts": 0, **{name: 0 for name in _TASK_COUNTERS}})
    entry["prompts"] += 1
    for name in _TASK_COUNTERS:
        entry[name] += after[name] - before[name]


# SimResult fields copied from the kernel's counters under the same name.
_RESULT_COUNTERS = tuple(n for n in (*K.INT_COUNTERS, *K.FLOAT_COUNTERS) if n not in ("now", "last_step"))


def _random_fill(rng: np.random.Generator, pools: int, per_pool: int, num_layers: int, num_experts: int) -> np.ndarray:
    """Random resident keys in random recency order (MoE-Beyond's ExpertCache.__init__)."""
    if pools == 1:
        return rng.permutation(num_layers * num_experts)[:per_pool].astype(np.int64)
    keys = np.concatenate([l * num_experts + rng.permutation(num_experts)[:per_pool] for l in range(num_layers)])
    return rng.permutation(keys).astype(np.int64)


def simulate(traces: Any, predictor: Any, config: SimConfig | None = None, progress: bool = False) -> SimResult:
    """Replay every prompt of ``traces`` (a TraceSet) with ``predictor`` under ``config``."""
    config = config or SimConfig()
    meta = traces.meta
    L, E, k = int(meta.num_layers), int(meta.num_experts), int(meta.top_k)
    config.validate(L, E, k)
    if len(traces) == 0:
        raise SimConfigError("the trace set has no prompts")
    policy = config.eviction or getattr(predictor, "eviction", "lru")
    if policy not in K.POLICY_IDS:
        raise SimConfigError(f"unknown eviction policy {policy!r}; choose from {tuple(K.POLICY_IDS)}")
    pools, per_pool = config.pools(L, E, k)
    prefetch_k = k if config.prefetch_k is None else config.prefetch_k
    ks = config.metric_k or (k,)
    state = K.new_cache_state(L * E, pools, per_pool, config.links)
    layer_base = (np.arange(L, dtype=np.int32) * E)[None, :, None]  # [1, L, 1]
    scorer = PredictionScore(L, config.lookahead_layers, k, tuple(ks))
    xfer, compute = config.transfer_seconds(), config.compute_seconds()

    next_use = None
    if policy == "belady":
        all_keys = np.concatenate(
            [(np.asarray(p.experts).astype(np.int32) + layer_base).reshape(-1, k) for p in traces]
        )  # [G, k]
        next_use, first_use = next_use_table(all_keys, L * E)
        state.next_use[:] = first_use
        del all_keys
    dummy_next = np.zeros((0, k), np.int64)
    no_reuse = np.zeros((0, E), np.float32)
    host_xfer, host_overhead = config.host_seconds()
    params = K.ReplayParams(
        num_layers=L, num_experts=E, per_layer=pools > 1, capacity=per_pool, policy=K.POLICY_IDS[policy],
        xfer=float(xfer), compute=float(compute), expert_bytes=float(config.expert_bytes),
        admit_cost=config.admission == "cost", miss_mode=K.MISS_MODES[config.miss_mode], host_xfer=float(host_xfer),
        host_overhead=float(host_overhead), warmup_tokens=int(config.warmup_tokens),
        bypass=config.demand_admission == "bypass", issue_after_routing=config.prefetch_issue == "routed",
        crf_weight=float(config.crf_weight), crf_decay=float(config.crf_decay),
        distance_weight=float(config.distance_weight),
    )  # fmt: skip
    inner = getattr(predictor, "inner", predictor)  # a MemoisedPredictor's predictor
    if (config.prefetch_issue == "routed" and meta.hidden_size is not None
            and getattr(inner, "reads_current_router_input", False)):  # fmt: skip
        raise SimConfigError(
            f"{predictor.name} reads the current layer's router input: its prediction at step s needs it, and it "
            "does not exist right after step s-1 routed; use prefetch_issue='step'"
        )
    rng = np.random.default_rng(config.seed)
    start_wall = time.perf_counter()
    step_offset = 0
    per_task: dict[str, dict] = {}
    per_prompt_rows: list[tuple[int, int, int, float]] = []
    for i, trace in enumerate(tqdm(traces, desc=f"sim {predictor.name}", disable=not progress, unit="prompt")):
        experts = np.asarray(trace.experts)
        if experts.size and np.any(np.diff(np.sort(experts, axis=-1), axis=-1) == 0):
            raise SimConfigError(f"prompt {trace.prompt_id}: a token routes to the same expert twice")
        keys = np.ascontiguousarray((experts.astype(np.int32) + layer_base).reshape(-1, k))  # [S, k]
        num_steps = keys.shape[0]
        preds = prompt_predictions(predictor, trace, meta)
        rows = select_rows(preds, num_steps, config.lookahead_layers, predictor.name)
        ranked, valid = ranked_experts(preds.scores[rows], max(prefetch_k, *ks), config.min_score)  # [R, m]
        req_ptr, req_key, req_target, req_score = build_requests(
            preds, rows, ranked, valid, num_steps, L, E, prefetch_k, step_offset
        )
        if (policy == "score" or config.admission == "cost" or config.miss_mode == "choose"
                or config.demand_admission == "bypass") and config.eviction_scores == "latest":  # they read scores  # fmt: skip
            upd_ptr, upd_layer, upd_scores = score_updates(preds, rows, num_steps, L)
        else:
            upd_ptr, upd_layer, upd_scores = np.zeros(num_steps + 1, np.int64), np.zeros(0, np.int64), np.zeros((0, E), np.float32)
        reuse = no_reuse if preds.reuse is None else np.ascontiguousarray(preds.reuse, np.float32)  # [S, E]
        if reuse.shape[0] not in (0, num_steps):
            raise SimConfigError(f"{predictor.name}: reuse scores have {reuse.shape[0]} rows for {num_steps} steps")
        scorer.add(preds, rows, ranked, valid, experts, config.warmup_tokens)
        if i == 0 or config.reset_per_prompt:
            fill = (
                _random_fill(rng, pools, per_pool, L, E)
                if config.initial_fill == "random"
                else np.zeros(0, np.int64)
            )
            K.reset_cache(fill, params, state)
        before = K.read_counters(state)
        access_next = dummy_next if next_use is None else next_use[step_offset : step_offset + num_steps]
        if next_use is None:
            access_next = np.full((num_steps, k), K.NEVER, np.int64)
        prompt = K.PromptInput(keys, access_next, req_ptr, req_key, req_target, req_score, upd_ptr, upd_layer,
                               upd_scores, reuse)  # fmt: skip
        K.run_prompt(prompt, step_offset, params, state)
        after = K.read_counters(state)
        _add_task_share(per_task, str(getattr(trace, "task", "") or ""), before, after)
        per_prompt_rows.append((int(trace.prompt_id), after["accesses"] - before["accesses"],
                                after["hits"] - before["hits"], after["stall_seconds"] - before["stall_seconds"]))
        step_offset += num_steps
    wall = time.perf_counter() - start_wall
    totals = K.read_counters(state)
    return SimResult(
        predictor=predictor.name,
        eviction=policy,
        oracle=bool(getattr(predictor, "oracle", False) or policy == "belady"),
        config=asdict(config),
        capacity_experts=pools * per_pool,
        scratch_slots=pools * config.scratch_slots(L, k),
        prompts=len(traces),
        **{name: totals[name] for name in _RESULT_COUNTERS},
        wall_seconds=wall,
        prediction=scorer.summary(),
        per_task=per_task,
        per_prompt={
            "prompt_id": np.array([r[0] for r in per_prompt_rows], np.int64),
            "accesses": np.array([r[1] for r in per_prompt_rows], np.int64),
            "hits": np.array([r[2] for r in per_prompt_rows], np.int64),
            "stall_seconds": np.array([r[3] for r in per_prompt_rows], np.float64),
        },
    )
