"""All-resident model: every expert on the device, each step one fused jit.

This is the reference the offloaded runtime must match exactly, and the fused
baseline it is timed against. The step is a jitted closure over the graph
definition (built once per structure, found by identity: hashing a GraphDef
static argument on every call cost a third of a decode step); parameters,
experts and the KV cache are explicit arguments so one compilation serves every
call of the same shape (flax gemma sampler style).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import MoEConfig
from .decoder import init_kv_caches
from .jit_cache import canonical, jitted
from .moe import ExpertSlots


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, length: int | None = None):
    """Left-pad token lists: returns tokens [B, T] int32 and pad_len [B] int32."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must have at least one token")
    t = length or max(len(p) for p in prompts)
    tokens = np.full((len(prompts), t), pad_id, np.int32)
    pad_len = np.zeros(len(prompts), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, t - len(p):] = p
        pad_len[i] = t - len(p)
    return tokens, pad_len


def _build_fused_step(graphdef, restricted, method):
    def step(params, experts, slot_maps, tokens, caches, write_index, pad_len):
        model = nnx.merge(graphdef, params)
        return model.forward(tokens, caches, write_index, pad_len, experts, slot_maps,
                             restricted=restricted, method=method)
    return jax.jit(step, donate_argnums=4)


def fused_step_fn(graphdef, restricted: bool = False, method: str = "auto"):
    """The jitted step `(params, experts, slot_maps, tokens, caches, write_index, pad_len) ->
    (logits [B, T, V], caches, routings)` for `graphdef`; `caches` is donated. Fetch it once
    before a decode loop."""
    return jitted(_build_fused_step, graphdef, bool(restricted), method)


def fused_step(graphdef, params, experts, slot_maps, tokens, caches, write_index, pad_len, *,
               restricted=False, method="auto"):
    """One forward over new tokens [B, T] for all layers. Returns logits [B, T, V], caches, routings."""
    return fused_step_fn(graphdef, restricted, method)(params, experts, slot_maps, tokens, caches,
                                                       write_index, pad_len)


@jax.jit
def greedy_next(logits):
    """Greedy next tokens [B, 1] int32 from logits [B, T, V], shaped to feed straight back: one
    dispatch instead of eager slice, argmax, cast and expand."""
    return jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)


class ResidentModel:
    """Holds params and all experts; prefill + greedy/sampled decode with one fused step per token."""

    def __init__(self, cfg: MoEConfig, graphdef, params, experts: Sequence[ExpertSlots], dtype=jnp.float32):
        # Canonical graph definition: hashed once here, then the step is found by identity.
        self.cfg, self.graphdef, self.params, self.dtype = cfg, canonical(graphdef), params, dtype
        self.experts = list(experts)
        self.slot_maps = jnp.tile(jnp.arange(cfg.num_experts, dtype=jnp.int32), (cfg.num_moe_layers, 1))

    @classmethod
    def from_checkpoint(cls, path, dtype=None) -> "ResidentModel":
        """Every expert of a converted checkpoint in memory (dtype: the checkpoint's by default)."""
        from ..checkpoint import load_checkpoint
        from .hf_params import build_params, dense_from_converted

        ckpt = load_checkpoint(path)
        cfg = ckpt.config
        dtype = jnp.dtype(dtype or ckpt.manifest.get("dtype", "float32"))
        graphdef, params = build_params(cfg, dense_from_converted(ckpt.dense), dtype)
        experts = []
        for moe_layer in range(cfg.num_moe_layers):
            layer = ckpt.experts.read_layer(moe_layer)
            experts.append(ExpertSlots(*(jnp.asarray(layer[w], dtype) for w in ("gate", "up", "down"))))
        return cls(cfg, graphdef, params, experts, dtype)

    def logits(self, prompts: Sequence[Sequence[int]], method: str = "auto", length: int | None = None):
        """Logits [B, T, V] of left-padded prompts (no cache) and routings; T = `length` if given
        (callers with many prompt lengths pad to one and compile once), else the longest prompt."""
        tokens, pad_len = left_pad(prompts, length=length)
        caches = init_kv_caches(self.cfg, tokens.shape[0], tokens.shape[1], self.dtype)
        step = fused_step_fn(self.graphdef, method=method)
        logits, _, routings = step(self.params, self.experts, self.slot_maps, tokens, caches, np.int32(0), pad_len)
        return logits, routings, pad_len

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, max_len: int | None = None,
                 length: int | None = None):
        """Greedy decoding. Returns generated ids [B, max_new_tokens] (np.int32). Prompts are
        left-padded to `length` if given, else to the longest."""
        tokens, pad_len = left_pad(prompts, length=length)
        b, t = tokens.shape
        max_len = max_len or t + max_new_tokens
        caches = init_kv_caches(self.cfg, b, max_len, self.dtype)
        fused = fused_step_fn(self.graphdef)  # looked up once, not per token
        pad = jnp.asarray(pad_len)  # device-resident across steps; numpy tokens/scalars ride along with each call
        logits, caches, _ = fused(self.params, self.experts, self.slot_maps, tokens, caches, np.int32(0), pad)
        out = []
        nxt = greedy_next(logits)
        for step in range(max_new_tokens):
            out.append(nxt)
            if step == max_new_tokens - 1:
                break
            logits, caches, _ = fused(self.params, self.experts, self.slot_maps, nxt, caches, np.int32(t + step), pad)
            nxt = greedy_next(logits)
        return np.concatenate([np.asarray(o) for o in out], axis=1)
