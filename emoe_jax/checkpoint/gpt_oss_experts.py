"""gpt-oss's fused expert tensors -> one expert in our orientation, biases folded in.

Source tensors of MoE layer l (`model.layers.{l}.mlp.experts.*`), E experts, H hidden, I inner:
  gate_up_proj [E, H, 2I]  (x @ W orientation; gate and up *interleaved*: gate = columns 0::2,
                            up = columns 1::2), gate_up_proj_bias [E, 2I] (same interleave);
  down_proj    [E, I, H],  down_proj_bias [E, H];
  or, MXFP4-quantized (quantization_config.quant_method 'mxfp4'), instead of each weight:
  {name}_blocks [E, out, in/32, 16] uint8 + {name}_scales [E, out, in/32] uint8 (out x in orientation).
Our expert: gate/up [H+1, I] and down [I+1, H], the bias in the extra last row (see
model.moe.ExpertAct), so a device slot still holds three arrays.
"""

from __future__ import annotations

import numpy as np

from emoe_jax.checkpoint.dequant_mxfp4 import dequantize_mxfp4
from emoe_jax.config import MoEConfig

ROLES = ("gate_up", "down", "gate_up_bias", "down_bias", "gate_up_blocks", "gate_up_scales",
         "down_blocks", "down_scales")


def fused_shapes(cfg: MoEConfig) -> dict[str, tuple[int, ...]]:
    """Expected shape of each gpt-oss fused expert tensor, by role."""
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    return {"gate_up": (e, h, 2 * i), "down": (e, i, h), "gate_up_bias": (e, 2 * i), "down_bias": (e, h),
            "gate_up_blocks": (e, 2 * i, h // 32, 16), "gate_up_scales": (e, 2 * i, h // 32),
            "down_blocks": (e, h, i // 32, 16), "down_scales": (e, h, i // 32)}


def missing_roles(present: set[str]) -> list[str]:
    """Roles a layer still needs: each weight plain or as blocks+scales, and both biases."""
    missing = [r for r in ("gate_up_bias", "down_bias") if r not in present]
    for w in ("gate_up", "down"):
        if w not in present and not {f"{w}_blocks", f"{w}_scales"} <= present:
            missing.append(w)
    return missing


def _weight(read, names: dict[str, str], w: str) -> np.ndarray:
    """One expert's weight `w` in x @ W orientation ([in, out]), float32 when quantized."""
    if w in names:
        return read(names[w])
    return dequantize_mxfp4(read(names[f"{w}_blocks"]), read(names[f"{w}_scales"])).T


def read_expert(read, names: dict[str, str]) -> dict[str, np.ndarray]:
    """read(name) -> that tensor's rows of this expert. Returns gate/up [H+1, I], down [I+1, H]."""
    gate_up = _weight(read, names, "gate_up")  # [H, 2I]
    down = _weight(read, names, "down")  # [I, H]
    gu_bias, d_bias = read(names["gate_up_bias"]), read(names["down_bias"])  # [2I], [H]
    dt = np.result_type(gate_up.dtype, gu_bias.dtype)
    gate = np.concatenate([gate_up[:, 0::2], gu_bias[None, 0::2]]).astype(dt)
    up = np.concatenate([gate_up[:, 1::2], gu_bias[None, 1::2]]).astype(dt)
    down = np.concatenate([down, d_bias[None, :]]).astype(np.result_type(down.dtype, d_bias.dtype))
    return {"gate": gate, "up": up, "down": down}
