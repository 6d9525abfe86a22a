"""Exceptions of the checkpoint package.

Every error names the file, tensor, layer or expert at fault and says how to fix it,
so the CLI can print the message alone (no traceback).
"""

from __future__ import annotations

from emoe_jax.errors import EmoeError


class CheckpointError(EmoeError):
    """A checkpoint (source or converted) that cannot be read or written as asked."""


class SafetensorsError(CheckpointError):
    """A corrupt, truncated or missing safetensors file; the message names the file."""


class IncompleteCheckpointError(CheckpointError):
    """A converted checkpoint directory without manifest.json (interrupted conversion)."""


class ExpertIntegrityError(CheckpointError):
    """A routed expert whose stored bytes are missing or disagree with the manifest checksum."""
