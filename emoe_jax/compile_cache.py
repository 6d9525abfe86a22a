"""JAX's persistent compilation cache, on by default for the command-line tools.

The one-jit decode step of even the small embedded model takes XLA:CPU about 10 s to
compile (tens of seconds on a busy machine), once per (batch bucket, KV bucket,
slots per layer). Stored on disk, a second run with the same configuration loads the
executable in well under a second instead. JAX keys entries by the program, the
compile options, the backend and the JAX version, so a stale entry is never used.

Directory: `$JAX_COMPILATION_CACHE_DIR` when set (JAX's own variable), else
`$EMOE_JAX_CACHE/xla`, else `~/.cache/emoe_jax/xla`. `EMOE_JAX_COMPILE_CACHE=0`
turns it off.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

# Entries for programs that compile faster than this are not worth a disk write.
MIN_COMPILE_SECONDS = 1.0


def default_cache_dir() -> Path:
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    root = os.environ.get("EMOE_JAX_CACHE") or Path.home() / ".cache" / "emoe_jax"
    return Path(root) / "xla"


def enable_compile_cache(directory: str | Path | None = None,
                         min_compile_seconds: float = MIN_COMPILE_SECONDS) -> Path | None:
    """Point JAX's persistent compilation cache at `directory` (default: `default_cache_dir()`).
    Returns the directory, or None when disabled by EMOE_JAX_COMPILE_CACHE=0 or when the
    directory cannot be created (a read-only home: compiling every time still works)."""
    if os.environ.get("EMOE_JAX_COMPILE_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    path = Path(directory) if directory is not None else default_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    return path


__all__ = ["enable_compile_cache", "default_cache_dir"]
