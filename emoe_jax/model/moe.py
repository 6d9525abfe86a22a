"""The MoE block: softmax top-k router, routed SwiGLU experts over a slot buffer, shared experts.

gpt-oss's experts (clamped SwiGLU, biases folded into the weights as an extra row) use the same
kernels through `ExpertAct`.

Routed-expert weights are not module parameters. The block takes them as an
argument, `ExpertSlots` (gate/up [S, H, I], down [S, I, H]), plus
`slot_of_expert` [E] int32 mapping each expert to its slot (-1: not resident).
With S = E and the identity map this is the all-resident model; the offloaded
runtime passes its device slot cache instead.

Steps:
  1. router logits [N, E] in float32 -> softmax -> top-k ids and weights
     (renormalised when the family does, scaled by DeepSeek's routed factor);
     in restricted mode (eMoE) non-resident experts are masked out first;
  2. token-expert pairs are mapped to slots and mixed by one of the kernels
     below (all compute the same sum; tests check each against the reference);
  3. shared experts (sigmoid-gated for Qwen2-MoE) are added.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import MoEConfig
from .layers import SwiGLU
from .router import route_sigmoid_or_grouped


class ExpertSlots(NamedTuple):
    """Routed expert weights held in S slots: y = (silu(x @ gate) * (x @ up)) @ down."""

    gate: jax.Array  # [S, H, I]  ([S, H+1, I] with biases, see ExpertAct)
    up: jax.Array  # [S, H, I]
    down: jax.Array  # [S, I, H]  ([S, I+1, H] with biases)


class ExpertAct(NamedTuple):
    """How an expert turns its gate/up projections into the down projection's input.

    Hashable (a static argument of jitted kernels). kind 'swiglu': silu(g) * u; 'clamped_swiglu'
    (gpt-oss): g clamped above at `limit`, u to [-limit, limit], then (u + 1) * g * sigmoid(alpha * g).
    bias: the expert weights carry their bias as one extra input row (homogeneous coordinates):
    gate/up [H+1, I] (row H = bias), down [I+1, H], so a slot still holds three arrays and every
    kernel stays a plain matmul on inputs with a column of ones appended.
    """

    kind: str = "swiglu"
    alpha: float = 1.702
    limit: float = 7.0
    bias: bool = False


SWIGLU = ExpertAct()


def expert_act(cfg: MoEConfig) -> ExpertAct:
    return ExpertAct(cfg.expert_act, cfg.swiglu_alpha, cfg.swiglu_limit, cfg.expert_bias)


def _with_ones(a: jax.Array) -> jax.Array:
    """[..., D] -> [..., D+1] with a last column of ones (multiplies the bias row)."""
    return jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)


def expert_input(x: jax.Array, act: ExpertAct) -> jax.Array:
    """Tokens [N, H] as the gate/up projections take them ([N, H+1] when biased)."""
    return _with_ones(x) if act.bias else x


def glu(g: jax.Array, u: jax.Array, act: ExpertAct) -> jax.Array:
    """Gate/up projections [..., I] -> the down projection's input ([..., I+1] when biased)."""
    if act.kind == "clamped_swiglu":
        g = jnp.minimum(g, act.limit)
        u = jnp.clip(u, -act.limit, act.limit)
        h = (u + 1) * (g * jax.nn.sigmoid(g * act.alpha))
    else:
        h = jax.nn.silu(g) * u
    return _with_ones(h) if act.bias else h


class Routing(NamedTuple):
    ids: jax.Array  # [N, k] int32 expert ids, in descending router probability
    weights: jax.Array  # [N, k] float32 combine weights


def route(logits: jax.Array, cfg: MoEConfig, resident: jax.Array | None = None,
          bias: jax.Array | None = None) -> Routing:
    """Top-k routing from router logits [N, E] (float32).

    resident: optional [E] bool; when given (restricted mode), experts that are
    not resident cannot be chosen, so tokens go to their next-best resident expert.
    bias: DeepSeek-V3's [E] e_score_correction_bias; sigmoid scores and expert groups
    are routed by router.py.
    """
    if cfg.scoring_func != "softmax" or cfg.topk_method != "greedy":
        return Routing(*route_sigmoid_or_grouped(logits, cfg, resident, bias))
    if resident is not None:
        logits = jnp.where(resident[None, :], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, ids = jax.lax.top_k(probs, cfg.top_k)
    if cfg.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights * cfg.routed_scaling_factor
    return Routing(ids.astype(jnp.int32), weights.astype(jnp.float32))


class SlotRouting(NamedTuple):
    """Routing in slot space: the device slot holding each chosen expert (not its expert id)."""

    slots: jax.Array  # [N, k] int32 slot index into ExpertSlots
    weights: jax.Array  # [N, k] float32 combine weights (0 where the expert has no slot)


def _slots_and_weights(routing: Routing, slot_of_expert: jax.Array) -> SlotRouting:
    slots = slot_of_expert[routing.ids]  # [N, k]
    # A pair whose expert is not resident (only possible in restricted mode when
    # fewer than k experts are resident) contributes nothing.
    weights = jnp.where(slots >= 0, routing.weights, 0.0)
    return SlotRouting(jnp.maximum(slots, 0), weights)


def _ffn(x, gate, up, down, act: ExpertAct = SWIGLU):
    return glu(x @ gate, x @ up, act) @ down


def mix_reference(x, routing: Routing, experts: ExpertSlots, slot_of_expert, out_dtype=None,
                  act: ExpertAct = SWIGLU) -> jax.Array:
    """Plain reference: loop over the k choices, one expert FFN per token. x [N, H] -> [N, H]."""
    slots, weights = _slots_and_weights(routing, slot_of_expert)
    out = jnp.zeros((x.shape[0], experts.down.shape[-1]), jnp.float32)
    xa = expert_input(x, act)
    for j in range(slots.shape[1]):
        y = jax.vmap(lambda xi, s: _ffn(xi, experts.gate[s], experts.up[s], experts.down[s], act))(xa, slots[:, j])
        out = out + y.astype(jnp.float32) * weights[:, j : j + 1]
    return out.astype(out_dtype or x.dtype)


def mix_gather(x, routing: Routing, experts: ExpertSlots, slot_of_expert, out_dtype=None,
               act: ExpertAct = SWIGLU) -> jax.Array:
    """Decode path (few tokens): gather each token's k experts and einsum. Memory N*k*H*I."""
    slots, weights = _slots_and_weights(routing, slot_of_expert)
    g, u, d = experts.gate[slots], experts.up[slots], experts.down[slots]  # [N, k, H, I] / [N, k, I, H]
    xa = expert_input(x, act)
    h = glu(jnp.einsum("NH,NKHI->NKI", xa, g), jnp.einsum("NH,NKHI->NKI", xa, u), act)
    y = jnp.einsum("NKI,NKIH->NKH", h, d)
    return jnp.einsum("NKH,NK->NH", y.astype(jnp.float32), weights).astype(out_dtype or x.dtype)


def mix_sorted(x, routing: Routing, experts: ExpertSlots, slot_of_expert, out_dtype=None,
               act: ExpertAct = SWIGLU) -> jax.Array:
    """Prefill path (many tokens): sort token-expert pairs by slot and run grouped
    matmuls with `jax.lax.ragged_dot`, so each slot's weights are read once."""
    slots, weights = _slots_and_weights(routing, slot_of_expert)
    n, k = slots.shape
    num_slots = experts.gate.shape[0]
    flat_slots = slots.reshape(-1)  # [N*k]
    order = jnp.argsort(flat_slots, stable=True)
    token_of_pair = order // k  # [N*k] token index of each sorted pair
    xs = expert_input(x, act)[token_of_pair]  # [N*k, H]
    group_sizes = jnp.bincount(flat_slots, length=num_slots).astype(jnp.int32)  # [S]
    h = glu(jax.lax.ragged_dot(xs, experts.gate, group_sizes), jax.lax.ragged_dot(xs, experts.up, group_sizes),
            act)
    ys = jax.lax.ragged_dot(h, experts.down, group_sizes)  # [N*k, H]
    ys = ys.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((n, experts.down.shape[-1]), jnp.float32).at[token_of_pair].add(ys).astype(out_dtype or x.dtype)


def mix_blocked_slots(x: jax.Array, routing: SlotRouting, experts: ExpertSlots, block: int = 64,
                      out_dtype=None, act: ExpertAct = SWIGLU) -> jax.Array:
    """Expert-grouped fixed-size blocks over slots (the trainer, with every expert resident,
    passes its expert ids as slots: slot e = expert e).

    Why blocks: measured on this project's 2-core CPU for the `embedded` shapes (N=4096 tokens,
    E=32, k=4, H=160, I=96, value+grad): dense-over-all-experts einsum 1.57 s, `mix_sorted`
    (ragged_dot, which XLA:CPU lowers densely) 2.66 s, this kernel 0.145 s at block 64.

    Steps: sort the N*k pairs by slot; pad each slot's run to a multiple of `block` inside a
    buffer of static worst-case size (so shapes never depend on the routing); batched SwiGLU
    matmuls per block [nb, block, H] x [nb, H, I]; scale and scatter-add back to the tokens.
    No pair is dropped, so this is the same sum as the other kernels."""
    n, k = routing.slots.shape
    num_experts = experts.gate.shape[0]  # slots
    flat = routing.slots.reshape(-1)  # [N*k] slot of each pair
    order = jnp.argsort(flat, stable=True)  # [N*k] pairs sorted by expert
    sorted_expert = flat[order]
    counts = jnp.bincount(flat, length=num_experts)  # [E]
    padded = (counts + block - 1) // block * block  # [E] rows reserved per expert
    padded_end = jnp.cumsum(padded)
    padded_start = padded_end - padded
    start = jnp.cumsum(counts) - counts
    dest = padded_start[sorted_expert] + (jnp.arange(n * k) - start[sorted_expert])  # [N*k] row of each pair
    capacity = (n * k + num_experts * (block - 1) + block - 1) // block * block
    num_blocks = capacity // block
    token_of_row = jnp.full((capacity,), n, jnp.int32).at[dest].set((order // k).astype(jnp.int32))  # [C]
    weight_of_row = jnp.zeros((capacity,), jnp.float32).at[dest].set(routing.weights.reshape(-1)[order])
    # Expert of each block; blocks past the last expert's rows are all padding (any expert will do).
    block_expert = jnp.searchsorted(padded_end, jnp.arange(num_blocks) * block, side="right")
    block_expert = jnp.minimum(block_expert, num_experts - 1)  # [nb]
    hidden = experts.down.shape[-1]
    x = expert_input(x, act)
    x_pad = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])  # [N+1, H], row N = dummy
    xb = x_pad[token_of_row].reshape(num_blocks, block, -1)  # [G, R, H]: G blocks of R rows
    gate, up, down = experts.gate[block_expert], experts.up[block_expert], experts.down[block_expert]
    # G: blocks, R: rows of a block (B and T keep their meaning, batch and tokens, elsewhere)
    h = glu(jnp.einsum("GRH,GHI->GRI", xb, gate), jnp.einsum("GRH,GHI->GRI", xb, up), act)
    y = jnp.einsum("GRI,GIH->GRH", h, down).reshape(capacity, -1).astype(jnp.float32)  # [C, H]
    y = y * weight_of_row[:, None]
    out = jnp.zeros((n + 1, hidden), jnp.float32).at[token_of_row].add(y)
    return out[:n].astype(out_dtype or x.dtype)


def mix_blocked(x, routing: Routing, experts: ExpertSlots, slot_of_expert, block: int | None = None, out_dtype=None,
                act: ExpertAct = SWIGLU):
    """Prefill path on CPU, where `ragged_dot` is lowered densely: expert-grouped blocks.

    The block size adapts to the pairs per slot (8..64 rows), so short prompts do
    not pay for 64 rows of padding per slot."""
    slots, weights = _slots_and_weights(routing, slot_of_expert)
    if block is None:
        per_slot = -(-slots.size // experts.gate.shape[0])
        block = min(64, max(8, 1 << (per_slot - 1).bit_length()))
    return mix_blocked_slots(x, SlotRouting(slots, weights), experts, block, out_dtype, act)


GATHER_MAX_TOKENS = 16  # decode-sized steps gather each token's k experts; larger ones group by expert


def mix_experts(x, routing: Routing, experts: ExpertSlots, slot_of_expert, method: str = "auto", out_dtype=None,
                act: ExpertAct = SWIGLU):
    """Combine routed experts for tokens x [N, H] (result in `out_dtype`, default x's dtype: partial
    sums of the offloaded engine's waves stay float32 so they round once, like a single pass).

    'auto' gathers for few tokens (decode); for many (prefill) it uses
    `ragged_dot` on GPU/TPU and the blocked kernel on CPU, where XLA lowers
    `ragged_dot` densely (measured 18x slower for the embedded model's shapes)."""
    if method == "auto":
        # By token count alone (not by slot count), so one step picks the same kernel, and rounds
        # the same way, whatever the cache size.
        if x.shape[0] <= GATHER_MAX_TOKENS:
            method = "gather"
        else:
            method = "blocked" if jax.default_backend() == "cpu" else "sorted"
    fn = {"reference": mix_reference, "gather": mix_gather, "sorted": mix_sorted, "blocked": mix_blocked}.get(method)
    if fn is None:
        raise ValueError(f"unknown expert mixing method {method!r}; use auto, reference, gather, sorted or blocked")
    return fn(x, routing, experts, slot_of_expert, out_dtype=out_dtype, act=act)


class MoEBlock(nnx.Module):
    """Router + shared experts (parameters); routed experts come in as `ExpertSlots`."""

    def __init__(self, cfg: MoEConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.gate = nnx.Linear(cfg.hidden_size, cfg.num_experts, use_bias=cfg.router_bias, param_dtype=dtype,
                               rngs=rngs)
        if cfg.score_correction_bias:  # DeepSeek-V3 / GLM-4.5; float32 as in transformers (it only ranks experts)
            self.e_score_correction_bias = nnx.Param(jnp.zeros((cfg.num_experts,), jnp.float32))
        if cfg.shared_expert_intermediate_size:
            self.shared = SwiGLU(cfg.hidden_size, cfg.shared_expert_intermediate_size, dtype=dtype, rngs=rngs)
            if cfg.shared_expert_gated:
                self.shared_gate = nnx.Linear(cfg.hidden_size, 1, use_bias=False, param_dtype=dtype, rngs=rngs)

    def router_logits(self, x: jax.Array) -> jax.Array:
        """x [N, H] -> [N, E] float32 logits."""
        w = self.gate.kernel[...]
        logits = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))
        if self.cfg.router_bias:  # gpt-oss
            logits = logits + self.gate.bias[...].astype(jnp.float32)
        return logits

    def route(self, x: jax.Array, resident: jax.Array | None = None) -> Routing:
        bias = self.e_score_correction_bias[...] if self.cfg.score_correction_bias else None
        return route(self.router_logits(x), self.cfg, resident, bias)

    def add_shared(self, x, routed):
        """routed [N, H] + the shared experts of x [N, H] (sigmoid-gated for Qwen2-MoE); the one place
        the staged, one-jit, fused and training paths add them."""
        if not self.cfg.shared_expert_intermediate_size:
            return routed
        shared = self.shared(x)
        if self.cfg.shared_expert_gated:
            shared = jax.nn.sigmoid(self.shared_gate(x)) * shared
        return routed + shared

    def combine(self, x, routing: Routing, experts: ExpertSlots, slot_of_expert, method="auto"):
        """Routed experts plus shared experts for x [N, H] with a routing already decided."""
        return self.add_shared(x, mix_experts(x, routing, experts, slot_of_expert, method, act=expert_act(self.cfg)))

    def __call__(self, x, experts: ExpertSlots, slot_of_expert, *, restricted=False, method="auto"):
        resident = (slot_of_expert >= 0) if restricted else None
        routing = self.route(x, resident)
        return self.combine(x, routing, experts, slot_of_expert, method), routing
