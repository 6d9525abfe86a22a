"""Hugging Face tensor names -> routed-expert pieces or dense parameter paths.

Steps:
  1. a name matching a routed-expert pattern becomes an `ExpertPiece`
     (per-expert layout: `model.layers.{l}.{block_sparse_moe|mlp}.experts.{e}.{w1|w3|w2|gate_proj|up_proj|down_proj}.weight`;
     transformers 5's fused layout: `model.layers.{l}.{block_sparse_moe|mlp}.experts.{gate_up_proj|down_proj}`,
     gpt-oss's with `_bias` and MXFP4 `_blocks`/`_scales` tensors);
  2. any other name containing `.experts.` is refused (a layout we do not know);
  3. every remaining name is dense: drop a leading `model.`, canonicalise
     transformers 5's in-memory Mixtral router name `mlp.gate` to the on-disk
     `block_sparse_moe.gate` (so the model sees one name whatever way the file
     was written), and split on '.' into a nested-dict path.
Dense tensors are grouped for saving: one group per decoder layer, one per other
top-level module (embed_tokens, norm, lm_head).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from emoe_jax.checkpoint.errors import CheckpointError

_PER_EXPERT = re.compile(
    r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
    r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
# transformers 5 fused layout; gpt-oss adds biases and, MXFP4-quantized, _blocks/_scales pairs.
_FUSED = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(gate_up|down)_proj"
                    r"(|_bias|_blocks|_scales)$")
# Mixtral's w1/w3/w2 are the gate/up/down projections.
_ROLE = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


@dataclass(frozen=True)
class ExpertPiece:
    """One routed-expert tensor of the source: per-expert (expert set) or fused (expert None)."""

    hf_name: str
    layer: int  # decoder-layer index
    expert: int | None
    role: str  # 'gate', 'up', 'down' (per-expert) or 'gate_up', 'down' (+ '_bias', '_blocks', '_scales') (fused)


def parse_expert_name(name: str) -> ExpertPiece | None:
    m = _PER_EXPERT.match(name)
    if m:
        return ExpertPiece(name, int(m.group(1)), int(m.group(2)), _ROLE[m.group(3)])
    m = _FUSED.match(name)
    if m:
        return ExpertPiece(name, int(m.group(1)), None, m.group(2) + m.group(3))
    if ".experts." in name and ".shared_experts." not in name:
        raise CheckpointError(
            f"tensor {name!r} looks like a routed expert but matches no known layout "
            "(per-expert w1/w2/w3 or gate_proj/up_proj/down_proj, or fused gate_up_proj/down_proj)"
        )
    return None


def dense_path(name: str, family: str) -> tuple[str, ...]:
    """Nested-dict path of a dense tensor, e.g. ('layers', '0', 'self_attn', 'q_proj', 'weight')."""
    parts = name.split(".")
    if parts[0] == "model" and len(parts) > 1:
        parts = parts[1:]
    if family == "mixtral" and len(parts) >= 4 and parts[0] == "layers" and parts[2] == "mlp" and parts[3] == "gate":
        parts[2] = "block_sparse_moe"
    if any(p == "" for p in parts):
        raise CheckpointError(f"tensor name {name!r} has an empty component")
    return tuple(parts)


def group_of(path: tuple[str, ...]) -> str:
    """Dense save group: 'layers_{l}' for decoder-layer tensors, else the top-level module name."""
    if path[0] == "layers" and len(path) > 2:
        return f"layers_{path[1]}"
    return path[0]
