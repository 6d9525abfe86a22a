"""Where numba keeps its compiled-function cache: a user cache directory, never the source tree.

``cache=True`` makes numba write ``*.nbi``/``*.nbc`` files; by default it puts
them in ``__pycache__`` beside the source, which litters a checkout (and fails
on a read-only install). ``configure()`` points numba at
``$NUMBA_CACHE_DIR`` if the user set one, else ``$XDG_CACHE_HOME/emoe_jax/numba``
(``~/.cache/emoe_jax/numba``). Call it before the first ``numba.njit(cache=True)``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def cache_dir() -> Path:
    """The directory numba's cache goes to (the user's choice wins)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "emoe_jax" / "numba"


def configure() -> Path:
    """Point numba's cache at ``cache_dir()``, whether or not numba is imported yet."""
    path = cache_dir()
    os.environ["NUMBA_CACHE_DIR"] = str(path)
    numba_config = sys.modules.get("numba.core.config")
    if numba_config is not None:  # numba already imported: its config read the environment already
        numba_config.CACHE_DIR = str(path)
    return path
