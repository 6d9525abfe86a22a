"""Greedy generations of an exported checkpoint through the offloaded engine (a smoke test and model-card text).

Runs `OffloadedEngine.from_checkpoint(path, device_experts=...)` (exact mode,
bf16 weights as stored) with the checkpoint's own tokenizer, so it exercises
exactly what a user of the checkpoint gets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

DEFAULT_PROMPTS = (
    "def fibonacci(n):",
    "Der alte Mann ging",
    "El que",
    "The government said",
    "Hi! How are you",
    "Let $x$ be",
    "The :mod:`os` module",
)


def generate_samples(path: str | Path, prompts: Sequence[str] = DEFAULT_PROMPTS, max_new_tokens: int = 40,
                     device_experts: float | int | str = 0.25) -> list[dict[str, Any]]:
    from emoe_jax.runtime.engine import OffloadedEngine
    from emoe_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(path)
    engine = OffloadedEngine.from_checkpoint(path, device_experts=device_experts)
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        result = engine.generate([ids], max_new_tokens)
        out.append({"prompt": prompt, "completion": tokenizer.decode(result.tokens[0]),
                    "device_hit_rate": result.stats["device_hit_rate"]})
    return out
