"""Hyper-parameters of the learned expert-activation predictor (frozen, keyword-only)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

from emoe_jax.errors import EmoeError


class LearnedPredictorError(EmoeError):
    """A learned-predictor checkpoint, config or input is missing, corrupt or mismatched."""


@dataclass(frozen=True, kw_only=True)
class LearnedConfig:
    num_layers: int  # MoE layers of the traced model (L)
    num_experts: int  # routed experts per layer (E)
    top_k: int  # experts per token and layer (k)
    horizon: int = 4  # predicts steps s .. s+horizon (token-major; may reach token t+1)
    d_model: int = 128
    num_heads: int = 4
    context_layers: int = 2  # causal transformer blocks over tokens
    step_blocks: int = 2  # residual MLP blocks per (token, layer) step
    mlp_hidden: int = 256
    token_buckets: int = 4096  # token ids are hashed (id mod buckets); -1 (unknown) gets its own row
    window: int = 256  # causal attention sees at most this many tokens (itself included)
    hidden_size: int | None = None  # router-input width when the traces store router inputs, else None
    # Learn a residual over the causal-table baseline (prior.py): its fitted tables travel with the
    # checkpoint (table_prior.npz), prior_token_rows = rows of its token-id table.
    table_prior: bool = False
    prior_token_rows: int = 0

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_experts", "top_k", "d_model", "num_heads", "mlp_hidden",
                     "token_buckets", "window"):  # fmt: skip
            if int(getattr(self, name)) < 1:
                raise LearnedPredictorError(f"LearnedConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.horizon < 0:
            raise LearnedPredictorError(f"LearnedConfig.horizon must be >= 0 steps, got {self.horizon}")
        if self.d_model % self.num_heads:
            raise LearnedPredictorError(
                f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}"
            )
        if self.hidden_size is not None and self.hidden_size < 1:
            raise LearnedPredictorError(f"LearnedConfig.hidden_size must be None or >= 1, got {self.hidden_size}")
        if self.prior_token_rows < 0 or (self.prior_token_rows and not self.table_prior):
            raise LearnedPredictorError(f"prior_token_rows={self.prior_token_rows} needs table_prior=True and >= 0")
        if self.table_prior and self.horizon >= self.num_layers:
            raise LearnedPredictorError(f"table_prior needs horizon < num_layers (targets reach token t+1 at most); "
                                        f"got horizon={self.horizon}, num_layers={self.num_layers}")
        if self.top_k > self.num_experts:
            raise LearnedPredictorError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")

    def with_(self, **changes: Any) -> "LearnedConfig":
        return replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LearnedConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise LearnedPredictorError(f"unknown LearnedConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)
