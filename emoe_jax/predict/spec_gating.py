"""Speculative next-layer gating (mixtral-offloading, AdapMoE).

The residual stream changes little from one layer to the next, so the routers
of layers l+1..l+h, applied to layer l's router input, guess which experts
those layers will pick for the current token, one or more layers before they
run. That is enough time to move the guessed experts.

Steps:
1. Router matrices ``W[l]`` [E, H] per recorded MoE layer, from a converted
   checkpoint (``load_checkpoint(path).dense``: HF name
   ``layers.{i}.mlp.gate.weight``, ``layers.{i}.block_sparse_moe.gate.weight``
   for Mixtral, ``layers.{i}.mlp.router.weight`` and its bias ``b[l]`` for
   gpt-oss; i = ``config.moe_layers[l]``) or given explicitly.
2. Token t, layer l: ``observe_router_input`` stores the router input h[t, l].
3. ``predict(t, l)`` scores each target (t, l') of the lookahead with
   ``softmax(W[l'] @ source + b[l'])``, where the source is the latest router input
   that exists *before* layer l' routes:
   - l' > l: h[t, l] (the router input just observed);
   - l' = l: h[t, l-1] (what a prefetcher issued one layer earlier could see);
     layer l's own input is never applied to layer l's own router, since that
     is not a prediction but the routing itself (MoE-Beyond's flaw);
   - l' = 0 of token t, or any target in token t+1: no source in this token,
     no prediction (the next token's hidden state does not exist yet).
4. ``predict_prompt`` computes the same rows for a whole prompt with one
   matrix product per target layer (tested against the step path).

Traces must store router inputs (``PromptTrace.hidden`` [T, L, H]); the MoE-Beyond
import does not, so spec gating runs on traces collected by our engine with
``--router-inputs``.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np

from emoe_jax.errors import EmoeError
from emoe_jax.predict.base import BasePredictor, Prediction, PromptInfo, PromptPredictions, horizon_rows


class SpecGatingError(EmoeError):
    """Speculative gating cannot run: no router weights, or traces without router inputs."""


class RouterWeights(NamedTuple):
    kernels: np.ndarray  # [L, E, H] float32 router matrices, one per MoE layer
    biases: np.ndarray | None  # [L, E] float32 router biases (gpt-oss), None for bias-free routers
    layer_ids: tuple[int, ...]  # decoder-layer index of each MoE layer


def load_routers(path: str | os.PathLike) -> RouterWeights:
    """The routers of a converted checkpoint: HF ``layers.{i}.mlp.gate`` (``block_sparse_moe.gate`` for
    Mixtral, ``mlp.router`` with a bias for gpt-oss)."""
    from emoe_jax.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    cfg = ckpt.config
    block = "block_sparse_moe" if cfg.family == "mixtral" else "mlp"
    router = "router" if cfg.family == "gpt_oss" else "gate"
    layers_ids = tuple(int(i) for i in cfg.moe_layers)
    groups = ckpt.load_dense_groups([f"layers_{i}" for i in layers_ids])
    kernels, biases = [], []
    for i in layers_ids:
        try:
            params = groups["layers"][str(i)][block][router]
            kernels.append(np.asarray(params["weight"], dtype=np.float32))  # [E, H]
            if cfg.router_bias:
                biases.append(np.asarray(params["bias"], dtype=np.float32))  # [E]
        except KeyError as exc:
            raise SpecGatingError(
                f"checkpoint {path} has no router 'layers.{i}.{block}.{router}' (missing {exc}); "
                "is it a converted MoE checkpoint (python -m emoe_jax.convert)?"
            ) from None
    return RouterWeights(np.stack(kernels), np.stack(biases) if biases else None, layers_ids)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


class SpeculativeGating(BasePredictor):
    """Apply later layers' routers to the current router input (see the module docstring)."""

    name = "spec-gating"
    reads_current_router_input = True  # targets after layer l are scored from h[t, l]

    def __init__(
        self,
        lookahead: int = 1,
        model_checkpoint: str | os.PathLike | None = None,
        routers: np.ndarray | None = None,
        moe_layer_ids: tuple[int, ...] | None = None,
        eviction: str = "lru",
        router_biases: np.ndarray | None = None,
    ) -> None:
        super().__init__(lookahead=lookahead)
        if (model_checkpoint is None) == (routers is None):
            raise SpecGatingError(
                "spec-gating needs the model's router weights: pass model_checkpoint=PATH "
                "(a converted checkpoint, CLI --model-checkpoint) or routers=[L, E, H] array (exactly one of them)"
            )
        if model_checkpoint is not None:
            routers, router_biases, moe_layer_ids = load_routers(model_checkpoint)
        routers = np.asarray(routers, dtype=np.float32)
        if routers.ndim != 3:
            raise SpecGatingError(f"routers must be [L, E, H], got shape {routers.shape}")
        if router_biases is not None:
            router_biases = np.asarray(router_biases, dtype=np.float32)
            if router_biases.shape != routers.shape[:2]:
                raise SpecGatingError(f"router biases must be [L, E] = {routers.shape[:2]}, got {router_biases.shape}")
        self.routers = routers  # [L, E, H] float32
        self.biases = router_biases  # [L, E] float32 or None (added to the logits, as gpt-oss's router does)
        self.moe_layer_ids = None if moe_layer_ids is None else tuple(int(i) for i in moe_layer_ids)
        self.eviction = eviction
        self.current: np.ndarray | None = None  # [L, H] float32 router inputs of the current token
        self.seen: np.ndarray | None = None  # [L] bool: which of them were observed

    # -- checks ----------------------------------------------------------------
    def _check_shape(self, num_layers: int, num_experts: int) -> None:
        L, E, _ = self.routers.shape
        if (num_layers, num_experts) != (L, E):
            raise SpecGatingError(
                f"spec-gating routers are for {L} layers x {E} experts, the traces have "
                f"{num_layers} x {num_experts}: use the checkpoint the traces were recorded with"
            )

    def _check_meta(self, meta: Any) -> None:
        self._check_shape(int(meta.num_layers), int(meta.num_experts))
        hidden_size = getattr(meta, "hidden_size", None)
        if hidden_size is None:
            raise SpecGatingError(
                "spec-gating needs router inputs, and these traces have none (meta.hidden_size is null); "
                "collect traces with router inputs (python -m emoe_jax.traces collect --router-inputs)"
            )
        if int(hidden_size) != self.routers.shape[2]:
            raise SpecGatingError(
                f"trace router inputs have {hidden_size} features, the routers take {self.routers.shape[2]}"
            )
        ids = tuple(getattr(meta, "moe_layer_ids", ()) or ())
        if self.moe_layer_ids is not None and ids and ids != self.moe_layer_ids:
            raise SpecGatingError(
                f"trace MoE layers {list(ids)} differ from the checkpoint's {list(self.moe_layer_ids)}"
            )

    def fit(self, train: Any) -> None:
        # Nothing to learn; fail early on traces that cannot work.
        self._check_meta(train.meta)

    # -- step path -------------------------------------------------------------
    def begin_prompt(self, info: PromptInfo) -> None:
        super().begin_prompt(info)
        self._check_shape(info.num_layers, info.num_experts)
        self.current = np.zeros((info.num_layers, self.routers.shape[2]), np.float32)
        self.seen = np.zeros(info.num_layers, bool)

    def begin_token(self, t: int, token_id: int) -> None:
        self.seen[:] = False

    def observe_router_input(self, t: int, l: int, hidden: np.ndarray) -> None:
        self.current[l] = np.asarray(hidden, dtype=np.float32)
        self.seen[l] = True

    def _source_layer(self, l: int, offset: int, target_layer: int) -> int | None:
        """Layer of token t whose router input predicts target (offset, target_layer); None: no source."""
        if offset > 0:
            return None
        if target_layer > l:
            return l
        return l - 1 if l >= 1 else None  # target_layer == l

    def predict(self, t: int, l: int) -> Prediction | None:
        num_layers = self.routers.shape[0]
        if not self.seen[l]:
            raise SpecGatingError(
                "spec-gating needs router inputs, and this trace has none; collect traces with "
                "router inputs (python -m emoe_jax.traces collect --router-inputs)"
            )
        targets, sources = [], []
        for offset, layer in self.target_list(t, l, num_layers):
            src = self._source_layer(l, int(offset), int(layer))
            if src is not None:
                targets.append((offset, layer))
                sources.append(src)
        if not targets:
            return None
        layers = [int(layer) for _, layer in targets]
        logits = np.stack([self._logits(lt, self.current[s]) for lt, s in zip(layers, sources)])  # [h', E]
        return Prediction(np.asarray(targets), _softmax(logits))

    def _logits(self, layer: int, x: np.ndarray) -> np.ndarray:
        """Layer ``layer``'s router logits of router inputs x [..., H] -> [..., E]."""
        logits = x @ self.routers[layer].T
        return logits if self.biases is None else logits + self.biases[layer]

    # -- fast path -------------------------------------------------------------
    def predict_prompt(self, trace: Any, meta: Any) -> PromptPredictions:
        self._check_meta(meta)
        if trace.hidden is None:
            raise SpecGatingError(
                f"prompt {trace.prompt_id} has no router inputs; spec-gating needs traces collected "
                "with router inputs"
            )
        num_layers, num_experts = int(meta.num_layers), int(meta.num_experts)
        hidden = np.asarray(trace.hidden, dtype=np.float32)  # [T, L, H]
        num_steps = hidden.shape[0] * num_layers
        issue, target = horizon_rows(num_steps, self.lookahead)
        token, layer = issue // num_layers, issue % num_layers
        t_layer = target % num_layers
        same_token = target // num_layers == token
        # Source layer of each row (see _source_layer): l for a later layer, l-1 for layer l itself.
        src = np.where(t_layer > layer, layer, layer - 1)  # [R]
        keep = same_token & (src >= 0)
        issue, target, token, src, t_layer = issue[keep], target[keep], token[keep], src[keep], t_layer[keep]
        scores = np.zeros((issue.shape[0], num_experts), np.float32)
        for lt in np.unique(t_layer):
            rows = np.nonzero(t_layer == lt)[0]
            logits = self._logits(lt, hidden[token[rows], src[rows]])  # [r, E]
            scores[rows] = _softmax(logits)
        return PromptPredictions(issue, target, scores)
