"""Content fingerprints of a Hugging Face source, so a conversion knows what it converts.

Names and sizes are not enough: another model of the same shape has the same file
names and sizes, and a re-downloaded shard may differ in content. Hashing every byte
up front would read a 100 GB source twice, so each file is fingerprinted by
  1. its name and size,
  2. sha256 over its safetensors header (every tensor's name, dtype, shape and offsets)
     and `SAMPLES` blocks of `BLOCK` bytes spread evenly over the data section,
     the first and the last block included (any re-initialised or retrained weights
     change them; a truncated file already fails the header check),
and the JSON files that define the model (config.json, the shard index) by sha256 of
their whole content. The progress log's header and the manifest carry the result; a
resume or an "already complete" answer requires it to be equal, and a mismatch names
the file that differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

SAMPLES = 16
BLOCK = 4096
# Bump when the recipe changes: a log written with another recipe is reported as such.
RECIPE = 1


def file_digest(path: Path, data_start: int) -> str:
    """sha256 of the header and SAMPLES evenly spread BLOCK-byte blocks of the data section."""
    size = path.stat().st_size
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        h.update(os.pread(fd, data_start, 0))
        span = max(size - data_start - BLOCK, 0)
        offsets = sorted({data_start + (span * i) // max(SAMPLES - 1, 1) for i in range(SAMPLES)})
        for off in offsets:
            h.update(off.to_bytes(8, "little"))
            h.update(os.pread(fd, BLOCK, off))
    finally:
        os.close(fd)
    return h.hexdigest()


def json_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_fingerprint(files: Iterable[tuple[Path, int]], model_files: Iterable[Path]) -> dict[str, Any]:
    """files: (safetensors path, data-section start) pairs; model_files: config.json, index."""
    return {
        "recipe": RECIPE,
        "files": [{"name": p.name, "bytes": p.stat().st_size, "sha256_sampled": file_digest(p, start)}
                  for p, start in files],
        "model_files": {p.name: json_digest(p) for p in model_files if p.is_file()},
    }


def short_id(fingerprint: dict[str, Any], n: int = 12) -> str:
    """A short stable id of a fingerprint (for cache folder names)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:n]


def describe_difference(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """One phrase naming what differs between two job fingerprints (for error messages)."""
    if not isinstance(old, dict):
        return "the earlier run recorded no fingerprint"
    if old.get("dtype") != new.get("dtype"):
        return f"dtype {old.get('dtype')} then, {new.get('dtype')} now"
    if old.get("format_version") != new.get("format_version"):
        return f"checkpoint format {old.get('format_version')} then, {new.get('format_version')} now"
    a, b = old.get("source"), new.get("source")
    if not isinstance(a, dict) or a.get("recipe") != b.get("recipe"):
        return "it was written by an emoe_jax that fingerprinted sources differently"
    fa = {f["name"]: f for f in a.get("files", [])}
    fb = {f["name"]: f for f in b.get("files", [])}
    if set(fa) != set(fb):
        gone, new_names = sorted(set(fa) - set(fb)), sorted(set(fb) - set(fa))
        return f"source files differ (then only: {gone or 'none'}, now only: {new_names or 'none'})"
    for name in sorted(fb):
        if fa[name] != fb[name]:
            what = "size" if fa[name].get("bytes") != fb[name].get("bytes") else "content"
            return f"{name} changed ({what})"
    for name in sorted(set(a.get("model_files", {})) | set(b.get("model_files", {}))):
        if a.get("model_files", {}).get(name) != b.get("model_files", {}).get(name):
            return f"{name} changed"
    return "the job settings differ"
