"""emoe_jax.checkpoint: Hugging Face safetensors -> project checkpoint, and reading it back.

Public API:
  convert_hf_checkpoint(hf_dir, out_dir, dtype='auto', overwrite=False) -> summary dict
  write_checkpoint(out_dir, config, dense, experts, dtype=None) -> manifest
  load_checkpoint(path) -> Checkpoint(.config, .dense, .experts: ExpertStore, .tokenizer, .manifest)
See docs/checkpoint.md for the on-disk layout.
"""

from emoe_jax.checkpoint.convert_hf import convert_hf_checkpoint
from emoe_jax.checkpoint.errors import (CheckpointError, ExpertIntegrityError, IncompleteCheckpointError,
                                        SafetensorsError)
from emoe_jax.checkpoint.expert_store import ExpertFuture, ExpertStore, expert_crc32
from emoe_jax.checkpoint.load import Checkpoint, load_checkpoint
from emoe_jax.checkpoint.writer import write_checkpoint

__all__ = [
    "Checkpoint", "CheckpointError", "ExpertFuture", "ExpertIntegrityError", "ExpertStore",
    "IncompleteCheckpointError", "SafetensorsError", "convert_hf_checkpoint", "expert_crc32",
    "load_checkpoint", "write_checkpoint",
]
