"""What `--model PATH` points at, and turning a Hugging Face folder into a checkpoint.

A `transformers` user passes the folder they downloaded; our runtime needs a converted
checkpoint. `resolve_model(path)`:
  1. a converted checkpoint (manifest.json, or progress.jsonl of an interrupted
     conversion, which `load_checkpoint` reports) -> used as is;
  2. a Hugging Face folder (config.json with `model_type`, *.safetensors) -> converted
     once into the cache, `<cache>/<folder name>-<source fingerprint>`, with a progress
     bar; later runs find it complete and reuse it (a changed source gets a new
     fingerprint, so a new folder). The cache is `--cache-dir`, else $EMOE_JAX_CACHE,
     else $XDG_CACHE_HOME/emoe_jax or ~/.cache/emoe_jax;
  3. a file, an empty folder or anything else -> ModelPathError saying what to give.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable

from emoe_jax.atomic_io import copy_atomic
from emoe_jax.checkpoint.errors import CheckpointError
from emoe_jax.checkpoint.manifest import MANIFEST, PROGRESS
from emoe_jax.checkpoint.writer import TOKENIZER_CORE, TOKENIZER_FILES

CACHE_ENV = "EMOE_JAX_CACHE"
_WHAT = ("give a converted checkpoint folder (python -m emoe_jax.convert HF_DIR OUT_DIR makes one) or a "
         "Hugging Face model folder (config.json + *.safetensors)")


class ModelPathError(CheckpointError):
    """--model names something that is neither a checkpoint nor a Hugging Face model folder."""


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "emoe_jax"


def is_hf_folder(path: Path) -> bool:
    """config.json written by transformers (has model_type; ours has family) next to safetensors."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    has_weights = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    return isinstance(cfg, dict) and "model_type" in cfg and "family" not in cfg and has_weights


def resolve_model(path: str | Path, *, cache_dir: str | Path | None = None, progress: bool = True,
                  say: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Path:
    """The converted checkpoint folder for `path`, converting a Hugging Face folder first."""
    path = Path(path).expanduser()
    if path.is_file():
        hint = (f"; its folder {path.parent} may be what you meant"
                if path.suffix in (".json", ".safetensors", ".jinja", ".model") else "")
        raise ModelPathError(f"--model {path} is a file, not a folder: {_WHAT}{hint}")
    if not path.is_dir():
        raise FileNotFoundError(f"--model {path} does not exist; {_WHAT}")
    if (path / MANIFEST).exists() or (path / PROGRESS).exists():
        return path
    if is_hf_folder(path):
        return _convert_into_cache(path, Path(cache_dir).expanduser() if cache_dir else default_cache_dir(),
                                   progress, say)
    entries = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    if not entries:
        raise ModelPathError(f"--model {path} is an empty folder: {_WHAT}")
    if (path / "config.json").is_file():
        raise ModelPathError(
            f"--model {path} has a config.json but no *.safetensors weights (files: {', '.join(entries[:6])}"
            f"{' ...' if len(entries) > 6 else ''}); emoe_jax reads safetensors checkpoints: download the "
            "model's .safetensors files")
    raise ModelPathError(f"--model {path} holds neither an emoe_jax checkpoint (manifest.json) nor a Hugging "
                         f"Face model (files: {', '.join(entries[:6])}{' ...' if len(entries) > 6 else ''}); "
                         f"{_WHAT}")


def _convert_into_cache(hf_dir: Path, cache: Path, progress: bool, say: Callable[[str], None]) -> Path:
    from emoe_jax.checkpoint.convert_hf import convert_hf_checkpoint
    from emoe_jax.checkpoint.fingerprint import short_id
    from emoe_jax.checkpoint.safetensors_reader import HFSource

    source = HFSource(hf_dir)
    try:
        fp = source.fingerprint()
    finally:
        source.close()
    out = cache / f"{hf_dir.resolve().name}-{short_id(fp)}"
    if not (out / MANIFEST).exists():
        say(f"note: {hf_dir} is a Hugging Face checkpoint; converting it once into {out} (set --cache-dir or "
            f"${CACHE_ENV} to put it elsewhere; python -m emoe_jax.convert does the same explicitly)")
    summary = convert_hf_checkpoint(hf_dir, out, progress=progress)
    _sync_tokenizer_files(hf_dir, out)
    if not any((out / f).is_file() for f in TOKENIZER_CORE):
        for w in summary.get("warnings", []):
            say(f"warning: {w}")
    return out


def _sync_tokenizer_files(hf_dir: Path, out: Path) -> None:
    """Tokenizer files are not part of the weights' fingerprint: a user who adds them to the
    Hugging Face folder after the first run gets them copied into the cached checkpoint."""
    for name in TOKENIZER_FILES:
        src, dst = hf_dir / name, out / name
        if src.is_file() and (not dst.is_file() or src.read_bytes() != dst.read_bytes()):
            copy_atomic(src, dst)
