"""Routing analysis of a converted checkpoint on one corpus split.

Steps of `analyze_checkpoint`:
  1. load the checkpoint (dense params upcast to float32, all experts from the
     expert store) and encode the split with the checkpoint's tokenizer;
  2. run every non-overlapping window (`sequential_batches`) through the
     training forward, summing next-token NLL per task and counting, per MoE
     layer, the top-k assignments of each (task, expert) pair;
  3. per task: loss and perplexity;
  4. per layer, from the (task, expert) counts: the mutual information
     I(task; expert) in bits, its ratio to H(task), and per task the share of
     experts that carry 80% of that task's routed load.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from emoe_jax.checkpoint import load_checkpoint
from emoe_jax.data import encode_corpus, sequential_batches
from emoe_jax.model.hf_params import build_params, dense_from_converted
from emoe_jax.model.moe import ExpertSlots
from emoe_jax.train.forward import train_forward
from emoe_jax.train.losses import token_nll


def mutual_information(counts: np.ndarray) -> tuple[float, float]:
    """counts [K tasks, E experts] of top-k assignments -> (I(task; expert) bits, H(task) bits)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("mutual_information needs at least one assignment")
    joint = counts / total
    p_task = joint.sum(axis=1, keepdims=True)  # [K, 1]
    p_expert = joint.sum(axis=0, keepdims=True)  # [1, E]
    nz = joint > 0
    mi = float(np.sum(joint[nz] * np.log2(joint[nz] / (p_task @ p_expert)[nz])))
    pt = p_task[p_task > 0]
    h_task = float(-np.sum(pt * np.log2(pt)))
    return max(mi, 0.0), h_task


def experts_for_share(load: np.ndarray, share: float = 0.8) -> int:
    """Fewest experts whose summed load reaches `share` of load [E] (the busiest first)."""
    load = np.sort(np.asarray(load, dtype=np.float64))[::-1]
    if load.sum() <= 0:
        return 0
    cumulative = np.cumsum(load) / load.sum()
    return int(np.searchsorted(cumulative, share - 1e-12) + 1)


def routing_tables(counts: np.ndarray, tasks: tuple[str, ...], share: float = 0.8) -> list[dict[str, Any]]:
    """counts [Lm, K, E] -> per layer {mi_bits, h_task_bits, mi_over_h, share_for_80 {task: frac}}."""
    layers = []
    num_experts = counts.shape[-1]
    for layer_counts in counts:
        mi, h = mutual_information(layer_counts)
        layers.append({
            "mi_bits": mi, "h_task_bits": h, "mi_over_h": mi / h if h > 0 else 0.0,
            f"experts_for_{int(share * 100)}pct": {
                t: experts_for_share(layer_counts[k], share) / num_experts
                for k, t in enumerate(tasks) if layer_counts[k].sum() > 0},
        })
    return layers


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _nll_and_routing(params, experts, tokens, *, graphdef):
    logits, stats = train_forward(graphdef, params, experts, tokens[:, :-1])
    b = tokens.shape[0]
    ids = stats.ids.reshape(stats.ids.shape[0], b, -1, stats.ids.shape[-1])  # [Lm, B, T, k]
    return jnp.sum(token_nll(logits, tokens[:, 1:]), axis=-1), ids


def load_for_analysis(path: str | Path):
    """(config, graphdef, params float32, experts float32) of a converted checkpoint."""
    ckpt = load_checkpoint(path)
    cfg = ckpt.config
    graphdef, params = build_params(cfg, dense_from_converted(ckpt.dense), jnp.float32)
    experts = []
    for moe_layer in range(cfg.num_moe_layers):
        layer = ckpt.experts.read_layer(moe_layer)
        experts.append(ExpertSlots(*(jnp.asarray(np.asarray(layer[w], np.float32)) for w in ("gate", "up", "down"))))
    return cfg, graphdef, params, experts


def analyze_checkpoint(path: str | Path, corpus: str | Path, split: str = "validation", *, seq_len: int = 256,
                       batch: int = 16, max_windows_per_task: int | None = None,
                       progress: bool = True) -> dict[str, Any]:
    cfg, graphdef, params, experts = load_for_analysis(path)
    if seq_len + 1 > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's context {cfg.max_position_embeddings}")
    streams = encode_corpus(corpus, Path(path), split, progress=progress)
    if max_windows_per_task:
        from emoe_jax.train.evaluate import first_windows

        streams = first_windows(streams, max_windows_per_task, seq_len + 1)
    tasks = streams.tasks
    nll = np.zeros(len(tasks))
    predicted = np.zeros(len(tasks))
    counts = np.zeros((cfg.num_moe_layers, len(tasks), cfg.num_experts), np.int64)  # [Lm, K, E]
    for b in tqdm(sequential_batches(streams, batch, seq_len + 1), desc=f"analyze {split}", disable=not progress):
        rows, ids = _nll_and_routing(params, experts, jnp.asarray(b.tokens), graphdef=graphdef)
        rows, ids = np.asarray(rows), np.asarray(ids)  # [B], [Lm, B, T, k]
        for r in np.flatnonzero(b.valid):
            k = b.task_ids[r]
            nll[k] += rows[r]
            predicted[k] += seq_len
            for moe_layer in range(cfg.num_moe_layers):
                counts[moe_layer, k] += np.bincount(ids[moe_layer, r].reshape(-1), minlength=cfg.num_experts)
    perplexity = {t: {"loss": nll[k] / predicted[k], "ppl": math.exp(nll[k] / predicted[k]),
                      "tokens": int(predicted[k])} for k, t in enumerate(tasks) if predicted[k]}
    if predicted.sum():
        perplexity["all"] = {"loss": nll.sum() / predicted.sum(), "ppl": math.exp(nll.sum() / predicted.sum()),
                             "tokens": int(predicted.sum())}
    return {"checkpoint": str(path), "split": split, "seq_len": seq_len, "tasks": list(tasks),
            "perplexity": perplexity, "layers": routing_tables(counts, tasks), "counts": counts.tolist()}


def markdown_tables(result: dict[str, Any]) -> str:
    """The perplexity and routing-specialisation tables of an analysis, as Markdown (for the model card)."""
    tasks = result["tasks"]
    lines = ["| task | loss (nats/token) | perplexity | tokens |", "|---|---:|---:|---:|"]
    for t, v in result["perplexity"].items():
        lines.append(f"| {t} | {v['loss']:.3f} | {v['ppl']:.2f} | {v['tokens']} |")
    lines += ["", "| MoE layer | I(task; expert) bits | I / H(task) | "
              + " | ".join(f"{t} 80%" for t in tasks) + " |",
              "|---:|---:|---:|" + "---:|" * len(tasks)]
    for i, layer in enumerate(result["layers"]):
        shares = layer["experts_for_80pct"]
        lines.append(f"| {i} | {layer['mi_bits']:.3f} | {layer['mi_over_h']:.3f} | "
                     + " | ".join(f"{shares.get(t, float('nan')):.2f}" for t in tasks) + " |")
    return "\n".join(lines)
