"""Resumable training checkpoints (Orbax v1), written atomically.

A checkpoint is RUN_DIR/checkpoints/step_{step:08d}, one Orbax pytree:
  params     nested dict of the dense model's float32 parameters (keys as strings)
  experts    {'gate': [Lm, E, H, I], 'up': [Lm, E, H, I], 'down': [Lm, E, I, H]} float32
  opt_state  {'00000': leaf, ...}: the optimizer state's leaves in tree order
  meta       step, batches drawn from the data iterator, tokens seen, elapsed seconds
Orbax writes into a temporary directory and renames it when complete, so a
`step_*` directory is always a finished checkpoint. `run.json` beside them holds
the run's configuration (preset, optimiser, data) and is checked on resume.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emoe_jax import atomic_io
from emoe_jax.atomic_io import replace_dir
from emoe_jax.errors import EmoeError
from emoe_jax.model.moe import ExpertSlots

CKPT_DIR = "checkpoints"
_PREFIX = "step_"


class TrainCheckpointError(EmoeError):
    """A training run directory that cannot be resumed; the message says why and what to do."""


def _ocp():
    logging.getLogger("absl").setLevel(logging.ERROR)
    from orbax.checkpoint import v1 as ocp

    return ocp


def _stringify(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _stringify(v) for k, v in tree.items()}
    return np.asarray(tree)


def _fill(template: Any, saved: Any, path: str = "") -> Any:
    """Template pure dict (original key types) with values taken from the string-keyed saved tree."""
    if isinstance(template, dict):
        return {k: _fill(v, saved[str(k)], f"{path}/{k}") for k, v in template.items()}
    arr = np.asarray(saved)
    if arr.shape != tuple(template.shape):
        raise TrainCheckpointError(f"checkpoint parameter {path} has shape {arr.shape}, model expects "
                                   f"{tuple(template.shape)}; the run directory belongs to another model")
    return jnp.asarray(arr, dtype=template.dtype)


def stack_experts(experts: list[ExpertSlots]) -> dict[str, jax.Array]:
    """Per-layer ExpertSlots -> {'gate': [Lm, E, H, I], 'up': ..., 'down': [Lm, E, I, H]}."""
    return {w: jnp.stack([getattr(e, w) for e in experts]) for w in ("gate", "up", "down")}


def unstack_experts(stacked: dict[str, Any]) -> list[ExpertSlots]:
    n = stacked["gate"].shape[0]
    return [ExpertSlots(*(jnp.asarray(stacked[w][i], jnp.float32) for w in ("gate", "up", "down")))
            for i in range(n)]


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def save(run_dir: Path, trainable: dict[str, Any], opt_state: Any, meta: dict[str, Any], keep: int = 2) -> Path:
    """Write step_{meta['step']} atomically and keep the newest `keep` checkpoints."""
    root = (Path(run_dir) / CKPT_DIR).resolve()  # Orbax requires absolute paths
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{_PREFIX}{int(meta['step']):08d}"
    tree = {
        "params": _stringify(nnx.to_pure_dict(trainable["params"])),
        "experts": {k: np.asarray(v) for k, v in stack_experts(trainable["experts"]).items()},
        "opt_state": {f"{i:05d}": np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(opt_state))},
        "meta": {k: np.asarray(v) for k, v in meta.items()},
    }
    # Orbax renames into place only when complete; we stage under a dot-name too, so a
    # crash never leaves a half-written step_* that a resume would pick up.
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    try:
        _ocp().save(staging / "ckpt", tree)
        replace_dir(staging / "ckpt", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def restore(path: Path, params_template, experts_template: list[ExpertSlots], opt_state_template: Any):
    """Load a checkpoint into the given templates. Returns (trainable, opt_state, meta dict)."""
    try:
        saved = _ocp().load(Path(path).resolve())
    except Exception as error:  # orbax raises many types for unreadable directories
        raise TrainCheckpointError(f"cannot read training checkpoint {path}: {error}; delete it to fall "
                                   "back to the previous one") from error
    for key in ("params", "experts", "opt_state", "meta"):
        if key not in saved:
            raise TrainCheckpointError(f"training checkpoint {path} lacks {key!r}; it was not written by "
                                       "emoe_jax.train")
    pure = _fill(nnx.to_pure_dict(params_template), saved["params"])
    params = jax.tree.map(lambda x: x, params_template)
    nnx.replace_by_pure_dict(params, pure)
    experts = unstack_experts(saved["experts"])
    if len(experts) != len(experts_template) or experts[0].gate.shape != experts_template[0].gate.shape:
        raise TrainCheckpointError(f"experts in {path} do not match the model's shapes")
    leaves, treedef = jax.tree.flatten(opt_state_template)
    if len(saved["opt_state"]) != len(leaves):
        raise TrainCheckpointError(f"optimizer state in {path} has {len(saved['opt_state'])} leaves, "
                                   f"expected {len(leaves)}; was the run started with other options?")
    new_leaves = [jnp.asarray(np.asarray(saved["opt_state"][f"{i:05d}"]), dtype=leaf.dtype)
                  for i, leaf in enumerate(leaves)]
    opt_state = jax.tree.unflatten(treedef, new_leaves)
    meta = {k: np.asarray(v).item() for k, v in saved["meta"].items()}
    return {"params": params, "experts": experts}, opt_state, meta


def write_json_atomic(path: Path, data: Any) -> None:
    """The trainer's JSON files (sorted keys, indent 2), written atomically."""
    atomic_io.write_json_atomic(path, data, indent=2, sort_keys=True)
