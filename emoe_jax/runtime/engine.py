"""The offloaded engine: prefill and decode with only S experts per layer on the device.

For each step (prefill of the prompts, then one token at a time) and each layer:
  1. `attend`: attention with the KV cache and the router's top-k (one jit);
  2. the top-k ids come to the host (the only sync per layer), and
     - exact mode: every expert a real token routed to is made resident (device
       slot hit, else host tier, else disk); when one step needs more distinct
       experts than there are slots, they are streamed through the slots in
       waves whose partial outputs are summed, so any S >= 1 works;
     - restricted mode (eMoE): the router only saw resident experts, nothing moves;
  3. `ffn`: routed experts over the slot buffers + shared experts (one jit).
Outputs in exact mode equal the all-resident model's for every S and policy.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emoe_jax.errors import EmoeError
from ..config import MoEConfig
from ..model.decoder import MoETransformer, init_kv_caches
from ..model.jit_cache import canonical
from ..model.resident import left_pad
from ..model.moe import expert_act
from . import stages
from .budget import parse_expert_count, parse_per_layer_counts
from ..sampling import check_sampling
from .compile_count import compile_count
from .engine_config import DECODE_PATHS, MODES, EngineConfig
from .policies import check_policy
from .predictor_driver import PredictorDriver
from .prefetch import Prefetcher
from .host_stack import has_pinned_host
from .ingraph_predictors import PrefillRouting, in_graph_predictor, is_in_graph
from .onejit_decode import OneJitDecoder
from .residency import Residency
from .step_routing import RoutingOverride, StepRouting
from .tiers import DeviceSlotCache, ExpertSource, HostTier



class GenerationError(EmoeError):
    """Bad generation input (empty prompt, too long, ...); the message says what to change."""


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt (stopped at EOS, EOS excluded)
    stats: dict
    logits: np.ndarray | None = None  # [B, steps, V] float32 when requested


@dataclasses.dataclass
class _Timers:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stall_s: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    waves: int = 0


def _split(module):
    """nnx.split with a canonical graph definition: hashed once here, so the stages find their
    jitted closure by identity and layers of equal structure share one compilation."""
    graphdef, state = nnx.split(module)
    return canonical(graphdef), state


def prompt_bucket(n: int, minimum: int = 8) -> int:
    """Prompt length the prefill compiles for: the next power of two, at least `minimum` (batch
    sizes of the one-jit step bucket the same way with minimum 1: 1, 2, 4, 8, ...)."""
    return max(minimum, 1 << (n - 1).bit_length())


def _pad_batch(tokens, pad_len, teacher, size: int, pad_id: int):
    """Append dummy rows up to `size`: all padding (pad_len = T), so the prefill gives them no
    expert; the one-jit step is told they are not live. tokens [B, T], pad_len [B], teacher [B, n]."""
    extra = size - tokens.shape[0]
    if extra <= 0:
        return tokens, pad_len, teacher
    t = tokens.shape[1]
    tokens = np.concatenate([tokens, np.full((extra, t), pad_id, np.int32)])
    pad_len = np.concatenate([pad_len, np.full(extra, t, np.int32)])
    if teacher is not None:
        teacher = np.concatenate([teacher, np.zeros((extra, teacher.shape[1]), np.int32)])
    return tokens, pad_len, teacher


class OffloadedEngine:
    def __init__(self, cfg: MoEConfig, graphdef, params, source: ExpertSource, config: EngineConfig | None = None,
                 *, dtype=jnp.float32, predictor=None, **options):
        """`config` (an `EngineConfig`; keyword `options` replace its fields, e.g. device_experts=0.25)
        says how to offload. `predictor`: a Predictor (emoe_jax.predict) or an in-graph predictor whose
        scores drive prefetching (exact mode only): in-graph inside the one-jit decode step, else a
        background worker on the staged path. `decode_path="auto"` runs decode as one jitted executable
        per step where it applies (see `decode_path_for`), else the staged per-layer loop."""
        self.config = config = EngineConfig.build(config, **options)
        mode, method, decode_path = config.mode, config.method, config.decode_path
        policy, host_policy, link_gbps = config.policy, config.host_policy, config.link_gbps
        prefetch_k, min_score, pad_id = config.prefetch_k, config.min_score, config.pad_id
        device_experts, host_experts, reuse = config.device_experts, config.host_experts, config.reuse
        if predictor is not None and mode != "exact":
            raise ValueError("a predictor drives prefetching, which only exact mode does; restricted mode "
                             "moves nothing during generation (choose its resident set with preload)")
        check_policy(policy, predictor is not None)  # score eviction ranks by the predictor's scores
        self.admission = config.admission
        self.cfg, self.mode, self.method, self.dtype = cfg, mode, method, dtype
        self.policy, self.link_gbps, self.decode_path = policy, link_gbps, decode_path
        self._graphdef, self._params = graphdef, params
        self._prefetch_k, self._min_score = prefetch_k, min_score
        self.pad_id = pad_id if pad_id is not None else (cfg.pad_token_id or 0)
        model: MoETransformer = nnx.merge(graphdef, params)
        self._embed = _split(model.embed_tokens)
        self._layers = [_split(layer) for layer in model.layers]
        self._moe_of_layer = {layer: moe_layer for moe_layer, layer in enumerate(cfg.moe_layers)}
        self._moe_blocks = {layer: _split(model.layers[layer].mlp) for layer in cfg.moe_layers}
        self._norm = _split(model.norm)
        self._proj = _split(model.embed_tokens if cfg.tie_word_embeddings else model.lm_head)
        e, lm = cfg.num_experts, cfg.num_moe_layers
        self.slots = parse_per_layer_counts(device_experts, e, lm, "--device-experts")
        host_count = parse_expert_count(host_experts, e * lm, "--host-experts", per="over all MoE layers")
        self.source = source
        self.device = jax.devices()[0]
        # With every expert in host memory and a pinned_host memory kind, the host tier is one
        # stacked array per layer in pinned memory, which the one-jit step fetches from in-graph;
        # it is filled before the first copy (first generate or preload).
        stack_host = host_count == e * lm and decode_path != "staged" and has_pinned_host(self.device)
        self.residency = Residency(source, num_moe_layers=lm, num_experts=e, slots=self.slots,
                                   hidden=cfg.hidden_size, inter=cfg.moe_intermediate_size, dtype=dtype,
                                   policy=policy, host_capacity=host_count, host_policy=host_policy,
                                   link_gbps=link_gbps, stack_host=stack_host, device=self.device,
                                   expert_bias=cfg.expert_bias)
        self.routing_hooks: list[Callable[[StepRouting], None]] = []
        self.routing_override: RoutingOverride | None = None
        self.record_router_inputs = False
        self.reuse = reuse
        self._timers = _Timers()
        # A host predictor (emoe_jax.predict) drives the prefetch worker on the staged path; one with an
        # in-graph version prefetches inside the one-jit step; an in-graph-only object only there.
        host_predictor = predictor if predictor is not None and not is_in_graph(predictor) else None
        self.driver = None if host_predictor is None else PredictorDriver(
            host_predictor, lm, e, cfg.top_k, prefetch_k, min_score, keep_scores=policy == "score",
            eviction_scores=config.eviction_scores)
        self.prefetcher = None if host_predictor is None else Prefetcher(self.device_cache, lambda: self.host,
                                                                           self.residency.lock)
        self._ingraph_predictor = in_graph_predictor(predictor, cfg)
        self._onejit = None  # OneJitDecoder, built on first use
        self._last_path: tuple[str, str | None] = ("staged", None)

    # The residency's parts, by the names callers and stats use.
    @property
    def device_cache(self) -> DeviceSlotCache:
        return self.residency.device_cache

    @property
    def host(self) -> HostTier:
        return self.residency.host

    @property
    def _lock(self) -> threading.Lock:
        return self.residency.lock

    @property
    def predictor_name(self) -> str | None:
        if self.driver is not None:
            return self.driver.name
        return None if self._ingraph_predictor is None else self._ingraph_predictor.name

    @property
    def num_slots(self) -> int | list[int]:
        """Slots per MoE layer: one number when every layer has the same."""
        return self.slots[0] if len(set(self.slots)) == 1 else list(self.slots)

    # ---- construction -----------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path, dtype=None, **kwargs) -> "OffloadedEngine":
        from ..checkpoint import load_checkpoint
        from ..model.hf_params import build_params, dense_from_converted

        ckpt = load_checkpoint(path)
        dtype = dtype or jnp.dtype(ckpt.manifest.get("dtype", "float32"))
        graphdef, params = build_params(ckpt.config, dense_from_converted(ckpt.dense), dtype)
        engine = cls(ckpt.config, graphdef, params, ckpt.experts, dtype=dtype, **kwargs)
        engine.checkpoint = ckpt
        return engine

    # ---- residency ----------------------------------------------------------
    def preload(self, moe_layer: int, experts: Sequence[int]) -> None:
        """Make `experts` resident in `moe_layer` (restricted mode's resident set, warm starts)."""
        self.residency.preload(moe_layer, experts)

    def _make_resident(self, moe_layer: int, experts: Sequence[int]) -> None:
        """Caller holds the residency lock; waits and copies are charged as stall time."""
        waited, fetching = self.residency.make_resident(moe_layer, experts, prefetcher=self.prefetcher)
        self._timers.stall_s += waited + fetching

    # ---- one forward over new tokens -----------------------------------------
    def _forward(self, tokens: np.ndarray, caches: list, write_index: int, pad_len: np.ndarray,
                 valid: np.ndarray, positions: np.ndarray | None = None, decode_step: int | None = None,
                 done: np.ndarray | None = None, captured: dict | None = None,
                 rows: int | None = None) -> tuple[jax.Array, list]:
        """tokens [B, T]; valid [B, T] bool; positions [B, T] (index in prompt, -1 padding);
        decode_step: index of the decode step (None in prefill); captured: filled with each MoE
        layer's routing (ids, weights) [B, T, k] when given; rows: the real rows, which observers
        see (the rest pad the batch to its bucket). Returns last-position logits [B, V]."""
        if not self.reuse:
            self.residency.evict_all()
        # numpy in, not jnp.asarray/jnp.int32: the jitted call transfers them, eager ones dispatch an op each
        x = stages.embed(self._embed[0], self._embed[1], np.asarray(tokens, np.int32))
        wi, pad = np.int32(write_index), np.asarray(pad_len, np.int32)
        restricted = self.mode == "restricted"
        for layer, (gdef, state) in enumerate(self._layers):
            moe_layer = self._moe_of_layer.get(layer)
            resident = self.device_cache.resident(moe_layer) if (moe_layer is not None and restricted) else None
            residual, normed, caches[layer], routing = stages.attend(
                gdef, state, x, caches[layer], wi, pad, resident, restricted=restricted and moe_layer is not None)
            if moe_layer is None:
                x = stages.ffn(gdef, state, residual, normed, None, None, None, method=self.method)
                continue
            ids = np.asarray(routing.ids)  # [B*T, k]: the one host sync of the layer
            if self.routing_override is not None or self.routing_hooks:
                b, t = tokens.shape
                r = b if rows is None else rows
                step = StepRouting(moe_layer, ids.reshape(b, t, -1)[:r], np.asarray(routing.weights).reshape(b, t, -1)[:r],
                                   valid[:r], normed[:r] if self.record_router_inputs else None,
                                   None if positions is None else positions[:r])
                if self.routing_override is not None:
                    ids, routing, step = self._apply_override(step, routing)
                for hook in self.routing_hooks:
                    hook(step)
            with self._lock:
                x = self._moe_ffn(gdef, state, moe_layer, residual, normed, routing, ids, valid)
                if self.prefetcher is not None:
                    self.prefetcher.end_layer(moe_layer)
            if captured is not None:
                b, t = tokens.shape
                captured[moe_layer] = (ids.reshape(b, t, -1), np.asarray(routing.weights).reshape(b, t, -1))
            elif self.driver is not None and decode_step is not None:
                b, t = tokens.shape
                step_ids = ids.reshape(b, t, -1)
                step_w = np.asarray(routing.weights).reshape(b, t, -1)
                # predict while the device computes this layer; prefetch for later ones
                requests = self.driver.layer(decode_step, moe_layer, step_ids, step_w, normed, done)
                if self.policy == "score" and self.driver.scores:
                    with self._lock:  # the prefetch worker evicts by the same policies
                        for target_layer, scores in self.driver.scores.items():
                            self.device_cache.policies[target_layer].set_scores(dict(enumerate(scores.tolist())))
                self.prefetcher.submit(requests)
        logits = stages.head(self._norm[0], self._norm[1], self._proj[0], self._proj[1], x,
                             tied=self.cfg.tie_word_embeddings)
        return logits, caches

    def _apply_override(self, step: StepRouting, routing):
        """Replace the router's choice by the override's (same shapes: nothing recompiles)."""
        forced = self.routing_override(step)
        if forced is None:
            return step.ids.reshape(-1, step.ids.shape[-1]), routing, step
        ids, weights = (np.asarray(a) for a in forced)
        if ids.shape != step.ids.shape or weights.shape != step.ids.shape:
            raise ValueError(f"routing override returned ids {ids.shape} / weights {weights.shape}; "
                             f"expected {step.ids.shape} (batch, tokens, top_k)")
        ids = ids.astype(np.int32)
        if ids.min() < 0 or ids.max() >= self.cfg.num_experts:
            raise ValueError(f"routing override chose expert ids outside [0, {self.cfg.num_experts})")
        k = ids.shape[-1]
        routing = type(routing)(jnp.asarray(ids.reshape(-1, k)), jnp.asarray(weights.reshape(-1, k), jnp.float32))
        step = dataclasses.replace(step, ids=ids, weights=weights.astype(np.float32))
        return ids.reshape(-1, k), routing, step

    def _moe_ffn(self, gdef, state, moe_layer, residual, normed, routing, ids, valid):
        cache = self.device_cache
        if self.mode == "restricted":
            return stages.ffn(gdef, state, residual, normed, routing, cache.buffers[moe_layer],
                              cache.device_slot_map(moe_layer), method=self.method)
        # Padding tokens need no experts: their pairs fall on non-resident slots and add 0.
        needed = np.unique(ids[valid.reshape(-1)])
        slots = self.slots[moe_layer]
        if needed.size <= slots:
            self._make_resident(moe_layer, needed.tolist())
            return stages.ffn(gdef, state, residual, normed, routing, cache.buffers[moe_layer],
                              cache.device_slot_map(moe_layer), method=self.method)
        # More distinct experts than slots: stream them through in waves, resident ones first.
        resident_first = sorted(needed.tolist(), key=lambda e: cache.slot_of_expert[moe_layer, e] < 0)
        acc = jnp.zeros((normed.shape[0] * normed.shape[1], normed.shape[2]), jnp.float32)
        for start in range(0, len(resident_first), slots):
            wave = resident_first[start:start + slots]
            self._make_resident(moe_layer, wave)
            wave_map = np.full(self.cfg.num_experts, -1, np.int32)
            wave_map[wave] = cache.slot_of_expert[moe_layer, wave]
            acc = stages.routed_partial(normed, routing, cache.buffers[moe_layer], wave_map, acc,
                                        method=self.method, act=expert_act(self.cfg))
            self._timers.waves += 1
        moe_gdef, moe_state = self._moe_blocks[self.cfg.moe_layers[moe_layer]]
        return stages.finish_waves(moe_gdef, moe_state, residual, normed, acc)

    # ---- decode path ------------------------------------------------------------
    def decode_path_for(self) -> tuple[str, str | None]:
        """("onejit", None) when decode runs as one jitted executable per step, else
        ("staged", why): the one place that decides. The staged per-layer loop remains for
        what the one-jit step does not do (prefill always runs staged)."""
        if self.decode_path == "staged":
            return "staged", "decode_path='staged' was asked for"
        why = None
        if not self.residency.stack_host:
            why = ("the host tier holds only part of the experts (the disk tier serves the rest)"
                   if self.host.capacity < self.cfg.num_experts * self.cfg.num_moe_layers
                   else f"the {self.device.platform} backend has no pinned_host memory kind")
        elif self.routing_override is not None:
            why = "a routing override replaces the router's choice on the host"
        elif self.record_router_inputs:
            why = "router inputs are recorded (trace collection with --router-inputs)"
        elif not self.reuse:
            why = "reuse=False (on-demand baseline) evicts everything between steps on the host"
        elif self.link_gbps:
            why = "the emulated host->device link (link_gbps) is a host-side model"
        elif self.policy not in ("lru", "score") and self.mode == "exact":
            why = f"device policy {self.policy!r}: the one-jit step evicts by LRU or by in-graph scores"
        elif self.driver is not None and self._ingraph_predictor is None:
            why = f"predictor {self.driver.name!r} runs on the host (no in-graph version)"
        if why is None:
            return "onejit", None
        if self.decode_path == "onejit":
            raise GenerationError(f"decode_path='onejit' cannot be used here: {why}")
        if self.admission == "cost":
            raise GenerationError(f"admission='cost' is built into the one-jit decode step only, which cannot "
                                  f"be used here: {why}")
        return "staged", why

    def _onejit_ranking(self) -> dict:
        """How the one-jit step picks victims and admits prefetches (`build_decode_step` options)."""
        if self.mode == "exact" and self.policy == "score" and self._ingraph_predictor is not None:
            return {"eviction": "score", "admission": self.admission, "eviction_scores": self.config.eviction_scores}
        return {"eviction": "lru", "admission": "all"}

    # ---- generation ---------------------------------------------------------
    def _validate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        if not prompts:
            raise GenerationError("no prompts given")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise GenerationError(f"prompt {i} is empty; give at least one token (or non-empty text)")
            if any((not 0 <= int(tok) < self.cfg.vocab_size) for tok in p):
                raise GenerationError(f"prompt {i} has token ids outside [0, {self.cfg.vocab_size})")
        if max_new_tokens < 1:
            raise GenerationError("max_new_tokens must be at least 1")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.cfg.max_position_embeddings:
            raise GenerationError(
                f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context of "
                f"{self.cfg.max_position_embeddings} tokens; shorten the prompt or lower --max-new-tokens")

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
                 on_token: Callable[[int, np.ndarray], None] | None = None,
                 return_logits: bool = False, tasks: Sequence[str] | None = None,
                 texts: Sequence[str] | None = None,
                 teacher_tokens: Sequence[Sequence[int]] | None = None,
                 observers: Sequence[Callable[[StepRouting], None]] = (),
                 routing_override: RoutingOverride | None = None,
                 record_router_inputs: bool | None = None) -> GenerationResult:
        """Generate for a batch of token-id prompts. Greedy when temperature == 0.
        `tasks`/`texts` (per prompt) are metadata for task-aware predictors (eMoE).
        `teacher_tokens` (per prompt, >= max_new_tokens - 1 ids): teacher forcing. Decode step s is
        fed teacher_tokens[i][s] instead of the model's own pick, so logits can be compared with
        another model's position by position on the same prefix; `tokens` still holds the picks.
        For this call only: `observers` see every step's routing (like `routing_hooks`; on the
        one-jit path one step behind); `routing_override` replaces the router's choice (it needs the
        staged path); `record_router_inputs` hands observers the router input too (staged path)."""
        self._validate(prompts, max_new_tokens)
        check_sampling(temperature, top_p)  # negative temperature / top_p outside [0, 1]: SamplingError
        if observers or routing_override is not None or record_router_inputs is not None:
            saved = (list(self.routing_hooks), self.routing_override, self.record_router_inputs)
            self.routing_hooks = [*self.routing_hooks, *observers]
            self.routing_override = routing_override if routing_override is not None else self.routing_override
            if record_router_inputs is not None:
                self.record_router_inputs = bool(record_router_inputs)
            try:
                return self.generate(prompts, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                     stop_at_eos=stop_at_eos, on_token=on_token, return_logits=return_logits,
                                     tasks=tasks, texts=texts, teacher_tokens=teacher_tokens)
            finally:
                self.routing_hooks, self.routing_override, self.record_router_inputs = saved
        teacher = None
        if teacher_tokens is not None:
            if len(teacher_tokens) != len(prompts) or any(len(t) < max_new_tokens - 1 for t in teacher_tokens):
                raise GenerationError("teacher_tokens needs one list of at least max_new_tokens - 1 ids per prompt")
            teacher = np.array([list(t)[: max_new_tokens - 1] + [0] for t in teacher_tokens], np.int32)
            stop_at_eos = False
        try:
            return self._generate(prompts, max_new_tokens, temperature, top_p, seed, stop_at_eos, on_token,
                                  return_logits, tasks, texts, teacher)
        finally:
            if self.prefetcher is not None:
                self.prefetcher.drain()
            if self.driver is not None and self.driver.rows:
                self.driver.end()

    def _generate(self, prompts, max_new_tokens, temperature, top_p, seed, stop_at_eos, on_token,
                  return_logits, tasks, texts, teacher) -> GenerationResult:
        compiles0 = compile_count()
        # Stats are per call: a warm cache from earlier calls shows up as hits, not as old misses.
        self._timers = _Timers()
        self.residency.fill_host_stacks()
        self.residency.reset_stats()
        if self.prefetcher is not None:
            self.prefetcher.reset_stats()
        path = self.decode_path_for()
        self._last_path = path
        onejit = path[0] == "onejit"
        host_driver = self.driver is not None and not onejit
        # The prefill's routing per MoE layer, (ids, weights) [B, t, k], when a predictor replays it.
        prefill_routing = {} if host_driver or (onejit and self._ingraph_predictor is not None) else None
        if host_driver:
            self.driver.begin(prompts, tasks, texts)
        ctx = self.cfg.max_position_embeddings
        longest = max(len(p) for p in prompts)
        t = prompt_bucket(longest)
        if t + max_new_tokens > ctx:
            t = longest
        tokens, pad_len = left_pad(prompts, self.pad_id, length=t)
        rows = tokens.shape[0]  # real rows; the rest (one-jit path) pad the batch to its bucket
        if onejit:
            tokens, pad_len, teacher = _pad_batch(tokens, pad_len, teacher, prompt_bucket(rows, minimum=1), self.pad_id)
        b = tokens.shape[0]
        max_len = min(-(-(t + max_new_tokens) // 64) * 64, max(ctx, t + max_new_tokens))
        caches = init_kv_caches(self.cfg, b, max_len, self.dtype)
        valid = np.arange(t)[None, :] >= pad_len[:, None]
        key = jax.random.PRNGKey(seed)

        t0 = time.perf_counter()
        positions = np.where(valid, np.arange(t)[None, :] - pad_len[:, None], -1)  # [B, t]
        logits, caches = self._forward(tokens, caches, 0, pad_len, valid, positions, captured=prefill_routing,
                                       rows=rows)
        kept_logits = [np.asarray(logits)] if return_logits else None
        nxt = self._pick(logits, temperature, top_p, key, 0)
        lm = self.cfg.num_moe_layers
        if host_driver:
            self.driver.replay_prefill(prompts, [prefill_routing[moe_layer][0] for moe_layer in range(lm)],
                                       [prefill_routing[moe_layer][1] for moe_layer in range(lm)], pad_len)
        decoder = None
        if onejit:
            if self._onejit is None:
                self._onejit = OneJitDecoder(self, self._ingraph_predictor)
            decoder = self._onejit
            prefill = None
            if self._ingraph_predictor is not None:
                ids = np.stack([prefill_routing[moe_layer][0] for moe_layer in range(lm)], axis=2)  # [B, t, Lm, k]
                prefill = PrefillRouting(tokens, ids, valid, positions.astype(np.int32))
            decoder.start(caches, prefill, temperature=temperature, top_p=top_p, return_logits=return_logits,
                          first_index=t, pad_len=pad_len, steps=max_new_tokens - 1, key=key, teacher=teacher,
                          live_rows=rows)
            caches = None
        self._timers.prefill_s = time.perf_counter() - t0
        self._timers.prefill_tokens = int(valid.sum())

        eos = set(self.cfg.eos_ids) if stop_at_eos else set()
        out = np.zeros((b, max_new_tokens), np.int32)
        done = np.arange(b) >= rows  # dummy rows are done from the start
        lengths = np.full(b, max_new_tokens)
        ones = np.ones((b, 1), bool)
        t1 = time.perf_counter()
        try:
            self._decode_loop(decoder, nxt, out, done, lengths, eos, teacher, on_token, kept_logits, caches,
                              t, pad_len, ones, key, temperature, top_p, max_new_tokens, rows)
        finally:
            if decoder is not None:
                decoder.finish()
        self._timers.decode_s = time.perf_counter() - t1
        tokens_out = [out[i, : lengths[i]].tolist() for i in range(rows)]
        return GenerationResult(tokens_out, self.stats(compile_count() - compiles0),
                                np.stack(kept_logits, axis=1)[:rows] if return_logits else None)

    def _decode_loop(self, decoder, nxt, out, done, lengths, eos, teacher, on_token, kept_logits, caches, t,
                     pad_len, ones, key, temperature, top_p, max_new_tokens, rows) -> None:
        """Feed each picked token back until EOS or max_new_tokens: one jitted step per token on
        the one-jit path (`decoder`), the staged per-layer forward otherwise."""
        for step in range(max_new_tokens):
            out[:, step] = nxt
            if on_token is not None:
                on_token(step, np.where(done, -1, nxt)[:rows])
            for i in np.flatnonzero(~done & np.isin(nxt, list(eos))):
                done[i], lengths[i] = True, step
            if done.all() or step == max_new_tokens - 1:
                break
            if teacher is not None:
                nxt = teacher[:, step]
            if decoder is not None:
                logits, nxt = decoder.advance(step, nxt)
            else:
                positions = t - pad_len + step  # [B] index of the fed token in its sequence
                if self.driver is not None:
                    self.driver.begin_token(step, nxt, done)
                logits, caches = self._forward(nxt[:, None], caches, t + step, pad_len, ones, positions[:, None],
                                               decode_step=step, done=done)
                nxt = self._pick(logits, temperature, top_p, key, step + 1)
            if kept_logits is not None:
                kept_logits.append(np.asarray(logits))
            self._timers.decode_tokens += int((~done).sum())

    def _pick(self, logits, temperature, top_p, key, step) -> np.ndarray:
        if temperature <= 0:
            return np.asarray(stages.greedy(logits))
        sub = jax.random.fold_in(key, step)
        return np.asarray(stages.sample(logits, sub, np.float32(temperature), np.float32(top_p),
                                        top_p_enabled=top_p < 1.0))

    # ---- reporting ------------------------------------------------------------
    def _decode_layer_temp_bytes(self, batch: int) -> int | None:
        """Scratch memory XLA plans for one MoE layer's decode step (attend + ffn), from
        `lower(...).compile().memory_analysis()` on abstract shapes (nothing is run)."""
        if not self.cfg.moe_layers:
            return None
        layer = self.cfg.moe_layers[0]
        moe_layer = self._moe_of_layer[layer]
        gdef, state = self._layers[layer]
        cfg, sds = self.cfg, jax.ShapeDtypeStruct
        x = sds((batch, 1, cfg.hidden_size), self.dtype)
        cache = jax.tree.map(lambda a: sds(a.shape, a.dtype), init_kv_caches(cfg, batch, 64, self.dtype)[layer])
        scalar, pad = sds((), jnp.int32), sds((batch,), jnp.int32)
        try:
            attend_fn = stages.attend_fn(gdef, False)
            attend = attend_fn.lower(state, x, cache, scalar, pad, None).compile()
            _, _, _, routing = jax.eval_shape(attend_fn, state, x, cache, scalar, pad, None)
            slots = self.device_cache.buffers[moe_layer]
            ffn = stages.ffn_fn(gdef, self.method).lower(state, x, x, routing, slots,
                                                         sds((cfg.num_experts,), jnp.int32)).compile()
            return int(sum(c.memory_analysis().temp_size_in_bytes for c in (attend, ffn)))
        except Exception:  # memory_analysis is optional per backend; never fail a report on it
            return None

    def stats(self, compiles: int | None = None) -> dict:
        tm, cache, host = self._timers, self.device_cache, self.host
        expert_bytes = cache.slot_bytes
        all_bytes = expert_bytes * self.cfg.num_experts * self.cfg.num_moe_layers
        return {
            "prefill_tokens": tm.prefill_tokens,
            "prefill_s": tm.prefill_s,
            "prefill_tokens_per_s": tm.prefill_tokens / tm.prefill_s if tm.prefill_s else 0.0,
            "decode_tokens": tm.decode_tokens,
            "decode_s": tm.decode_s,
            "decode_tokens_per_s": tm.decode_tokens / tm.decode_s if tm.decode_s else 0.0,
            "device_slots_per_layer": self.num_slots,
            "device_slots": list(self.slots),
            "device_expert_bytes": cache.device_bytes,
            "all_expert_bytes": all_bytes,
            "device_hit_rate": cache.stats.hit_rate,
            "device": cache.stats.as_dict(),
            "host_capacity_experts": host.capacity,
            "host_hit_rate": host.stats.hit_rate,
            "host": host.stats.as_dict(),
            "h2d_bytes": cache.stats.bytes_in,
            "disk_to_host_bytes": host.stats.bytes_in,
            "stall_s": tm.stall_s,
            "waves": tm.waves,
            "compiles": compiles,
            "mode": self.mode,
            "policy": self.policy,
            "admission": self.admission,
            "reuse": self.reuse,
            "predictor": self.predictor_name,
            "prefetch": self._prefetch_stats(),
            "decode_path": self._last_path[0],
            "decode_path_reason": self._last_path[1],
        }

    def _prefetch_stats(self) -> dict | None:
        if self._last_path[0] == "onejit":
            if self._ingraph_predictor is None:
                return None
            return {**self._onejit.prefetch_stats.as_dict(), "in_graph": True}
        return None if self.prefetcher is None else {**self.prefetcher.stats.as_dict(), "in_graph": False}

    def memory_report(self, batch: int = 1) -> dict:
        """Device memory: allocator stats on GPU/TPU; on CPU (no allocator stats) the slot
        buffers, the dense parameters and XLA's compiled footprint of one MoE layer's decode stages."""
        dev = self.device_cache.device
        report = {"platform": dev.platform, "slot_buffer_bytes": self.device_cache.device_bytes}
        params_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize
                           for _, s in [self._embed, self._norm, self._proj, *self._layers]
                           for a in jax.tree.leaves(s))
        report["dense_param_bytes"] = params_bytes
        stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
        if stats:
            report["bytes_in_use"] = stats.get("bytes_in_use")
            report["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
        else:
            report["decode_layer_temp_bytes"] = self._decode_layer_temp_bytes(batch)
        return report


__all__ = ["OffloadedEngine", "EngineConfig", "GenerationResult", "GenerationError", "StepRouting", "RoutingOverride",
           "MODES", "DECODE_PATHS"]
