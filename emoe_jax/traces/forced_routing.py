"""Forced routing: a routing override that makes the engine route like recorded traces.

Random weights say nothing about which experts a real model picks, but a
systems measurement (hit rates, stalls, decode tokens/s) only needs two things
to be real: the expert sizes and the routing. `TraceRouting` is the adapter
from a trace set to the engine's `routing_override` hook: every real token's
top-k at every MoE layer becomes what the traced model chose. The replay
benchmark that drives it over a real-shaped random model is
`emoe_jax.bench.replay`; docs/forced_routing.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from emoe_jax.errors import EmoeError
from ..config import MoEConfig
from .format import PromptTrace, TraceSet

if TYPE_CHECKING:  # the runtime sits above the trace format; only its types are named here
    from ..runtime.engine import OffloadedEngine
    from ..runtime.step_routing import StepRouting

PAST_END = ("wrap", "hold")


class ForcedRoutingError(EmoeError):
    """Traces that cannot drive this model (shape mismatch, too short, wrong batch); the message says why."""


def _combine_weights(weights: np.ndarray | None, cfg: MoEConfig, shape: tuple[int, ...]) -> np.ndarray:
    """[T, L, k] float32 combine weights as the model's router would hand them to the experts.

    Trace weights are the combine weights the traced model used; a family that
    renormalises its top-k gets them renormalised (then scaled by DeepSeek's
    routed factor). Traces without weights (the MoE-Beyond import) get 1/k each,
    times the routed factor: the real top-k probabilities are unknown.
    """
    k = shape[-1]
    if weights is None:
        return np.full(shape, cfg.routed_scaling_factor / k, np.float32)
    w = np.asarray(weights, np.float32)
    if cfg.norm_topk_prob:
        total = w.sum(-1, keepdims=True)
        w = np.where(total > 0, w / np.where(total > 0, total, 1.0), 1.0 / k) * cfg.routed_scaling_factor
    return w.astype(np.float32)


def check_trace_shape(cfg: MoEConfig, num_layers: int, num_experts: int, top_k: int, where: str = "traces") -> None:
    """Raise ForcedRoutingError unless the traces' L, E, k are the model's MoE layers, experts and top-k."""
    wrong = [f"{name}: {where} have {got}, the model has {want}"
             for name, got, want in (("MoE layers", num_layers, cfg.num_moe_layers),
                                     ("routed experts per layer", num_experts, cfg.num_experts),
                                     ("top-k", top_k, cfg.top_k)) if got != want]
    if wrong:
        raise ForcedRoutingError(
            "the traces do not fit the model (" + "; ".join(wrong) + "). Replay them on a model of the traced "
            "shape, e.g. forced_replay_model('deepseek-v2-lite') for the DeepSeek-V2-Lite Puffin traces.")


@dataclasses.dataclass(frozen=True)
class _Row:
    trace: PromptTrace
    prompt_len: int  # tokens [0, prompt_len) are prefilled, the rest decoded
    experts: np.ndarray  # [T, L, k] int32
    weights: np.ndarray  # [T, L, k] float32 combine weights


class TraceRouting:
    """A routing override that makes the engine route like the traces.

    Batch row b replays trace prompt `prompts[b]`. For a real token at prompt
    position p of row b at MoE layer l it returns experts[p, l] and the combine
    weights (see `_combine_weights`); padding keeps the router's own choice.

    prompt_tokens: how many trace tokens are fed as the prompt. None: each
    trace's `n_prefill`. An int P treats tokens [P, T) as generated, which is
    how prefill-only traces (the MoE-Beyond import has n_prefill = T) are
    replayed as decoding.
    decode_tokens: trace tokens replayed as decode steps; None: the most any
    row has (T - P).
    past_end: what a row whose trace is shorter than the run replays at
    position p >= T: "wrap" (default) replays token p mod T, the trace again
    from its start, so the locality stays real; "hold" repeats the last token's
    routing (every step after the first one past the end is then all hits).

    Use: engine.routing_override = routing; engine.generate(routing.prompts,
    routing.max_new_tokens, stop_at_eos=False).
    """

    def __init__(self, traces: TraceSet | Sequence[PromptTrace], cfg: MoEConfig,
                 prompts: Sequence[int] | None = None, *, prompt_tokens: int | None = None,
                 decode_tokens: int | None = None, past_end: str = "wrap"):
        if past_end not in PAST_END:
            raise ForcedRoutingError(f"past_end={past_end!r}; choose one of {PAST_END}")
        if isinstance(traces, TraceSet):
            m = traces.meta
            check_trace_shape(cfg, m.num_layers, m.num_experts, m.top_k)
        n = len(traces)
        indices = list(range(n)) if prompts is None else [int(i) for i in prompts]
        if not indices:
            raise ForcedRoutingError("no trace prompts chosen; give at least one")
        bad = [i for i in indices if not -n <= i < n]
        if bad:
            raise ForcedRoutingError(f"prompt indices {bad} are outside the {n} traces given")
        if prompt_tokens is not None and prompt_tokens < 1:
            raise ForcedRoutingError(f"prompt_tokens must be at least 1, got {prompt_tokens}")
        self.cfg, self.past_end = cfg, past_end
        self.rows = [self._row(traces[i], cfg, prompt_tokens) for i in indices]
        longest = max(r.trace.n_tokens - r.prompt_len for r in self.rows)
        self.decode_tokens = longest if decode_tokens is None else int(decode_tokens)
        if self.decode_tokens < 0:
            raise ForcedRoutingError(f"decode_tokens must be >= 0, got {decode_tokens}")
        self.forced_tokens = 0  # (token, layer) pairs overridden so far

    @staticmethod
    def _row(trace: PromptTrace, cfg: MoEConfig, prompt_tokens: int | None) -> _Row:
        experts = np.asarray(trace.experts)  # [T, L, k]
        if experts.ndim != 3:
            raise ForcedRoutingError(f"trace prompt {trace.prompt_id}: experts has shape {experts.shape}, "
                                     "expected [tokens, MoE layers, top_k]")
        t = experts.shape[0]
        # Without a TraceSet's meta, E is only known to exceed the largest id.
        largest = int(experts.max()) + 1 if experts.size else 0
        check_trace_shape(cfg, experts.shape[1], max(largest, cfg.num_experts), experts.shape[2],
                          where=f"trace prompt {trace.prompt_id}")
        if t == 0:
            raise ForcedRoutingError(f"trace prompt {trace.prompt_id} has no tokens")
        p = trace.n_prefill if prompt_tokens is None else prompt_tokens
        if p > t:
            raise ForcedRoutingError(f"trace prompt {trace.prompt_id} has {t} tokens, fewer than the {p} prompt "
                                     "tokens asked for; lower prompt_tokens or choose longer prompts")
        if p < 1:
            raise ForcedRoutingError(f"trace prompt {trace.prompt_id} has n_prefill=0: nothing to prefill; "
                                     "give prompt_tokens >= 1")
        return _Row(trace, p, experts.astype(np.int32), _combine_weights(trace.weights, cfg, experts.shape))

    # -- what the engine is fed

    @property
    def prompts(self) -> list[list[int]]:
        """Each row's prompt: the trace's real token ids (folded into the vocabulary, see `fold_token_ids`)."""
        return [fold_token_ids(r.trace.token_ids[: r.prompt_len], self.cfg) for r in self.rows]

    @property
    def max_new_tokens(self) -> int:
        """For generate(): it forwards max_new_tokens - 1 generated tokens (the last one is only
        sampled), so decode_tokens + 1 replays every decode position once."""
        return self.decode_tokens + 1

    def trace_index(self, row: int, positions: np.ndarray) -> np.ndarray:
        """Trace token replayed at prompt positions [n] >= 0 of `row` (past the end: wrap or hold)."""
        t = self.rows[row].trace.n_tokens
        return positions % t if self.past_end == "wrap" else np.minimum(positions, t - 1)

    # -- the override

    def __call__(self, step: StepRouting) -> tuple[np.ndarray, np.ndarray]:
        if step.positions is None:
            raise ForcedRoutingError("the engine passed no token positions; forced routing needs StepRouting.positions")
        b = step.ids.shape[0]
        if b != len(self.rows):
            raise ForcedRoutingError(f"the engine runs {b} prompts but this TraceRouting replays {len(self.rows)}; "
                                     "generate exactly routing.prompts")
        ids = np.array(step.ids, np.int32, copy=True)  # [B, T, k]
        weights = np.array(step.weights, np.float32, copy=True)  # [B, T, k]
        for r, row in enumerate(self.rows):
            real = step.positions[r] >= 0  # [T] bool; padding keeps the router's choice
            if not real.any():
                continue
            src = self.trace_index(r, step.positions[r][real])
            ids[r, real] = row.experts[src, step.moe_layer]
            weights[r, real] = row.weights[src, step.moe_layer]
            self.forced_tokens += int(real.sum())
        return ids, weights


def fold_token_ids(token_ids: np.ndarray, cfg: MoEConfig) -> list[int]:
    """Trace token ids as valid ids of `cfg`: unknown ids (-1) become BOS (or 0), ids past a reduced
    vocabulary wrap (id mod vocab). With forced routing, token ids only change the (random) dense
    compute, never which experts run."""
    fallback = cfg.bos_token_id if cfg.bos_token_id is not None and cfg.bos_token_id < cfg.vocab_size else 0
    ids = np.asarray(token_ids, np.int64)
    return np.where(ids < 0, fallback, ids % cfg.vocab_size).astype(int).tolist()


@contextlib.contextmanager
def forced_routing(engine: OffloadedEngine, routing: TraceRouting | None) -> Iterator[OffloadedEngine]:
    """Install `routing` as the engine's override for the block, restoring the previous one after."""
    previous = engine.routing_override
    engine.routing_override = routing
    try:
        yield engine
    finally:
        engine.routing_override = previous
