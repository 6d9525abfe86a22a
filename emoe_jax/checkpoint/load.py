"""Opening a converted checkpoint.

Steps of `load_checkpoint`:
  1. read manifest.json (absent: the conversion was interrupted -> clear error);
  2. rebuild the MoEConfig from the manifest;
  3. open the expert store with the manifest checksums;
  4. dense parameters and the tokenizer load lazily on first access.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from emoe_jax.checkpoint import dense_store
from emoe_jax.checkpoint.expert_store import ExpertStore
from emoe_jax.checkpoint.manifest import read_manifest
from emoe_jax.config import MoEConfig


class Checkpoint:
    """A converted checkpoint: `.config`, `.dense`, `.experts`, `.tokenizer`, `.manifest`."""

    def __init__(self, path: str | Path):
        # Absolute: Orbax refuses relative checkpoint paths.
        self.path = Path(path).expanduser().resolve()
        self.manifest: dict[str, Any] = read_manifest(self.path)
        self.config: MoEConfig = MoEConfig.from_dict(self.manifest["config"])
        self.experts = ExpertStore(self.path / "experts", self.manifest["expert_crc32"])

    @functools.cached_property
    def dense(self) -> dict[str, Any]:
        """Nested dict of numpy arrays keyed by the HF name split on '.' (no leading 'model.')."""
        return dense_store.load_groups(self.path / "dense", self.manifest["dense_groups"])

    def load_dense_groups(self, groups: list[str]) -> dict[str, Any]:
        """Only some groups (e.g. ['layers_3']), for callers that stream layers."""
        unknown = sorted(set(groups) - set(self.manifest["dense_groups"]))
        if unknown:
            raise KeyError(f"unknown dense groups {unknown}; have {sorted(self.manifest['dense_groups'])}")
        return dense_store.load_groups(self.path / "dense", groups)

    @functools.cached_property
    def tokenizer(self):
        from emoe_jax.tokenizer import load_tokenizer

        return load_tokenizer(self.path, self.config)

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Checkpoint({str(self.path)!r}, family={self.config.family}, dtype={m['dtype']}, "
                f"{m['num_moe_layers']} MoE layers x {m['num_experts']} experts)")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint written by `python -m emoe_jax.convert` or `write_checkpoint`."""
    return Checkpoint(path)
