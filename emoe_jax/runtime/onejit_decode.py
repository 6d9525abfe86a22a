"""Host side of the one-jit decode path: hand the device cache to the step, book its reports.

`OneJitDecoder.start` converts the engine's `DeviceSlotCache` (NumPy tables, LRU
order) into per-layer `SlotState`s on the device. `advance(step)` keeps one step in
flight: before it blocks on step s's token it has already dispatched step s+1, fed
with step s's token *on the device*, so the host's reading, EOS check, streaming and
bookkeeping overlap the device's next step. The cost: when every row ends at EOS,
the step in flight was one too many (its output is dropped; its fetches happened
and are booked). Each step's report (routing, hits, misses, prefetches), copied to
the host asynchronously, is booked into the engine's stats, routing hooks and
prefetch counters when its token is read; `finish` books what is still in flight and
writes the tables, LRU order and slot buffers back, so the staged path (the next
prefill) continues from the same residency.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from .ingraph_predictors import PrefillRouting
from .onejit import COUNTERS, build_decode_step
from .prefetch import PrefetchStats
from .step_routing import StepRouting


class OneJitDecoder:
    def __init__(self, engine, predictor=None):
        self.engine = engine
        self.predictor = predictor  # in-graph predictor or None
        self.prefetch_stats = PrefetchStats()

    def _step_fn(self, greedy: bool, top_p_enabled: bool, return_logits: bool) -> Callable:
        e = self.engine
        return build_decode_step(e.cfg, e._graphdef, method=e.method, restricted=e.mode == "restricted",
                                 greedy=greedy, top_p_enabled=top_p_enabled, return_logits=return_logits,
                                 predictor=self.predictor, prefetch_k=e._prefetch_k, min_score=e._min_score,
                                 **e._onejit_ranking())

    # ---- device cache <-> slot states --------------------------------------------
    def start(self, caches: list, prefill: PrefillRouting | None, *, temperature: float, top_p: float,
              return_logits: bool, first_index: int, pad_len: np.ndarray, steps: int, key,
              teacher: np.ndarray | None = None, live_rows: int | None = None) -> None:
        """first_index: cache index of decode step 0's token; steps: decode steps this call may run
        (max_new_tokens - 1); teacher [B, >= steps]: tokens fed instead of the model's picks;
        live_rows: the first rows are real, the rest pad the batch to its bucket (default: all real)."""
        residency = self.engine.residency
        states = residency.to_slot_states()
        self.clock = residency.lru_clock  # above every LRU rank the states start with
        # Committed to the device like the step's outputs: an uncommitted argument (NumPy, jnp.zeros,
        # a KV cache prefill left untouched) has another jit signature, so the second step would
        # compile the whole step again.
        device = residency.device_cache.device
        self.states, self.caches = jax.device_put(states, device), jax.device_put(caches, device)
        self.pstate = None
        self.pparams = ()
        if self.predictor is not None:
            self.pparams = self.predictor.params()
            self.pstate = jax.device_put(self.predictor.init_state(prefill), device)
        self.fn = self._step_fn(temperature <= 0, top_p < 1.0, return_logits)
        self.temperature, self.top_p = np.float32(max(temperature, 1e-6)), np.float32(top_p)
        self.prefetch_stats = PrefetchStats()  # per generate call, like the engine's other stats
        self.first_index, self.steps, self.key, self.teacher = first_index, steps, key, teacher
        self.base_positions = (first_index - np.asarray(pad_len)).astype(np.int32)  # [B] step 0's positions
        self.device = device
        self.pad_dev = jax.device_put(np.asarray(pad_len, np.int32), device)
        rows = len(pad_len)
        self.live_rows = rows if live_rows is None else int(live_rows)
        self.live_dev = jax.device_put(np.arange(rows) < self.live_rows, device)  # [B] bool
        self.inflight: list[tuple[int, object]] = []  # (step, StepOut) dispatched, not yet read

    def _dispatch(self, step: int, tokens) -> None:
        e = self.engine
        self.clock += 1
        out = self.fn(e._params, e.residency.host_layers, self.caches, self.states, self.pparams, self.pstate, tokens,
                      self.live_dev, np.int32(self.first_index + step), self.pad_dev, self.base_positions + np.int32(step),
                      np.int32(self.clock), self.key, np.int32(step + 1), self.temperature, self.top_p)
        self.caches, self.states, self.pstate = out.caches, out.slot_states, out.predictor_state
        if out.report is not None:  # routing only travels when somebody looks at it
            for a in (out.report if self.engine.routing_hooks else out.report[2:]):
                a.copy_to_host_async()
        self.inflight.append((step, out))

    def advance(self, step: int, tokens: np.ndarray):
        """Decode step `step` on tokens [B] (the host's copy of what is fed); returns (logits [B, V]
        or None, next tokens [B] np.int32)."""
        # Host tokens go in committed to the device, like the step's own output tokens: one jit signature.
        if not self.inflight:  # nothing speculative in flight (the first step)
            self._dispatch(step, jax.device_put(np.asarray(tokens, np.int32), self.device))
        done_step, out = self.inflight[0]
        assert done_step == step, (done_step, step)
        if step + 1 < self.steps:  # the next step, fed on the device, runs while we read this one
            feed = out.tokens if self.teacher is None else jax.device_put(self.teacher[:, step + 1], self.device)
            self._dispatch(step + 1, feed)
        self.inflight.pop(0)
        nxt = np.asarray(out.tokens)  # the one blocking read of the step
        self._book(out.report, self.base_positions + step)
        return (None if out.logits is None else np.asarray(out.logits)), nxt

    def _book(self, report, positions) -> None:
        if report is None:
            return
        e = self.engine
        c = dict(zip(COUNTERS, np.asarray(report.counters).T))  # name -> [Lm]
        stats, pf = e.device_cache.stats, self.prefetch_stats
        misses, prefetched = int(c["misses"].sum()), int(c["prefetched"].sum())
        stats.hits += int(c["hits"].sum())
        stats.misses += misses
        stats.evictions += int(c["evictions"].sum())
        stats.bytes_in += (misses + prefetched) * e.device_cache.slot_bytes
        e.host.stats.hits += misses + prefetched  # every copy is served by the host stacks
        e._timers.waves += int(c["waves"][c["waves"] > 1].sum())
        pf.issued += prefetched
        pf.started += prefetched
        pf.completed += prefetched
        pf.timely += int(c["timely"].sum())
        pf.wasted += int(c["wasted"].sum())
        pf.bytes += prefetched * e.device_cache.slot_bytes
        if e.routing_hooks:
            live = self.live_rows  # observers see the real rows only
            ids = np.asarray(report.ids)[:, :live]  # [Lm, B, k]
            weights = np.asarray(report.weights, np.float32)[:, :live]
            b = ids.shape[1]
            valid = np.ones((b, 1), bool)
            for moe_layer in range(ids.shape[0]):
                step = StepRouting(moe_layer, ids[moe_layer][:, None], weights[moe_layer][:, None], valid, None,
                                   np.asarray(positions)[:live].reshape(b, 1))
                for hook in e.routing_hooks:
                    hook(step)

    def finish(self) -> list:
        """Book the step still in flight (if any) and give the device cache back to the engine."""
        for step, out in self.inflight:  # dispatched ahead, then every row ended: its fetches happened
            self._book(out.report, self.base_positions + step)
        self.inflight = []
        self.engine.residency.from_slot_states(self.states)
        self.states = []
        caches, self.caches = self.caches, None
        return caches


__all__ = ["OneJitDecoder"]
