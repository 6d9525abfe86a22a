"""MXFP4 (OCP microscaling FP4) dequantization, as gpt-oss checkpoints store their experts.

A weight W [rows, cols] is stored as
  blocks [rows, cols/32, 16] uint8: two FP4 (E2M1) codes per byte, the low nibble first;
  scales [rows, cols/32]     uint8: one E8M0 exponent per 32 values, biased by 127.
Value = FP4_VALUES[code] * 2 ** (scale - 127), exactly transformers'
`integrations.mxfp4.convert_moe_packed_tensors` (which then transposes to [cols, rows]).

Every product is exact in float32 (a 2-bit mantissa times a power of two, within float32's
range for the exponents real checkpoints use), so casting the float32 result to bfloat16 equals
transformers' bfloat16 dequantization.
"""

from __future__ import annotations

import numpy as np

from emoe_jax.checkpoint.errors import CheckpointError

# E2M1 code -> value (codes 8..15 are the negatives, -0.0 included).
FP4_VALUES = np.array([+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> float32 [..., G*32] (source orientation)."""
    blocks, scales = np.asarray(blocks), np.asarray(scales)
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise CheckpointError(f"MXFP4 blocks/scales must be uint8, got {blocks.dtype} / {scales.dtype}")
    if blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise CheckpointError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not match "
                              "(expected blocks [..., G, 16] and scales [..., G])")
    out = np.empty(blocks.shape[:-1] + (32,), np.float32)  # [..., G, 32]
    out[..., 0::2] = FP4_VALUES[blocks & 0x0F]
    out[..., 1::2] = FP4_VALUES[blocks >> 4]
    out = np.ldexp(out, (scales.astype(np.int32) - 127)[..., None])
    return out.reshape(blocks.shape[:-2] + (blocks.shape[-2] * 32,))
