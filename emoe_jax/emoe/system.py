"""The eMoE serving system (arXiv 2503.06823) around an ``OffloadedEngine`` in restricted mode.

Per request: the task is extracted from the prompt text (keyword matcher or the
naive-Bayes classifier of ``emoe_jax.predict.emoe_task``). Per batch:
  1. ``prepare(scheduled)`` before a batch runs: when ``period`` (p, default 40)
     prompts have been served since the last forecast (and before the first
     batch), eMoE-A (``EMoEPredictor.model``) forecasts every task's per-layer
     expert frequencies from the routing of the most recent prompts (the task
     profiles stand in until that history exists);
  2. Eq. 2 (``expected_load``, predict/emoe_selection.py) turns the scheduled requests' prompt lengths W_j,
     the tasks' expected output lengths W_o, their forecast frequencies f and
     the sensitivities s(task, layer) into an expected token load per expert;
     ``select_experts`` keeps the top S_l per layer (S_l: the layer's device
     slots). Layers where every scheduled task has s = 0 (or load 0) have no
     preference: their free slots keep the experts already resident (nothing
     moves), then take the most used experts overall (the task-agnostic profile);
  3. ``apply``: only experts that changed are loaded (slots of dropped experts
     are reused), timed to completion; experts loaded, bytes moved and seconds
     are returned and accumulated;
  4. ``generate``: the engine runs restricted: each token goes to its best
     resident experts (lossy, eMoE's rerouting). The routing of every served
     prompt (its own tokens only) is folded into eMoE-A's history.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from typing import Any, Mapping, Sequence

import numpy as np

from emoe_jax.errors import EmoeError
from emoe_jax.predict.emoe_selection import expected_load, select_experts


class EMoESystemError(EmoeError):
    """Bad eMoE system setup (engine mode, unfitted predictor, period)."""


@dataclasses.dataclass
class ReloadStats:
    experts_loaded: int = 0
    bytes_moved: int = 0
    seconds: float = 0.0
    layers_changed: int = 0
    forecasts: int = 0

    def add(self, other: "ReloadStats") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class EMoESystem:
    def __init__(self, engine, predictor, extractor: Any = None, sensitivity: Mapping[str, np.ndarray] | None = None,
                 period: int = 40, output_tokens: Mapping[str, float] | None = None):
        """engine: restricted-mode OffloadedEngine; predictor: a fitted ``EMoEPredictor`` (profiles, eMoE-A);
        extractor: object with ``classify(text) -> task``; output_tokens: expected output length W_o per
        task (default: the predictor's, from its training traces)."""
        if engine.mode != "restricted":
            raise EMoESystemError("eMoE serves with a restricted-mode engine (OffloadedEngine(mode='restricted'))")
        if getattr(predictor, "profiles", None) is None:
            raise EMoESystemError("the eMoE predictor is not fitted: call predictor.fit(train_traces) first")
        if period < 1:
            raise EMoESystemError(f"period must be >= 1 prompts, got {period}")
        self.engine, self.predictor, self.extractor = engine, predictor, extractor
        self.sensitivity = None if sensitivity is None else {t: np.asarray(v, np.float64) for t, v in sensitivity.items()}
        self.period = int(period)
        self.num_layers, self.num_experts = engine.cfg.num_moe_layers, engine.cfg.num_experts
        self.budget = np.asarray(engine.slots, np.int64)  # [L] device slots per layer
        self.output_tokens = dict(output_tokens if output_tokens is not None else predictor.output_tokens)
        self.history: deque[np.ndarray] = deque(maxlen=predictor.history)  # [L, E] per served prompt
        self.prompts_served = 0
        self._next_forecast_at = 0
        self._past: np.ndarray | None = None  # history snapshot of the last invocation [m, L, E]
        self._forecast: dict[str, np.ndarray] = {}
        self.reloads = ReloadStats()
        self.selected: np.ndarray | None = None  # [L, E] bool: the resident set chosen last
        self._rows: list[tuple[int, np.ndarray]] | None = None  # per batch row: (token limit, counts [L, E])

    # -- tasks and Eq. 2 ----------------------------------------------------------------
    def task_of(self, text: str) -> str:
        if self.extractor is None:
            raise EMoESystemError("no task extractor: pass extractor= (KeywordTaskMatcher or NaiveBayesTaskClassifier)")
        return self.extractor.classify(text)

    def expected_output(self, task: str) -> float:
        if task in self.output_tokens:
            return float(self.output_tokens[task])
        return float(np.mean(list(self.output_tokens.values()))) if self.output_tokens else 0.0

    def frequencies(self, task: str) -> np.ndarray:
        """[L, E] forecast of the task's expert frequencies from the last eMoE-A invocation."""
        if task not in self._forecast:
            profiles = self.predictor.profiles
            profile = profiles.get(task, profiles["*"])
            model = self.predictor.model
            self._forecast[task] = (profile if model is None or self._past is None
                                    else model.forecast(self._past, profile, self.predictor.top_k))  # fmt: skip
        return self._forecast[task]

    def plan(self, scheduled: Sequence[tuple[str, int]]) -> np.ndarray:
        """[L, E] bool: exactly S_l experts per layer for the scheduled (task, prompt tokens) requests."""
        tasks = sorted({t for t, _ in scheduled})
        freq = {t: self.frequencies(t) for t in tasks}
        w_o = {t: self.expected_output(t) for t in tasks}
        load = expected_load(freq, list(scheduled), w_o, self.sensitivity)  # [L, E]
        mask = select_experts(load, self.budget)
        overall = self.predictor.profiles["*"]  # [L, E]
        cache = self.engine.device_cache
        for layer in range(self.num_layers):
            free = int(self.budget[layer] - mask[layer].sum())
            if free <= 0:
                continue
            resident = [int(e) for e in cache.expert_in_slot[layer] if e >= 0 and not mask[layer, e]]
            popular = [int(e) for e in np.argsort(-overall[layer], kind="stable") if not mask[layer, e]]
            fill = list(dict.fromkeys(resident + popular))[:free]
            mask[layer, fill] = True
        return mask

    # -- residency ---------------------------------------------------------------------
    def experts_to_load(self, mask: np.ndarray) -> int:
        return int((mask & ~(self.engine.device_cache.slot_of_expert >= 0)).sum())

    def apply(self, mask: np.ndarray) -> ReloadStats:
        """Make exactly ``mask`` resident, loading only what changed; timed until the slots are written."""
        import jax

        cache = self.engine.device_cache
        stats = ReloadStats()
        t0 = time.perf_counter()
        for layer in range(self.num_layers):
            want = np.flatnonzero(mask[layer])
            missing = int((cache.slot_of_expert[layer, want] < 0).sum())
            if missing == 0:
                continue
            # |want| = S_l and every wanted expert is protected, so each missing one reuses the
            # slot of a dropped expert: only what changed moves.
            self.engine.preload(layer, want.tolist())
            stats.experts_loaded += missing
            stats.layers_changed += 1
        jax.block_until_ready([b for b in cache.buffers])
        stats.seconds = time.perf_counter() - t0
        stats.bytes_moved = stats.experts_loaded * cache.slot_bytes
        self.selected = mask.copy()
        return stats

    def due(self) -> bool:
        return self.prompts_served >= self._next_forecast_at

    def expected_experts_to_load(self, scheduled: Sequence[tuple[str, int]]) -> int:
        """E of Eq. 3 for a batch run next: the experts a forecast would load now (0 when none is due)."""
        return self.experts_to_load(self.plan(scheduled)) if self.due() else 0

    def prepare(self, scheduled: Sequence[tuple[str, int]]) -> ReloadStats | None:
        """Before a batch: every ``period`` prompts, forecast, select (Eq. 2) and reload. None when not due."""
        if not self.due():
            return None
        if not scheduled:
            raise EMoESystemError("prepare needs the scheduled requests as (task, prompt tokens) pairs")
        self._past = np.stack(self.history) if len(self.history) == self.history.maxlen else None
        self._forecast = {}
        stats = self.apply(self.plan(scheduled))
        stats.forecasts = 1
        self.reloads.add(stats)
        self._next_forecast_at = self.prompts_served + self.period
        return stats

    # -- serving -------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, output_limits: Sequence[int] | None = None,
                 **kwargs):
        """Run one batch on the restricted engine; each prompt's routing over its first
        len(prompt) + output_limits[i] tokens joins eMoE-A's history."""
        if self.selected is None:
            raise EMoESystemError("no experts are resident yet: call prepare(scheduled) before the first batch")
        limits = output_limits if output_limits is not None else [max_new_tokens] * len(prompts)
        self._rows = [(len(p) + int(g), np.zeros((self.num_layers, self.num_experts))) for p, g in zip(prompts, limits)]
        try:
            observers = [*kwargs.pop("observers", ()), self._record]
            result = self.engine.generate(prompts, max_new_tokens, observers=observers, **kwargs)
        finally:
            rows, self._rows = self._rows, None
        for limit, counts in rows:
            tokens = counts[0].sum() / max(self.engine.cfg.top_k, 1)
            self.history.append((counts / max(tokens, 1.0)).astype(np.float32))
        self.prompts_served += len(prompts)
        return result

    def _record(self, step) -> None:
        """Routing hook: per batch row, count expert choices of the row's own tokens."""
        if self._rows is None or step.positions is None:
            return
        pos = step.positions  # [B, T]; -1 padding
        for b, (limit, counts) in enumerate(self._rows):
            own = (pos[b] >= 0) & (pos[b] < limit - 1)  # the last generated token is never fed back
            if own.any():
                np.add.at(counts[step.moe_layer], step.ids[b][own].reshape(-1), 1.0)



def fit_emoe_predictor(traces=None, *, engine=None, prompts: Sequence[tuple[str, Sequence[int]]] = (),
                       max_new_tokens: int = 8, period: int = 40, history: int = 2, train_steps: int = 300,
                       seed: int = 0, progress: bool = False):
    """A fitted ``EMoEPredictor`` (task profiles, W_o, eMoE-A) from a trace set, or from traces collected
    now on ``engine`` (exact mode: the full model's routing) for (task, token ids) ``prompts``."""
    from emoe_jax.predict.emoe import EMoEPredictor
    from emoe_jax.traces import TraceSet
    from emoe_jax.runtime.trace_collect import collect_traces, trace_meta

    if traces is None:
        if engine is None or not prompts:
            raise EMoESystemError("give a trace set, or an exact-mode engine and (task, token ids) prompts to trace")
        if engine.mode != "exact":
            raise EMoESystemError("trace the full model: the profiling engine must run in exact mode")
        collected = collect_traces(engine, [(t, list(ids)) for t, ids in prompts], None, max_new_tokens,
                                   progress=progress)  # fmt: skip
        traces = TraceSet.from_prompts(trace_meta(engine, "serve-profiling"), collected)
    predictor = EMoEPredictor(period=period, history=history, task_source="trace", train_steps=train_steps,
                              seed=seed)  # fmt: skip
    predictor.fit(traces)
    return predictor
