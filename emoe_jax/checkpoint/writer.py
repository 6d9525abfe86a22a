"""Writing a converted checkpoint: shared by the HF converter and `write_checkpoint`.

Steps of `CheckpointWriter`:
  1. prepare OUT_DIR: resume when it holds a progress log of the same job, refuse a
     finished or foreign directory unless `overwrite` (which removes only our entries);
  2. create (or reopen) the expert arrays; open the progress log;
  3. per item: cast to the target dtype, write (dense group via Orbax, expert via
     TensorStore), then log it as finished;
  4. `finish`: check every expert and group is done, write config.json, copy
     hf_config.json and tokenizer files, and write manifest.json last, atomically.
"""

from __future__ import annotations

import datetime
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from emoe_jax.atomic_io import copy_atomic, write_json_atomic
from emoe_jax.checkpoint import dense_store, expert_store
from emoe_jax.checkpoint.errors import CheckpointError
from emoe_jax.checkpoint.lock import LOCK, conversion_lock
from emoe_jax.checkpoint.manifest import FORMAT, FORMAT_VERSION, MANIFEST, PROGRESS, ProgressLog
from emoe_jax.checkpoint.names import group_of
from emoe_jax.config import MoEConfig

DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32),
          "float16": np.dtype(np.float16)}
# chat_template.jinja: where recent instruct checkpoints keep their chat template (older
# ones keep it in tokenizer_config.json), copied so `generate --chat` can render it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json", "chat_template.jinja")
# Without one of these, text cannot be encoded (token-id prompts through the API still work).
TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model")
_ML_FLOATS = {"bfloat16", "float8_e4m3fn", "float8_e5m2"}
# Entries a conversion creates; --overwrite removes only these.
_OWN_ENTRIES = {"config.json", "hf_config.json", MANIFEST, PROGRESS, "dense", "experts", *TOKENIZER_FILES}
# Test hook: os._exit after this many finished items, to test resuming (see tests/test_convert.py).
CRASH_ENV = "EMOE_JAX_CONVERT_CRASH_AFTER"


def target_dtype(name: str) -> np.dtype:
    if name not in DTYPES:
        raise CheckpointError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def cast(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Floating tensors to `dtype` (round to nearest even, as torch does); others unchanged."""
    x = np.asarray(x)
    if x.dtype.kind == "f" or x.dtype.name in _ML_FLOATS:
        return np.ascontiguousarray(x.astype(dtype, copy=False))
    return np.ascontiguousarray(x)


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Make OUT_DIR ready: refuse to touch a directory that is not ours, clear it on overwrite."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = {p.name for p in out_dir.iterdir() if not p.name.startswith(".")}
    foreign = sorted(entries - _OWN_ENTRIES)
    if overwrite:
        if foreign:
            raise CheckpointError(
                f"--overwrite refused: {out_dir} holds files a conversion does not write "
                f"({', '.join(foreign[:5])}); choose an empty or new directory"
            )
        for p in out_dir.iterdir():
            if p.name == LOCK:
                continue  # held by this conversion: deleting it would let a second one in
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return
    if (out_dir / MANIFEST).exists():
        return  # the caller decides (already complete / different job)
    if entries and PROGRESS not in entries:
        raise CheckpointError(
            f"{out_dir} is not empty and holds no conversion in progress ({', '.join(sorted(entries)[:5])}); "
            "choose an empty or new directory, or pass --overwrite"
        )


class CheckpointWriter:
    def __init__(self, out_dir: str | Path, config: MoEConfig, dtype: np.dtype, fingerprint: dict[str, Any],
                 dense_groups: Mapping[str, list[str]]):
        self.out_dir = Path(out_dir).expanduser().resolve()  # Orbax refuses relative paths
        self.config = config
        self.dtype = np.dtype(dtype)
        self.dense_groups = dict(dense_groups)
        self.fingerprint = fingerprint
        self.progress = ProgressLog(self.out_dir, fingerprint)
        dense_store.remove_unfinished(self.out_dir / "dense", self.progress.dense_done)
        (self.out_dir / "dense").mkdir(exist_ok=True)
        h, i = config.hidden_size, config.moe_intermediate_size
        self.arrays = expert_store.create_arrays(
            self.out_dir / "experts", config.num_moe_layers, config.num_experts, h, i, self.dtype,
            resume=self.progress.resumed, bias=config.expert_bias,
        )
        self.shapes = expert_store.weight_shapes(h, i, config.expert_bias)
        crash = os.environ.get(CRASH_ENV)
        self._crash_after = int(crash) if crash else None
        self.items_written = 0

    # ---- items ----------------------------------------------------------------
    def dense_done(self, group: str) -> bool:
        return group in self.progress.dense_done

    def expert_done(self, moe_layer: int, expert: int) -> bool:
        return (moe_layer, expert) in self.progress.experts_done

    def save_dense_group(self, group: str, tree: dict[str, Any]) -> None:
        tree = _map_leaves(tree, lambda x: cast(x, self.dtype), keep=KEEP_FLOAT32)
        dense_store.save_group(self.out_dir / "dense", group, tree)
        self.progress.dense(group)
        self._tick()

    def write_expert(self, moe_layer: int, expert: int, weights: Mapping[str, np.ndarray]) -> None:
        """weights: gate [H, I], up [H, I], down [I, H] in our orientation, any float dtype."""
        cast_w = {}
        for w in expert_store.WEIGHTS:
            x = np.asarray(weights[w])
            if x.shape != self.shapes[w]:
                raise CheckpointError(
                    f"expert ({moe_layer}, {expert}) weight {w} has shape {x.shape}, expected {self.shapes[w]}"
                )
            cast_w[w] = cast(x, self.dtype)
        crc = expert_store.write_expert(self.arrays, moe_layer, expert, cast_w)
        self.progress.expert(moe_layer, expert, crc)
        self._tick()

    def _tick(self) -> None:
        self.items_written += 1
        if self._crash_after is not None and self.items_written >= self._crash_after:
            os._exit(86)  # simulated crash: no cleanup, no manifest

    # ---- finish ---------------------------------------------------------------
    def finish(self, *, source: dict[str, Any], hf_config: Path | None = None,
               tokenizer_dir: Path | None = None, verify: bool = False) -> dict[str, Any]:
        cfg = self.config
        lm, e = cfg.num_moe_layers, cfg.num_experts
        missing = [(l, x) for l in range(lm) for x in range(e) if (l, x) not in self.progress.experts_done]
        if missing:
            raise CheckpointError(f"experts not written: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        missing_groups = sorted(set(self.dense_groups) - self.progress.dense_done)
        if missing_groups:
            raise CheckpointError(f"dense groups not written: {', '.join(missing_groups)}")
        checksums = [[self.progress.experts_done[(l, x)] for x in range(e)] for l in range(lm)]
        self.progress.close()
        if verify:
            expert_store.ExpertStore(self.out_dir / "experts", checksums).verify_all()
        write_json_atomic(self.out_dir / "config.json", cfg.to_dict())
        if hf_config is not None:
            copy_atomic(hf_config, self.out_dir / "hf_config.json")
        copied = []
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    copy_atomic(tokenizer_dir / name, self.out_dir / name)
                    copied.append(name)
        expert_bytes = cfg.expert_params * self.dtype.itemsize
        h, i = cfg.hidden_size, cfg.moe_intermediate_size
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": cfg.to_dict(),
            "dtype": self.dtype.name,
            "moe_layers": list(cfg.moe_layers),
            "num_moe_layers": lm,
            "num_experts": e,
            "expert_bytes": expert_bytes,
            "all_expert_bytes": expert_bytes * lm * e,
            "experts": {
                "arrays": {"gate": [lm, e, h, i], "up": [lm, e, h, i], "down": [lm, e, i, h]},
                "chunk": "one expert of one weight per chunk, raw little-endian bytes",
                "orientation": "y = (silu(x @ gate) * (x @ up)) @ down",
            },
            "expert_crc32": checksums,
            "checksum": "zlib.crc32 over gate, up, down bytes (C order, stored dtype)",
            "dense_groups": self.dense_groups,
            "tokenizer_files": copied,
            "source": {**source, "fingerprint": self.fingerprint},
        }
        write_json_atomic(self.out_dir / MANIFEST, manifest)
        (self.out_dir / PROGRESS).unlink()
        return manifest


# Leaves stored in float32 whatever the target dtype: DeepSeek-V3's router correction bias only ranks
# experts, and transformers keeps it in float32 (rounding it to bf16 would change some choices).
KEEP_FLOAT32 = ("e_score_correction_bias",)


def _map_leaves(tree: Mapping[str, Any], fn, keep: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: _map_leaves(v, fn, keep) if isinstance(v, Mapping)
            else (cast(v, np.dtype(np.float32)) if k in keep else fn(v)) for k, v in tree.items()}


def write_checkpoint(out_dir: str | Path, config: MoEConfig, dense: Mapping[str, Any],
                     experts: Mapping[str, Any], *, dtype: str | None = None,
                     tokenizer_dir: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write a checkpoint from in-memory parameters (e.g. a freshly trained model).

    dense: nested dict of arrays keyed like the converter's output (HF names split on
    '.', without the leading 'model.'). experts: gate/up [Lm, E, H, I], down
    [Lm, E, I, H] (numpy or JAX arrays). dtype: 'bfloat16', 'float32' or 'float16';
    None keeps the experts' dtype. Returns the manifest.
    """
    out_dir = Path(out_dir).expanduser().resolve()  # Orbax refuses relative paths
    with conversion_lock(out_dir):
        return _write_checkpoint(out_dir, config, dense, experts, dtype, tokenizer_dir, overwrite)


def _write_checkpoint(out_dir, config, dense, experts, dtype, tokenizer_dir, overwrite) -> dict[str, Any]:
    prepare_out_dir(out_dir, overwrite)
    if (out_dir / MANIFEST).exists():
        raise CheckpointError(f"{out_dir} already holds a checkpoint; pass overwrite=True to replace it")
    if (out_dir / PROGRESS).exists():
        # An in-memory write cannot be resumed meaningfully: start again.
        prepare_out_dir(out_dir, overwrite=True)
    lm, e, h, i = config.num_moe_layers, config.num_experts, config.hidden_size, config.moe_intermediate_size
    want = {w: (lm, e) + shape for w, shape in expert_store.weight_shapes(h, i, config.expert_bias).items()}
    for w, shape in want.items():
        if w not in experts:
            raise CheckpointError(f"experts lacks {w!r}; expected keys gate, up, down")
        if tuple(experts[w].shape) != shape:
            raise CheckpointError(f"experts[{w!r}] has shape {tuple(experts[w].shape)}, config implies {shape}")
    dt = target_dtype(dtype) if dtype else np.dtype(np.asarray(experts["gate"][0, 0]).dtype)
    groups: dict[str, dict[str, Any]] = {}
    names: dict[str, list[str]] = {}
    for path, leaf in dense_store.flatten(dense):
        g = group_of(path)
        dense_store.set_nested(groups.setdefault(g, {}), path, np.asarray(leaf))
        names.setdefault(g, []).append(".".join(path))
    fingerprint = {"format_version": FORMAT_VERSION, "source": "in_memory", "dtype": dt.name}
    writer = CheckpointWriter(out_dir, config, dt, fingerprint, names)
    for g, tree in groups.items():
        writer.save_dense_group(g, tree)
    for l in range(lm):
        for x in range(e):
            writer.write_expert(l, x, {w: np.asarray(experts[w][l, x]) for w in want})
    return writer.finish(source={"kind": "in_memory"},
                         tokenizer_dir=Path(tokenizer_dir) if tokenizer_dir else None)
