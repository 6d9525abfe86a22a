"""Map Hugging Face tensor names onto the NNX model's parameters.

Every parameter path of the model is translated into the HF tensor name of its
family (e.g. ('layers', 3, 'mlp', 'gate', 'kernel') -> 'model.layers.3.block_sparse_moe.gate.weight'
for Mixtral); Linear kernels are stored transposed in HF ([out, in]). A tensor
that the model needs but the checkpoint lacks, or a shape mismatch, is an error
naming the tensor.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from emoe_jax.errors import EmoeError
from ..config import MoEConfig
from .decoder import abstract_model
from .moe import ExpertSlots


class WeightError(EmoeError):
    """A checkpoint tensor is missing or has the wrong shape."""


def _hf_name(cfg: MoEConfig, path: tuple) -> tuple[str, bool]:
    """HF tensor name for a model parameter path, and whether it is a transposed kernel."""
    parts = [str(p) for p in path]
    leaf = parts[-1]
    transpose = leaf == "kernel"
    if leaf in ("kernel", "embedding"):
        parts[-1] = "weight"
    if parts[0] == "lm_head":
        return ".".join(parts), transpose
    renamed = []
    for i, p in enumerate(parts):
        if p == "mlp" and cfg.family == "mixtral":
            p = "block_sparse_moe"
        elif p == "gate" and cfg.family == "gpt_oss" and i > 0 and parts[i - 1] == "mlp":
            p = "router"
        elif p == "shared":
            p = "shared_experts" if cfg.family in ("deepseek_v2", "deepseek_v3", "glm4_moe") else "shared_expert"
        elif p == "e_score_correction_bias":  # a router buffer in transformers: mlp.gate.e_score_correction_bias
            renamed.append("gate")
        elif p == "shared_gate":
            p = "shared_expert_gate"
        renamed.append(p)
    return "model." + ".".join(renamed), transpose


def flatten_nested(nested: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dict (HF name split on '.') -> flat {name: array}."""
    flat: dict[str, np.ndarray] = {}
    for key, value in nested.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_nested(value, name))
        else:
            flat[name] = value
    return flat


def dense_from_converted(nested: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The converter stores HF names without the leading 'model.'; restore it."""
    flat = flatten_nested(nested)
    return {(k if k.startswith("lm_head") else "model." + k): v for k, v in flat.items()}


def build_params(cfg: MoEConfig, hf: Mapping[str, np.ndarray], dtype=jnp.float32):
    """Return (graphdef, params State) of the model with weights from HF-named tensors."""
    model = abstract_model(cfg, dtype)
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    missing: list[str] = []

    def fill(node, path):
        if isinstance(node, dict):
            return {k: fill(v, path + (k,)) for k, v in node.items()}
        name, transpose = _hf_name(cfg, path)
        if name not in hf:
            missing.append(name)
            return node
        arr = np.asarray(hf[name])
        if transpose:
            arr = arr.T
        if tuple(arr.shape) != tuple(node.shape):
            raise WeightError(f"tensor {name} has shape {arr.shape}, model expects {tuple(node.shape)}")
        return jnp.asarray(arr, dtype=node.dtype)

    filled = fill(pure, ())
    if missing:
        raise WeightError(f"checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}")
    nnx.replace_by_pure_dict(state, filled)
    return graphdef, state


def experts_from_hf(cfg: MoEConfig, hf: Mapping[str, np.ndarray], dtype=jnp.float32) -> list[ExpertSlots]:
    """All routed experts, per MoE layer, from a per-expert-layout HF state dict (gpt-oss: its fused
    layout, unquantized) (tests, small models)."""
    if cfg.family == "gpt_oss":  # fused, interleaved, biased layout
        from ..checkpoint.gpt_oss_experts import read_expert

        out = []
        for layer in cfg.moe_layers:
            prefix = f"model.layers.{layer}.mlp.experts."
            names = {role: f"{prefix}{role.replace('_bias', '')}_proj{'_bias' if role.endswith('_bias') else ''}"
                     for role in ("gate_up", "down", "gate_up_bias", "down_bias")}
            per = [read_expert(lambda n, e=e: np.asarray(hf[n])[e], names) for e in range(cfg.num_experts)]
            stacks = (np.stack([p[w] for p in per]) for w in ("gate", "up", "down"))
            out.append(ExpertSlots(*(jnp.asarray(s, dtype) for s in stacks)))
        return out
    block = "block_sparse_moe" if cfg.family == "mixtral" else "mlp"
    names = ("w1", "w3", "w2") if cfg.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    out = []
    for layer in cfg.moe_layers:
        stacks = []
        for name in names:
            key = lambda e: f"model.layers.{layer}.{block}.experts.{e}.{name}.weight"  # noqa: E731
            stacks.append(np.stack([np.asarray(hf[key(e)]).T for e in range(cfg.num_experts)]))
        out.append(ExpertSlots(*(jnp.asarray(s, dtype) for s in stacks)))
    return out


def params_to_hf(cfg: MoEConfig, state) -> dict[str, np.ndarray]:
    """Inverse of `build_params`: the model's parameters as HF-named tensors (HF orientation).

    Used to export a model trained here in the converted checkpoint format.
    """
    pure = nnx.to_pure_dict(state)
    out: dict[str, np.ndarray] = {}

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + (k,))
            return
        name, transpose = _hf_name(cfg, path)
        arr = np.asarray(node)
        out[name] = arr.T if transpose else arr

    walk(pure, ())
    return out


def nest_for_checkpoint(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Flat HF names -> the converter's nested dense layout (leading 'model.' dropped)."""
    nested: dict[str, Any] = {}
    for name, arr in flat.items():
        parts = name.split(".")
        if parts[0] == "model":
            parts = parts[1:]
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = arr
    return nested
