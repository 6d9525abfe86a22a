"""Dense (non-routed-expert) parameters on disk: one Orbax checkpoint per group.

A group is one decoder layer (`layers_{l}`) or one other top-level module
(`embed_tokens`, `norm`, `lm_head`). Saving per group keeps the converter's
resident set near one group instead of the whole model; Orbax commits each group
atomically (temporary directory, then rename), so an interrupted save leaves no
half-written group. Loading restores every group as numpy arrays and merges them
into one nested dict keyed by the Hugging Face name split on '.'.

We use Orbax's v1 API (`orbax.checkpoint.v1`), which saves and restores numpy
(bfloat16 included) directly.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from emoe_jax.checkpoint.errors import CheckpointError

Nested = dict[str, Any]


def _ocp():
    # Imported lazily: orbax pulls in jax, which the tokenizer-only paths do not need.
    logging.getLogger("absl").setLevel(logging.ERROR)
    from orbax.checkpoint import v1 as ocp

    return ocp


def set_nested(tree: Nested, path: tuple[str, ...], value: Any) -> None:
    node = tree
    for i, key in enumerate(path[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise CheckpointError(f"parameter {'.'.join(path)} collides with tensor {'.'.join(path[: i + 1])}")
        node = child
    if path[-1] in node:
        raise CheckpointError(f"parameter {'.'.join(path)} appears twice")
    node[path[-1]] = value


def merge_nested(into: Nested, other: Mapping[str, Any], prefix: str = "") -> None:
    for k, v in other.items():
        if isinstance(v, Mapping):
            child = into.setdefault(k, {})
            if not isinstance(child, dict):
                raise CheckpointError(f"dense group merge: {prefix}{k} is both a tensor and a module")
            merge_nested(child, v, f"{prefix}{k}.")
        elif k in into:
            raise CheckpointError(f"dense group merge: {prefix}{k} stored twice")
        else:
            into[k] = v


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Any]]:
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def save_group(dense_dir: Path, group: str, tree: Nested) -> None:
    """Save one group (nested dict of numpy arrays) to dense_dir/group, replacing leftovers."""
    target = dense_dir / group
    if target.exists():
        shutil.rmtree(target)
    _ocp().save(target, tree)


def remove_unfinished(dense_dir: Path, finished: set[str]) -> None:
    """Delete groups (and Orbax temporaries) not recorded as finished, before a resumed save."""
    if not dense_dir.exists():
        return
    for child in dense_dir.iterdir():
        if child.name not in finished:
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def load_groups(dense_dir: Path, groups: Iterable[str]) -> Nested:
    """Restore the named groups and merge them into one nested dict of numpy arrays."""
    ocp = _ocp()
    dense_dir = Path(dense_dir).expanduser().resolve()  # Orbax refuses relative paths
    tree: Nested = {}
    for group in groups:
        path = dense_dir / group
        if not path.exists():
            raise CheckpointError(f"dense group {path} is missing; rerun python -m emoe_jax.convert --overwrite")
        asyncio_log = logging.getLogger("asyncio")
        level = asyncio_log.level
        asyncio_log.setLevel(logging.CRITICAL)  # Orbax's failed reads also log "Task exception was never retrieved"
        try:
            restored = _to_numpy(ocp.load(path))
        except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise ValueError, OSError, ZSTD errors...
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"dense group {group!r} ({path}) is damaged and cannot be read ({first}); convert the model "
                "again (python -m emoe_jax.convert HF_DIR OUT_DIR --overwrite); python -m emoe_jax.verify "
                f"{dense_dir.parent} checks every part"
            ) from None
        finally:
            asyncio_log.setLevel(level)
        merge_nested(tree, restored)
    return tree


def _to_numpy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)
