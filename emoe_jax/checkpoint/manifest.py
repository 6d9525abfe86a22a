"""manifest.json (written last: its presence means the checkpoint is complete) and the
progress log that lets an interrupted conversion resume.

Progress log `progress.jsonl`: the first line is a header with a fingerprint of the
job (source files, sizes and content fingerprints, see fingerprint.py; target dtype;
format version); each later line records
one finished item (`{"dense": group}` or `{"expert": [l, e], "crc32": c}`), flushed
and fsynced after the item's data is written. A torn last line (crash mid-write) is
ignored. A rerun with a different fingerprint refuses to mix two jobs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from emoe_jax.checkpoint.errors import CheckpointError, IncompleteCheckpointError

FORMAT = "emoe_jax.checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.jsonl"



def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    path = ckpt_dir / MANIFEST
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
    if not path.exists():
        raise IncompleteCheckpointError(
            f"{ckpt_dir} has no {MANIFEST}: incomplete conversion; rerun "
            f"python -m emoe_jax.convert HF_DIR {ckpt_dir} to resume"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); rerun the conversion with --overwrite") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an emoe_jax checkpoint manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {manifest.get('format_version')}; this emoe_jax reads "
            f"version {FORMAT_VERSION}: convert the checkpoint again"
        )
    return manifest


class ProgressLog:
    """Append-only record of finished conversion items."""

    def __init__(self, out_dir: Path, fingerprint: dict[str, Any]):
        self.path = out_dir / PROGRESS
        self.dense_done: set[str] = set()
        self.experts_done: dict[tuple[int, int], int] = {}
        resumed = self.path.exists()
        if resumed:
            self._load(fingerprint)
        self._f = open(self.path, "a")
        if not resumed:
            self._append({"header": fingerprint})
        self.resumed = resumed

    def _load(self, fingerprint: dict[str, Any]) -> None:
        lines = self.path.read_text().split("\n")
        records = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i >= len(lines) - 2:  # torn final line from a crash: drop it
                    break
                raise CheckpointError(f"{self.path} is corrupt at line {i + 1}; rerun with --overwrite") from None
        if not records or records[0].get("header") != fingerprint:
            from emoe_jax.checkpoint.fingerprint import describe_difference

            why = describe_difference(records[0].get("header") if records else None, fingerprint)
            raise CheckpointError(
                f"{self.path.parent} holds a partial conversion of a different source or dtype ({why}); "
                "resuming would mix two jobs. Rerun with --overwrite to start again, or convert into "
                "another directory"
            )
        for r in records[1:]:
            if "dense" in r:
                self.dense_done.add(r["dense"])
            elif "expert" in r:
                self.experts_done[tuple(r["expert"])] = int(r["crc32"])
        # Rewrite without a torn tail so later appends start on a clean line.
        with open(self.path, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))

    def _append(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def dense(self, group: str) -> None:
        self._append({"dense": group})
        self.dense_done.add(group)

    def expert(self, layer: int, expert: int, crc: int) -> None:
        self._append({"expert": [layer, expert], "crc32": crc})
        self.experts_done[(layer, expert)] = crc

    def close(self) -> None:
        self._f.close()
