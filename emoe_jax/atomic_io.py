"""Write files and folders so that readers see the old version or the whole new one, never half.

Every output the project writes (checkpoints' manifests, predictor files, benchmark
results, traces, corpora) goes through these: the bytes go to a temporary name in
the destination's folder (same file system, so the final rename is atomic) and are
renamed over the destination only once complete; a failure or Ctrl-C removes the
temporary file and leaves the old destination untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Create or replace `path` with what `write(tmp)` writes to a temporary file beside it.

    The temporary name keeps `path`'s suffix (NumPy's savez adds ".npz" otherwise). The file
    gets ordinary permissions (mkstemp's are 0600) and is fsynced before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """`path` holds `text` (UTF-8), written atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 1, sort_keys: bool = False) -> Path:
    """`path` holds `obj` as JSON (one trailing newline), written atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """`dst` becomes a copy of `src`, atomically."""
    return write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the complete folder `tmp` to `out_dir`, replacing an old one only once the new one is whole."""
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        os.rename(out_dir, old / out_dir.name)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


__all__ = ["write_atomic", "write_text_atomic", "write_json_atomic", "copy_atomic", "replace_dir"]
