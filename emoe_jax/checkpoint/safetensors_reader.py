"""A streaming safetensors reader on plain file reads (no mmap, no torch).

Why not `safetensors.safe_open`: its "numpy" framework cannot return bfloat16, "flax"
puts every tensor on the default JAX device (the GPU on Colab), and "pt" needs torch.
It also reads through mmap, so every byte it touches stays in the process's resident
set until the kernel reclaims it. This reader parses the (documented, tiny) format
itself and reads one tensor, or one slice of its first axis, with `os.pread` into a
fresh numpy buffer, so the resident set stays near the largest tensor read.

Steps:
  1. read the 8-byte little-endian header length N and the N-byte JSON header;
  2. check every entry: known dtype, shape * itemsize == byte length, offsets inside
     the data section, and the data section no shorter than the last offset
     (a truncated download fails here, naming the file);
  3. `read(name, start, stop)` preads rows [start, stop) of axis 0 (contiguous in
     row-major order) and views them as the tensor's dtype.

`HFSource` maps tensor names to files for a single `model.safetensors` or a sharded
checkpoint with `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from emoe_jax.checkpoint.errors import SafetensorsError

# safetensors dtype tag -> numpy dtype (bf16 and fp8 through ml_dtypes).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}

# A header larger than this is not a real checkpoint (the format caps it at 100 MB).
_MAX_HEADER = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """One .safetensors file: validated header, and preads of tensors or axis-0 slices."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise SafetensorsError(f"safetensors file not found: {self.path}")
        self.size = self.path.stat().st_size
        self._fd: int | None = None
        self.tensors: dict[str, TensorInfo] = self._parse_header()

    # ---- header ---------------------------------------------------------------
    def _bad(self, why: str) -> SafetensorsError:
        return SafetensorsError(
            f"{self.path} is not a valid safetensors file ({why}); "
            "it may be corrupt or truncated: download it again"
        )

    def _parse_header(self) -> dict[str, TensorInfo]:
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise self._bad(f"only {len(head)} bytes long")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > _MAX_HEADER or 8 + n > self.size:
                raise self._bad(f"header length {n} does not fit a file of {self.size} bytes")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._bad(f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        data_start = 8 + n
        self.data_start = data_start
        tensors: dict[str, TensorInfo] = {}
        last_end = 0
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                tag, shape, (b, e) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise self._bad(f"malformed header entry for tensor {name!r}") from None
            if tag not in DTYPES:
                raise self._bad(f"tensor {name!r} has unsupported dtype {tag}")
            dtype = DTYPES[tag]
            if not 0 <= b <= e or e - b != math.prod(shape) * dtype.itemsize:
                raise self._bad(f"tensor {name!r}: offsets [{b}, {e}) do not match shape {shape} {tag}")
            tensors[name] = TensorInfo(name, dtype, shape, data_start + b, data_start + e)
            last_end = max(last_end, e)
        if data_start + last_end > self.size:
            raise self._bad(
                f"truncated: tensors need {data_start + last_end} bytes but the file has {self.size}"
            )
        return tensors

    # ---- data -----------------------------------------------------------------
    def _pread(self, nbytes: int, offset: int) -> np.ndarray:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        buf = np.empty(nbytes, np.uint8)
        view = memoryview(buf)
        done = 0
        while done < nbytes:  # pread may return short counts on large reads
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise self._bad(f"unexpected end of file at byte {offset + done}")
            done += got
        return buf

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Tensor `name`, or rows [start, stop) of its first axis, as a fresh numpy array."""
        info = self.tensors.get(name)
        if info is None:
            raise SafetensorsError(f"tensor {name!r} is not in {self.path}")
        if start is None and stop is None:
            return self._pread(info.nbytes, info.begin).view(info.dtype).reshape(info.shape)
        if not info.shape:
            raise SafetensorsError(f"tensor {name!r} in {self.path} is a scalar; cannot slice it")
        start = 0 if start is None else start
        stop = info.shape[0] if stop is None else stop
        if not 0 <= start <= stop <= info.shape[0]:
            raise SafetensorsError(f"rows [{start}, {stop}) outside tensor {name!r} of shape {info.shape}")
        row = math.prod(info.shape[1:]) * info.dtype.itemsize
        buf = self._pread((stop - start) * row, info.begin + start * row)
        return buf.view(info.dtype).reshape((stop - start, *info.shape[1:]))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()


class HFSource:
    """The safetensors files of a Hugging Face checkpoint directory and a name -> file map."""

    INDEX = "model.safetensors.index.json"
    SINGLE = "model.safetensors"

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {self.dir}")
        index = self.dir / self.INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SafetensorsError(f"{index} is not a valid safetensors index ({e})") from None
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (self.dir / n).is_file()]
            if missing:
                raise SafetensorsError(
                    f"shard(s) listed in {index} are missing: {', '.join(missing)}; download them"
                )
        elif (self.dir / self.SINGLE).is_file():
            weight_map, names = None, [self.SINGLE]
        else:
            names = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not names:
                raise FileNotFoundError(
                    f"no model.safetensors, {self.INDEX} or *.safetensors in {self.dir}"
                )
            weight_map = None
        self.files: dict[str, SafetensorsFile] = {n: SafetensorsFile(self.dir / n) for n in names}
        self.location: dict[str, str] = {}
        for fname, f in self.files.items():
            for tname in f.tensors:
                if tname in self.location:
                    raise SafetensorsError(
                        f"tensor {tname!r} appears in both {self.location[tname]} and {fname}"
                    )
                self.location[tname] = fname
        if weight_map is not None:
            for tname, fname in weight_map.items():
                if self.location.get(tname) != fname:
                    raise SafetensorsError(
                        f"{index}: tensor {tname!r} should be in {fname} but is not there; "
                        "the shard is corrupt or from another checkpoint"
                    )

    def info(self, name: str) -> TensorInfo:
        return self.files[self.location[name]].tensors[name]

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        if name not in self.location:
            raise SafetensorsError(f"tensor {name!r} is in none of the safetensors files of {self.dir}")
        return self.files[self.location[name]].read(name, start, stop)

    def file_list(self) -> list[dict]:
        return [{"name": n, "bytes": f.size} for n, f in self.files.items()]

    def fingerprint(self) -> dict:
        """Content fingerprint of the weights and config (see checkpoint/fingerprint.py)."""
        from emoe_jax.checkpoint.fingerprint import source_fingerprint

        return source_fingerprint([(f.path, f.data_start) for f in self.files.values()],
                                  [self.dir / "config.json", self.dir / self.INDEX])

    def close(self) -> None:
        for f in self.files.values():
            f.close()
