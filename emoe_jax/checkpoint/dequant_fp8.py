"""Block-scaled FP8 checkpoints (DeepSeek-V3/R1, Kimi-K2, ...) and multi-token-prediction layers,
as the converter sees them.

An FP8 release stores each quantized linear weight `W` [R, C] as `float8_e4m3fn` next to
`W_scale_inv` [ceil(R/br), ceil(C/bc)] float32 (`quantization_config.weight_block_size` =
[br, bc], 128x128 for DeepSeek-V3); the real weight is `W[i, j] * scale_inv[i // br, j // bc]`
(DeepSeek's `weight_dequant`, transformers' `Fp8Dequantize`). Unquantized tensors (norms,
embeddings, routers) are stored as they are.

`ConverterSource` wraps an `HFSource` so the converter needs no FP8 knowledge:
  1. the `*_scale_inv` tensors are hidden from `location` and paired with their weights;
  2. `read` of a quantized weight returns it dequantized to `output_dtype` (the conversion's
     target dtype), one block row at a time, so the extra memory is one block row in float32;
  3. tensors of decoder layers at or beyond `num_hidden_layers` (the multi-token-prediction
     layer DeepSeek-V3 and GLM-4.5 ship as layer 61 / 92) are skipped with a note: generation
     does not use them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from emoe_jax.checkpoint.errors import CheckpointError
from emoe_jax.checkpoint.safetensors_reader import HFSource, TensorInfo

SCALE_SUFFIX = "_scale_inv"  # 'x.weight' -> 'x.weight_scale_inv'
FP8_DTYPE = np.dtype(ml_dtypes.float8_e4m3fn)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def dequantize_fp8_blocks(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int],
                          out_dtype: np.dtype, name: str = "tensor") -> np.ndarray:
    """weight [..., R, C] float8_e4m3fn, scale_inv [..., ceil(R/br), ceil(C/bc)] -> [..., R, C] out_dtype.

    Each value is multiplied by its block's scale in float32 and rounded once to out_dtype,
    as transformers does. Ragged edge blocks (R or C not a multiple of the block) are allowed:
    DeepSeek-V3's kv_a_proj_with_mqa has 576 rows = 4.5 blocks.
    """
    br, bc = block
    rows, cols = weight.shape[-2:]
    want = (*weight.shape[:-2], math.ceil(rows / br), math.ceil(cols / bc))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(
            f"{name}: scale tensor has shape {tuple(scale_inv.shape)}, expected {want} for a weight of shape "
            f"{tuple(weight.shape)} in {br}x{bc} blocks (quantization_config.weight_block_size)"
        )
    if scale_inv.dtype == np.uint8:  # UE8M0 exponents: 2 ** (byte - 127), as transformers reads them
        scale = np.exp2(scale_inv.astype(np.float32) - 127.0)
    else:
        scale = scale_inv.astype(np.float32)
    out = np.empty(weight.shape, out_dtype)
    for i in range(want[-2]):
        r0, r1 = i * br, min(rows, (i + 1) * br)
        s = np.repeat(scale[..., i : i + 1, :], bc, axis=-1)[..., :cols]  # [..., 1, C]
        out[..., r0:r1, :] = (weight[..., r0:r1, :].astype(np.float32) * s).astype(out_dtype)
    return out


def _decoder_layer(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


class ConverterSource:
    """An HFSource with FP8 weights dequantized on read, scales hidden, and MTP layers skipped.

    Attributes the converter does not use here (dir, files, file_list, ...) are the source's.
    """

    def __init__(self, source: HFSource, hf_config: Mapping[str, Any], *, note=None):
        self._src = source
        qc = hf_config.get("quantization_config") or {}
        self.block = tuple(int(b) for b in qc["weight_block_size"]) if qc.get("quant_method") == "fp8" else None
        self.output_dtype = np.dtype(ml_dtypes.bfloat16)  # the converter sets its target dtype
        num_layers = int(hf_config.get("num_hidden_layers") or 0)
        self.skipped = sorted(n for n in source.location
                              if (layer := _decoder_layer(n)) is not None and layer >= num_layers > 0)
        skipped = set(self.skipped)
        names = [n for n in source.location if n not in skipped]
        scales = {n for n in names if n.endswith(SCALE_SUFFIX)}
        if scales and self.block is None:
            raise CheckpointError(
                f"tensor {min(scales)!r} is an FP8 scale but config.json has no "
                "quantization_config with quant_method 'fp8' and weight_block_size"
            )
        self.scale_of: dict[str, str] = {}
        for n in names:
            if n in scales:
                weight = n[: -len(SCALE_SUFFIX)]
                if weight not in source.location:
                    raise CheckpointError(f"FP8 scale {n!r} has no weight {weight!r}; is a shard missing?")
                continue
            info = source.info(n)
            if n + SCALE_SUFFIX in scales:
                if info.dtype != FP8_DTYPE:
                    raise CheckpointError(f"tensor {n!r} has a scale but dtype {info.dtype}, not float8_e4m3fn")
                self.scale_of[n] = n + SCALE_SUFFIX
            elif info.dtype.name.startswith("float8"):
                raise CheckpointError(f"FP8 tensor {n!r} has no {n + SCALE_SUFFIX!r}: cannot dequantize it")
        self.location = {n: f for n, f in source.location.items() if n not in skipped and n not in scales}
        if self.skipped:
            layers = sorted({_decoder_layer(n) for n in self.skipped})
            msg = (f"note: skipping {len(self.skipped)} tensors of decoder layer(s) {layers} beyond "
                   f"num_hidden_layers={num_layers} (the multi-token-prediction module, unused for generation)")
            (note or (lambda m: print(m, file=sys.stderr)))(msg)

    def info(self, name: str) -> TensorInfo:
        info = self._src.info(name)
        if name in self.scale_of:  # byte counts stay the source's (progress is over source bytes)
            return dataclasses.replace(info, dtype=self.output_dtype)
        return info

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """A tensor, or rows [start, stop) of its first axis; quantized weights come dequantized."""
        if name not in self.scale_of:
            return self._src.read(name, start, stop)
        scale_name = self.scale_of[name]
        if len(self._src.info(name).shape) > 2:  # fused experts [E, R, C]: slice experts, then dequantize
            return dequantize_fp8_blocks(self._src.read(name, start, stop), self._src.read(scale_name, start, stop),
                                         self.block, self.output_dtype, name)
        full = dequantize_fp8_blocks(self._src.read(name), self._src.read(scale_name), self.block,
                                     self.output_dtype, name)
        return full if start is None and stop is None else full[start:stop]

    def __getattr__(self, attr: str) -> Any:
        if attr == "_src":  # not set yet (failed __init__, copies): do not recurse
            raise AttributeError(attr)
        return getattr(self._src, attr)


def open_converter_source(hf_dir: str | Path) -> ConverterSource:
    """The HF checkpoint at hf_dir as the converter reads it (its config.json must exist)."""
    hf_config = json.loads((Path(hf_dir) / "config.json").read_text())
    source = HFSource(hf_dir)
    try:
        return ConverterSource(source, hf_config)
    except BaseException:
        source.close()
        raise
