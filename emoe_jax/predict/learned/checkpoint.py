"""Save and load learned-predictor checkpoints (Orbax v1), atomically.

Layout of a checkpoint directory:
  config.json   {"config": LearnedConfig fields, "info": training record}
  params/       Orbax pytree of the model's nnx.Param values, stored as float16
                (half the size; restored as float32 — the reported figures are
                measured with the restored float16-rounded weights)
  table_prior.npz  only with config table_prior=true: the fitted causal-table
                arrays the network's prior reads (prior.py; fitted on the
                training prompts only)

Steps of ``save``: write both into a hidden temporary directory beside the
target, then swap it in with renames, so a reader sees the old checkpoint or
the new one, never a half-written one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from emoe_jax.predict.learned.config import LearnedConfig, LearnedPredictorError
from emoe_jax.predict.learned.model import RoutingPredictorNet
from emoe_jax.predict.learned.prior import load_npz, save_npz

PREDICTORS_DIR = Path(__file__).resolve().parents[3] / "checkpoints" / "predictors"
# The DeepSeek-V2-Lite checkpoint (L=26, E=64, k=6). ``LearnedPredictor`` without a
# checkpoint no longer loads it blindly: it picks the checkpoint in PREDICTORS_DIR
# whose shape matches the model (``find_checkpoint``).
DEFAULT_CHECKPOINT = PREDICTORS_DIR / "learned-dsv2lite"


def _ocp():
    logging.getLogger("absl").setLevel(logging.ERROR)
    from orbax.checkpoint import v1 as ocp

    return ocp


def save(path: str | os.PathLike, model: RoutingPredictorNet, info: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (config + params) to ``path``, replacing an existing checkpoint atomically."""
    path = Path(path).resolve()  # Orbax refuses relative paths
    path.parent.mkdir(parents=True, exist_ok=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params = jax.tree.map(lambda x: np.asarray(x, np.float16), params)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _ocp().save(tmp / "params", params)
        if model.cfg.table_prior:
            tp = model.table_prior()
            save_npz(tp.arrays(), tp.token_ids, tp.top_k, tmp)
        record = {"config": json.loads(model.cfg.to_json()), "info": info or {}}
        (tmp / "config.json").write_text(json.dumps(record, indent=1, sort_keys=True))
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load(path: str | os.PathLike) -> tuple[RoutingPredictorNet, dict[str, Any]]:
    """(model, training info) from a checkpoint directory; clear errors for missing or corrupt ones."""
    path = Path(path).resolve()
    hint = "train one with: python -m emoe_jax.predict.learned train --traces TRACES --out DIR"
    if not path.is_dir():
        raise FileNotFoundError(f"learned-predictor checkpoint {path} does not exist; {hint}")
    cfg_file, params_dir = path / "config.json", path / "params"
    if not cfg_file.is_file() or not params_dir.is_dir():
        raise LearnedPredictorError(f"{path} is not a learned-predictor checkpoint (needs config.json and params/); {hint}")
    try:
        record = json.loads(cfg_file.read_text())
        cfg = LearnedConfig.from_dict(record["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise LearnedPredictorError(f"{cfg_file} is corrupt ({exc}); {hint}") from exc
    model = RoutingPredictorNet(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    template = nnx.to_pure_dict(state)
    try:
        saved = _ocp().load(params_dir)
    except Exception as exc:  # Orbax raises many types for a damaged directory
        raise LearnedPredictorError(f"cannot read {params_dir}: {exc}; {hint}") from exc
    restored = _match(template, saved, "")
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    if cfg.table_prior:
        model.install_prior(load_npz(path, cfg.num_layers, cfg.num_experts, cfg.horizon, cfg.prior_token_rows))
    return model, record.get("info", {})


def _match(template: Any, saved: Any, where: str) -> Any:
    if isinstance(template, dict):
        if not isinstance(saved, dict):
            raise LearnedPredictorError(f"checkpoint params{where} is not a group; the checkpoint is corrupt")
        out = {}
        for k, v in template.items():
            key = k if k in saved else str(k)
            if key not in saved:
                raise LearnedPredictorError(f"checkpoint lacks parameter params{where}/{k}; it belongs to another model")
            out[k] = _match(v, saved[key], f"{where}/{k}")
        return out
    arr = np.asarray(saved, np.float32)
    if arr.shape != tuple(template.shape):
        raise LearnedPredictorError(
            f"checkpoint parameter params{where} has shape {arr.shape}, config expects {tuple(template.shape)}"
        )
    return jax.numpy.asarray(arr)


def checkpoint_bytes(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def update_info(path: str | os.PathLike, info: dict[str, Any]) -> None:
    """Replace the training record in ``path``/config.json (write a temporary file, then rename)."""
    cfg_file = Path(path) / "config.json"
    record = json.loads(cfg_file.read_text())
    record["info"] = info
    tmp = cfg_file.with_name(f".config.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, cfg_file)


def read_config(path: str | os.PathLike) -> LearnedConfig:
    """The ``LearnedConfig`` of a checkpoint directory, without loading its parameters."""
    cfg_file = Path(path) / "config.json"
    try:
        return LearnedConfig.from_dict(json.loads(cfg_file.read_text())["config"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise LearnedPredictorError(f"{cfg_file} is missing or corrupt ({exc})") from exc


def list_checkpoints(root: str | os.PathLike | None = None) -> dict[Path, LearnedConfig]:
    """Learned-predictor checkpoints directly under ``root`` (default checkpoints/predictors), by name.

    Directories that are not learned-predictor checkpoints (other predictors' files, temporaries
    of an interrupted save, whose names start with a dot) are skipped.
    """
    root = PREDICTORS_DIR if root is None else Path(root)
    found: dict[Path, LearnedConfig] = {}
    if not root.is_dir():
        return found
    for d in sorted(root.iterdir()):
        if d.name.startswith(".") or not (d / "config.json").is_file() or not (d / "params").is_dir():
            continue
        try:
            found[d] = read_config(d)
        except LearnedPredictorError:
            continue
    return found


def find_checkpoint(num_layers: int, num_experts: int, top_k: int, *, router_inputs: bool | None = None,
                    hidden_size: int | None = None, root: str | os.PathLike | None = None) -> Path:  # fmt: skip
    """The checkpoint under ``root`` trained for a model with these MoE layers, experts and top-k.

    router_inputs: whether the caller will feed router inputs (``observe_router_input`` or
    traces with ``hidden``). True: prefer a checkpoint that uses them (of width ``hidden_size``
    when given), else one without; False: only checkpoints without; None (unknown): prefer one
    without (it runs anywhere), else one with. Ties go to the first name in sorted order.
    Raises ``LearnedPredictorError`` naming every available checkpoint's shape when none matches.
    """
    root = PREDICTORS_DIR if root is None else Path(root)
    if router_inputs is None and hidden_size is not None:
        router_inputs = True
    found = list_checkpoints(root)
    shape = [d for d, c in found.items() if (c.num_layers, c.num_experts, c.top_k) == (num_layers, num_experts, top_k)]
    uses_inputs = [d for d in shape if found[d].hidden_size is not None
                   and (hidden_size is None or found[d].hidden_size == hidden_size)]  # fmt: skip
    without = [d for d in shape if found[d].hidden_size is None]
    if router_inputs is None:
        order = without + uses_inputs
    elif router_inputs:
        order = uses_inputs + without
    else:
        order = without
    if order:
        return order[0]
    have = "; ".join(
        f"{d.name}: L={c.num_layers}, E={c.num_experts}, k={c.top_k}"
        + (f", router inputs of width {c.hidden_size}" if c.hidden_size is not None else ", no router inputs")
        for d, c in found.items()
    ) or "none"
    want = f"L={num_layers}, E={num_experts}, k={top_k}" + (
        "" if router_inputs is None else (", with router inputs" if router_inputs else ", without router inputs")
    )
    raise LearnedPredictorError(
        f"no learned-predictor checkpoint in {root} matches {want} (available: {have}); train one with: "
        f"python -m emoe_jax.predict.learned train --traces TRACES --out {root}/learned-NAME, "
        "or pass checkpoint=DIR"
    )
