"""One conversion per output folder at a time: an advisory lock naming its holder.

Two conversions writing one folder would interleave their progress logs and expert
chunks. `conversion_lock(out_dir)` takes an exclusive `flock` on `out_dir/.convert.lock`
(the kernel drops it when the holder dies, so a killed conversion leaves no stale
lock) and writes the holder's pid, host and start time into the file, which the
second conversion reads back for its error message.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Iterator

from emoe_jax.checkpoint.errors import CheckpointError

LOCK = ".convert.lock"


class ConversionLockedError(CheckpointError):
    """Another process is converting into the same folder; the message names it."""


@contextlib.contextmanager
def conversion_lock(out_dir: str | Path) -> Iterator[None]:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConversionLockedError(
                f"{out_dir} is being written by another conversion ({_holder(path)}); wait for it to "
                "finish (rerunning afterwards resumes or reports it complete), or stop that process"
            ) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return f"pid {h['pid']} on {h['host']}, started {h['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
