"""Forced-routing replay: run a model of real shape with routing taken from a real trace.

Random weights say nothing about which experts a real model picks, but a
systems measurement (hit rates, stalls, decode tokens/s) only needs two things
to be real: the expert sizes and the routing. So the engine runs a random model
of a real family's shape (`forced_replay_model`) and its `routing_override`
hook replaces every real token's top-k by what the traced model chose
(`TraceRouting`). Prompt tokens are prefilled and the rest decoded one token at
a time, exactly as the engine would serve them.

Steps of a replay (`run_forced_replay`):
  1. build (or take) the replay model and an `OffloadedEngine` over it;
  2. per batch of trace prompts, a `TraceRouting` gives the prompts' token ids,
     the number of new tokens, and the override: token at prompt position p of
     row b, MoE layer l -> trace experts[p, l] and weights;
  3. one warm-up generation compiles every stage, then the device cache is emptied;
  4. the batches are generated with the override; decode-phase counters are
     separated from prefill ones with a snapshot taken at the first decode step.
See docs/forced_routing.md.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from typing import Any, Iterator, Sequence

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from ..config import PRESETS, ConfigError, MoEConfig
from ..model.decoder import MoETransformer
from ..model.moe import ExpertSlots
from ..traces.format import PromptTrace, TraceSet
from .compile_count import compile_count
from .engine import OffloadedEngine, StepRouting
from .tiers import InMemoryExperts

PAST_END = ("wrap", "hold")


class ForcedRoutingError(ValueError):
    """Traces that cannot drive this model (shape mismatch, too short, wrong batch); the message says why."""


# ---------------------------------------------------------------------------- routing


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


# ---------------------------------------------------------------------------- model


@dataclasses.dataclass
class ReplayModel:
    cfg: MoEConfig
    graphdef: Any
    params: Any
    source: InMemoryExperts  # the disk-tier stand-in holding every routed expert
    dtype: Any
    build_s: float

    @property
    def expert_bytes_total(self) -> int:
        return self.source.expert_bytes * self.cfg.num_experts * self.cfg.num_moe_layers

    def engine(self, **engine_kwargs) -> OffloadedEngine:
        return OffloadedEngine(self.cfg, self.graphdef, self.params, self.source, dtype=self.dtype, **engine_kwargs)


def _scaled(value: int | None, scale: float, multiple: int = 1) -> int | None:
    if value is None or value == 0:
        return value
    return max(multiple, int(round(value * scale / multiple)) * multiple)


def scaled_config(shape: str = "deepseek-v2-lite", scale: float = 0.25, vocab_size: int | None = 4096) -> MoEConfig:
    """A preset with widths scaled by `scale`; depth, experts, top-k and head dims stay real.

    Scaled: hidden size, dense and expert intermediate sizes (shared experts too),
    attention heads (grouping kept), MLA's latent ranks. `vocab_size` replaces
    the vocabulary (None keeps it): the embedding and head are dense weights
    that only cost memory here.
    """
    try:
        base = PRESETS[shape]
    except KeyError:
        raise ConfigError(f"unknown shape {shape!r}; choose one of {', '.join(sorted(PRESETS))}") from None
    if not 0 < scale <= 1:
        raise ConfigError(f"scale must be in (0, 1], got {scale}")
    heads = _scaled(base.num_heads, scale)
    group = base.num_heads // base.num_kv_heads
    kv_heads = max(1, heads // group)  # keep GQA's grouping where the scaled head count allows
    if heads % kv_heads:
        kv_heads = heads
    moe_inter = _scaled(base.moe_intermediate_size, scale, 32)
    shared = 0
    if base.shared_expert_intermediate_size:
        # DeepSeek's shared experts are n x the expert width; keep that ratio exactly.
        ratio = base.shared_expert_intermediate_size / base.moe_intermediate_size
        shared = int(round(ratio * moe_inter)) if float(ratio).is_integer() else _scaled(
            base.shared_expert_intermediate_size, scale, 32)
    changes: dict[str, Any] = dict(
        hidden_size=_scaled(base.hidden_size, scale, 64), intermediate_size=_scaled(base.intermediate_size, scale, 32),
        moe_intermediate_size=moe_inter, shared_expert_intermediate_size=shared,
        num_heads=heads, num_kv_heads=kv_heads,
        kv_lora_rank=_scaled(base.kv_lora_rank, scale, 16), q_lora_rank=_scaled(base.q_lora_rank, scale, 16),
    )
    if vocab_size is not None:
        # The real vocabulary's special ids (100000, ...) would fall outside a reduced one.
        changes.update(vocab_size=vocab_size, bos_token_id=None if base.bos_token_id is None else 1,
                       eos_token_id=None if base.eos_token_id is None else 2,
                       pad_token_id=None if base.pad_token_id is None else 0)
    return base.replace(**changes)


def _random_bf16(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    """Random bfloat16 weights of RMS about fan_in**-0.5, drawn as bit patterns.

    A random sign and mantissa with one fixed exponent give magnitudes uniform in
    [a, 2a) (RMS 1.53a). Normal draws plus a cast took ~40 s for DeepSeek-V2-Lite's
    1,664 experts at scale 1/4 on this CPU; bits, made in place in one buffer, take
    3-12 s, most of it the first touch of 1.8 GB. Routing is forced, so the
    weights' distribution only has to keep activations finite.
    """
    exponent = int(round(math.log2(fan_in ** -0.5 / 1.53)))
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    np.bitwise_and(bits, np.uint16(0x807F), out=bits)  # keep sign and mantissa
    np.bitwise_or(bits, np.uint16((127 + exponent) << 7), out=bits)  # fixed exponent
    return bits.view(ml_dtypes.bfloat16)


def random_experts(cfg: MoEConfig, seed: int = 0, dtype=jnp.bfloat16) -> list[ExpertSlots]:
    """Per MoE layer, all E routed experts as NumPy arrays (gate/up [E, H, I], down [E, I, H])."""
    rng = np.random.default_rng(seed)
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    target = np.dtype(dtype)
    layers = []
    for _ in range(cfg.num_moe_layers):
        b = int(cfg.expert_bias)  # gpt-oss: the bias as one extra input row (model.moe.ExpertAct)
        w = [_random_bf16(rng, (e, h + b, i), h), _random_bf16(rng, (e, h + b, i), h),
             _random_bf16(rng, (e, i + b, h), i)]
        layers.append(ExpertSlots(*(a if a.dtype == target else a.astype(target) for a in w)))
    return layers


def random_dense_params(cfg: MoEConfig, seed: int = 0, dtype=jnp.bfloat16):
    """(graphdef, params) of a random MoETransformer without running its initialisers.

    Eager Flax init of DeepSeek-V2-Lite's 27 layers takes ~8 s on this CPU whatever
    the width; the structure from `nnx.eval_shape` filled with NumPy draws takes 2-4 s.
    Kernels [in, out] get RMS about in**-0.5, embeddings RMS 1, norm weights 1.
    """
    abstract = nnx.eval_shape(lambda: MoETransformer(cfg, dtype=dtype, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    filled = []
    for path, var in nnx.to_flat_state(state):
        spec = var.get_value()  # ShapeDtypeStruct
        name = path[-1]
        if name == "weight":  # RMSNorm scales
            value = np.ones(spec.shape, np.float32)
        elif name in ("kernel", "embedding"):
            value = _random_bf16(rng, spec.shape, spec.shape[0] if name == "kernel" else 1)
        elif name in ("bias", "sinks", "e_score_correction_bias"):  # biases, sinks, the router's correction: neutral
            value = np.zeros(spec.shape, np.float32)
        else:
            raise ConfigError(f"random_dense_params does not know how to fill parameter {'/'.join(map(str, path))}")
        filled.append((path, var.replace(jnp.asarray(value, spec.dtype))))
    return graphdef, nnx.from_flat_state(filled)


def forced_replay_model(shape: str = "deepseek-v2-lite", scale: float = 0.25, seed: int = 0,
                        dtype=jnp.bfloat16, vocab_size: int | None = 4096) -> ReplayModel:
    """A random model of a real family's shape, widths scaled by `scale`, experts in an InMemoryExperts.

    deepseek-v2-lite at scale 1/4: hidden 512, expert width 352, 27 layers (26 MoE),
    64 experts top-6, 2 shared experts, MLA; 1.08 MB per bf16 expert, 1.8 GB in all.
    scale=1 is the real size (17.3 MB per expert, 28.8 GB of experts): GPU hosts only.
    """
    t0 = time.perf_counter()
    cfg = scaled_config(shape, scale, vocab_size)
    dtype = jnp.dtype(dtype)
    graphdef, params = random_dense_params(cfg, seed, dtype)
    source = InMemoryExperts(random_experts(cfg, seed + 1, dtype))
    return ReplayModel(cfg, graphdef, params, source, dtype, time.perf_counter() - t0)


# ---------------------------------------------------------------------------- replay


def _decode_counters(before: dict, after: dict) -> dict:
    dev_b, dev_a = before["device"], after["device"]
    return {"hits": dev_a["hits"] - dev_b["hits"], "misses": dev_a["misses"] - dev_b["misses"],
            "stall_s": after["stall_s"] - before["stall_s"], "h2d_bytes": after["h2d_bytes"] - before["h2d_bytes"]}


def _warm_up(engine: OffloadedEngine, routing: TraceRouting) -> None:
    """Compile prefill and decode stages for this batch shape, then forget the cache it filled."""
    short = copy.copy(routing)  # same prompts (same prefill bucket), two decode steps
    short.decode_tokens = min(2, routing.decode_tokens)
    with forced_routing(engine, short):
        engine.generate(short.prompts, short.max_new_tokens, stop_at_eos=False)
    engine.residency.evict_all()


def choose_prompts(traces: TraceSet | Sequence[PromptTrace], n_prompts: int, min_tokens: int) -> list[int]:
    """Indices of the first `n_prompts` traces (stored order) with at least `min_tokens` tokens."""
    chosen = [i for i in range(len(traces)) if traces[i].n_tokens >= min_tokens][:n_prompts]
    if len(chosen) < n_prompts:
        raise ForcedRoutingError(f"only {len(chosen)} of {len(traces)} trace prompts have >= {min_tokens} tokens "
                                 f"(prompt + decode tokens); {n_prompts} were asked for. Lower n_prompts, "
                                 "prompt_tokens or decode_tokens.")
    return chosen


def run_forced_replay(engine_kwargs: dict | None, traces: TraceSet | Sequence[PromptTrace], n_prompts: int, *,
                      model: ReplayModel | None = None, engine: OffloadedEngine | None = None,
                      prompt_tokens: int | None = 16, decode_tokens: int | None = 32, batch_size: int = 1,
                      warmup: bool = True, past_end: str = "wrap") -> dict:
    """Replay `n_prompts` traces through the engine with forced routing; returns decode-phase figures.

    The engine is `engine` if given (e.g. one with a prefetcher), else a new one over
    `model` (default: `forced_replay_model()`) built with `engine_kwargs`
    (device_experts, policy, ...). Prompts: the first `n_prompts` traces with at
    least prompt_tokens + decode_tokens tokens, in stored order, `batch_size` at a time;
    the device cache persists from batch to batch (like the simulator's running cache).
    Each prompt prefills `prompt_tokens` trace tokens (None: its n_prefill) and decodes
    `decode_tokens` more (None: to its trace's end).

    Returned: decode tokens/s (decode wall time, which includes on-demand fetch stalls),
    the device hit rate of decode steps alone and of prefill + decode, stall seconds
    and ms per decode token, bytes moved host->device, compilations during the timed
    runs and during their decode phases alone (the warm-up compiles decode; a prefill
    that needs more experts than slots may still compile its wave kernels later, which
    never touches decode timing), device/all expert bytes.
    """
    if engine is None:
        model = model or forced_replay_model()
        engine = model.engine(**(engine_kwargs or {}))
    if batch_size < 1:
        raise ForcedRoutingError(f"batch_size must be at least 1, got {batch_size}")
    need = (prompt_tokens or 1) + (decode_tokens or 0)
    chosen = choose_prompts(traces, n_prompts, need)
    batches = [chosen[i:i + batch_size] for i in range(0, len(chosen), batch_size)]
    routings = [TraceRouting(traces, engine.cfg, b, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens,
                             past_end=past_end) for b in batches]
    if warmup:
        _warm_up(engine, routings[0])
    totals = dict(decode_tokens=0, decode_s=0.0, prefill_tokens=0, prefill_s=0.0, hits=0, misses=0,
                  all_hits=0, all_misses=0, stall_s=0.0, h2d_bytes=0, compiles=0, decode_compiles=0)
    stats: dict = {}
    for routing in routings:
        snapshot: dict = {}

        def at_first_decode(step: int, _tokens, snapshot=snapshot) -> None:
            if step == 0:  # prefill is done, no decode step has run yet
                snapshot.update(engine.stats(), compiles_before_decode=compile_count())

        with forced_routing(engine, routing):
            result = engine.generate(routing.prompts, routing.max_new_tokens, stop_at_eos=False,
                                     on_token=at_first_decode)
        stats = result.stats
        totals["decode_compiles"] += compile_count() - snapshot["compiles_before_decode"]
        dec = _decode_counters(snapshot, stats)
        totals["decode_tokens"] += stats["decode_tokens"]
        totals["decode_s"] += stats["decode_s"]
        totals["prefill_tokens"] += stats["prefill_tokens"]
        totals["prefill_s"] += stats["prefill_s"]
        totals["hits"] += dec["hits"]
        totals["misses"] += dec["misses"]
        totals["all_hits"] += stats["device"]["hits"]
        totals["all_misses"] += stats["device"]["misses"]
        totals["stall_s"] += dec["stall_s"]
        totals["h2d_bytes"] += dec["h2d_bytes"]
        totals["compiles"] += stats["compiles"] or 0
    lookups = totals["hits"] + totals["misses"]
    all_lookups = totals["all_hits"] + totals["all_misses"]
    return {
        "prompts": len(chosen),
        "prompt_indices": chosen,
        "batch_size": batch_size,
        "prompt_tokens": prompt_tokens,
        "decode_tokens": totals["decode_tokens"],
        "decode_s": totals["decode_s"],
        "decode_tokens_per_s": totals["decode_tokens"] / totals["decode_s"] if totals["decode_s"] else 0.0,
        "prefill_tokens": totals["prefill_tokens"],
        "prefill_s": totals["prefill_s"],
        "device_hit_rate": totals["hits"] / lookups if lookups else 1.0,
        "device_hits": totals["hits"],
        "device_misses": totals["misses"],
        "device_hit_rate_with_prefill": totals["all_hits"] / all_lookups if all_lookups else 1.0,
        "device_hits_with_prefill": totals["all_hits"],
        "device_misses_with_prefill": totals["all_misses"],
        "stall_s": totals["stall_s"],
        "stall_ms_per_token": 1e3 * totals["stall_s"] / max(totals["decode_tokens"], 1),
        "h2d_bytes": totals["h2d_bytes"],
        "compiles": totals["compiles"],
        "decode_compiles": totals["decode_compiles"],
        "device_slots_per_layer": stats.get("device_slots_per_layer"),
        "device_expert_bytes": stats.get("device_expert_bytes"),
        "all_expert_bytes": stats.get("all_expert_bytes"),
        "mode": stats.get("mode"),
    }


__all__ = ["TraceRouting", "ForcedRoutingError", "ReplayModel", "forced_replay_model", "scaled_config",
           "random_experts", "run_forced_replay", "forced_routing", "fold_token_ids", "check_trace_shape",
           "choose_prompts", "PAST_END"]
