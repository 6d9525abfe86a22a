"""emoe_jax: Mixture-of-Experts inference with offloaded experts, in JAX, and a lab for expert predictors.

    import emoe_jax
    ckpt = emoe_jax.load("checkpoints/embedded")             # converted checkpoint
    engine = emoe_jax.OffloadedEngine.from_checkpoint("checkpoints/embedded", device_experts=0.25)
    out = engine.generate([ckpt.tokenizer.encode("def fibonacci(n):")], max_new_tokens=32)
"""

from emoe_jax.checkpoint import (
    Checkpoint,
    CheckpointError,
    convert_hf_checkpoint,
    load_checkpoint,
    write_checkpoint,
)
from emoe_jax.config import MoEConfig, from_hf_config, get_preset, tiny_config
from emoe_jax.model.resident import ResidentModel
from emoe_jax.runtime.engine import EngineConfig, GenerationResult, OffloadedEngine
from emoe_jax.tokenizer import load_tokenizer

load = load_checkpoint

__version__ = "0.1.0"

__all__ = [
    "Checkpoint", "CheckpointError", "EngineConfig", "GenerationResult", "MoEConfig", "OffloadedEngine", "ResidentModel",
    "convert_hf_checkpoint", "from_hf_config", "get_preset", "load", "load_checkpoint", "load_tokenizer",
    "tiny_config", "write_checkpoint",
]
