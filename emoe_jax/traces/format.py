"""The on-disk routing-trace format: one directory per trace set.

A trace set records, for every prompt, which routed experts each token chose in
each MoE layer (and optionally the router weights and router inputs). It is the
common currency between trace producers (the engine, the MoE-Beyond importer)
and consumers (the simulator, predictor training). See docs/traces.md.

Layout of a trace-set directory::

    meta.json       format name + version, TraceMeta fields, counts
    prompts.jsonl   one object per prompt: prompt_id, task, text, n_tokens, n_prefill, tokens
    offsets.npy     [P+1] int64   prompt i owns rows [offsets[i], offsets[i+1])
    token_ids.npy   [N] int32     -1 where unknown
    experts.npy     [N, L, k] int16
    weights.npy     [N, L, k] float16   (optional)
    hidden.npy      [N, L, H] float16   (optional; present iff meta.hidden_size is set)

Writing (TraceWriter):
  1. create a hidden temporary directory beside the destination;
  2. for each added prompt, validate it against the meta and append its rows to
     the open .npy files (whose headers reserve room for any row count);
  3. on close, rewrite each .npy header with the final row count, write
     offsets.npy, prompts.jsonl and meta.json, then rename the temporary
     directory to the destination (atomic on one file system). On an exception
     inside the `with` block the temporary directory is deleted instead.

Reading (TraceSet.load):
  1. parse meta.json and prompts.jsonl;
  2. memory-map every .npy file (no data is read until a prompt is accessed);
  3. check every shape, dtype and count against each other and raise
     TraceFormatError naming the file and the problem when they disagree.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from emoe_jax.atomic_io import replace_dir
from emoe_jax.errors import EmoeError

FORMAT_NAME = "emoe_jax.traces"
FORMAT_VERSION = 1

META_FILE = "meta.json"
PROMPTS_FILE = "prompts.jsonl"
OFFSETS_FILE = "offsets.npy"
TOKEN_IDS_FILE = "token_ids.npy"
EXPERTS_FILE = "experts.npy"
WEIGHTS_FILE = "weights.npy"
HIDDEN_FILE = "hidden.npy"

TOKEN_ID_DTYPE = np.dtype("<i4")
EXPERT_DTYPE = np.dtype("<i2")
WEIGHT_DISK_DTYPE = np.dtype("<f2")  # halves the file; router weights need no more precision
WEIGHT_DTYPE = np.dtype(np.float32)  # what PromptTrace.weights holds
HIDDEN_DTYPE = np.dtype("<f2")
OFFSET_DTYPE = np.dtype("<i8")


class TraceFormatError(EmoeError):
    """A trace set on disk (or handed to the writer) is missing, corrupt or inconsistent."""


@dataclass(frozen=True)
class TraceMeta:
    """What was traced: the model and the shape of its routing."""

    model: str  # e.g. "deepseek-v2-lite-chat" or a checkpoint path
    num_layers: int  # number of MoE layers recorded (L)
    num_experts: int  # routed experts per layer (E)
    top_k: int  # k
    moe_layer_ids: tuple[int, ...]  # original decoder-layer index of each recorded MoE layer (len L)
    hidden_size: int | None  # set when router inputs are stored
    source: str  # free text: where the traces came from

    def __post_init__(self) -> None:
        # Accept lists (e.g. from JSON) but store a tuple so the meta stays hashable.
        object.__setattr__(self, "moe_layer_ids", tuple(int(i) for i in self.moe_layer_ids))
        for name in ("num_layers", "num_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise TraceFormatError(f"TraceMeta.{name} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise TraceFormatError(
                f"TraceMeta.top_k={self.top_k} exceeds num_experts={self.num_experts}"
            )
        if len(self.moe_layer_ids) != self.num_layers:
            raise TraceFormatError(
                f"TraceMeta.moe_layer_ids has {len(self.moe_layer_ids)} entries but "
                f"num_layers={self.num_layers}; give one decoder-layer index per recorded layer"
            )
        if self.hidden_size is not None and (
            not isinstance(self.hidden_size, (int, np.integer)) or self.hidden_size < 1
        ):
            raise TraceFormatError(
                f"TraceMeta.hidden_size must be None or a positive int, got {self.hidden_size!r}"
            )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["moe_layer_ids"] = list(self.moe_layer_ids)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TraceMeta:
        fields = ("model", "num_layers", "num_experts", "top_k", "moe_layer_ids", "hidden_size", "source")
        missing = [f for f in fields if f not in d]
        if missing:
            raise TraceFormatError(f"trace meta lacks field(s) {missing}")
        return cls(**{f: d[f] for f in fields})


@dataclass(frozen=True, eq=False)  # eq=False: element-wise array comparison has no single truth value
class PromptTrace:
    """The routing of one prompt: T tokens through L MoE layers."""

    prompt_id: int  # stable id; consecutive ids of one conversation stay in order
    task: str  # task label, "" if unknown
    text: str  # prompt text, "" if unknown
    token_ids: np.ndarray  # [T] int32, -1 where unknown
    experts: np.ndarray  # [T, L, k] int16: top-k routed expert ids (a set; rank order where known)
    weights: np.ndarray | None  # [T, L, k] float32 router weights, None if not recorded
    n_prefill: int  # tokens [0, n_prefill) are prompt tokens, [n_prefill, T) generated
    hidden: np.ndarray | None = None  # [T, L, H] float16 router inputs, optional
    tokens: tuple[str, ...] | None = None  # token strings where known (imported traces), else None

    @property
    def n_tokens(self) -> int:
        return int(self.experts.shape[0])


def _check_prompt(trace: PromptTrace, meta: TraceMeta) -> None:
    """Raise TraceFormatError unless `trace` fits `meta` (shapes, ranges, counts)."""
    where = f"prompt {trace.prompt_id}"
    L, k = meta.num_layers, meta.top_k
    experts = np.asarray(trace.experts)
    if experts.ndim != 3 or experts.shape[1:] != (L, k):
        raise TraceFormatError(f"{where}: experts has shape {experts.shape}, expected [T, {L}, {k}]")
    if not np.issubdtype(experts.dtype, np.integer):
        raise TraceFormatError(f"{where}: experts must hold integers, got dtype {experts.dtype}")
    T = experts.shape[0]
    if T and (experts.min() < 0 or experts.max() >= meta.num_experts):
        raise TraceFormatError(
            f"{where}: expert ids span [{experts.min()}, {experts.max()}], outside [0, {meta.num_experts})"
        )
    token_ids = np.asarray(trace.token_ids)
    if token_ids.shape != (T,) or not np.issubdtype(token_ids.dtype, np.integer):
        raise TraceFormatError(f"{where}: token_ids has shape {token_ids.shape} dtype {token_ids.dtype}, expected [{T}] int")
    if trace.weights is not None and np.shape(trace.weights) != (T, L, k):
        raise TraceFormatError(f"{where}: weights has shape {np.shape(trace.weights)}, expected [{T}, {L}, {k}]")
    if meta.hidden_size is None:
        if trace.hidden is not None:
            raise TraceFormatError(f"{where}: has hidden states but meta.hidden_size is None")
    else:
        expected = (T, L, meta.hidden_size)
        if trace.hidden is None or np.shape(trace.hidden) != expected:
            got = None if trace.hidden is None else np.shape(trace.hidden)
            raise TraceFormatError(f"{where}: hidden has shape {got}, expected {list(expected)} (meta.hidden_size is set)")
    if not 0 <= trace.n_prefill <= T:
        raise TraceFormatError(f"{where}: n_prefill={trace.n_prefill} outside [0, {T}]")
    if trace.tokens is not None and len(trace.tokens) != T:
        raise TraceFormatError(f"{where}: {len(trace.tokens)} token strings for {T} tokens")


# ---------------------------------------------------------------- .npy streaming

_NPY_MAGIC = b"\x93NUMPY\x01\x00"
_NPY_ALIGN = 64
_MAX_ROWS_DIGITS = 19  # room for any int64 row count in the reserved header


def _npy_header(dtype: np.dtype, shape: tuple[int, ...], length: int | None = None) -> bytes:
    """A version-1.0 .npy header; padded with spaces to `length` bytes when given.

    The writer emits a header sized for the largest row count first and rewrites
    it with the real count on close, so rows can be streamed without knowing N.
    """
    d = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    text = repr(d).encode("latin1")
    if length is None:
        body = len(_NPY_MAGIC) + 2 + len(text) + 1
        length = -(-body // _NPY_ALIGN) * _NPY_ALIGN
    pad = length - len(_NPY_MAGIC) - 2 - len(text) - 1
    if pad < 0:
        raise AssertionError("npy header outgrew its reserved space")
    header_len = length - len(_NPY_MAGIC) - 2
    return _NPY_MAGIC + header_len.to_bytes(2, "little") + text + b" " * pad + b"\n"


class _NpyAppender:
    """Append rows of a fixed trailing shape to a .npy file; finalize the header on close."""

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple[int, ...]):
        self.path, self.dtype, self.row_shape = path, np.dtype(dtype), tuple(row_shape)
        self.rows = 0
        self._header_len = len(_npy_header(self.dtype, (10**_MAX_ROWS_DIGITS - 1, *self.row_shape)))
        self._file: BinaryIO = open(path, "wb")
        self._file.write(b"\0" * self._header_len)

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        assert rows.shape[1:] == self.row_shape, (rows.shape, self.row_shape)
        self._file.write(rows.tobytes())
        self.rows += rows.shape[0]

    def close(self) -> None:
        self._file.seek(0)
        self._file.write(_npy_header(self.dtype, (self.rows, *self.row_shape), self._header_len))
        self._file.close()

    def discard(self) -> None:
        self._file.close()


# ---------------------------------------------------------------- writer


class TraceWriter:
    """Write a trace set prompt by prompt; the directory appears only when complete.

    Use as a context manager. Prompts are stored in the order they are added.
    `overwrite=True` replaces an existing trace set at `path` (the old one is
    removed only after the new one is complete).
    """

    def __init__(self, path: str | os.PathLike, meta: TraceMeta, *, overwrite: bool = False):
        self.path = Path(path)
        self.meta = meta
        self.overwrite = overwrite
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} already exists; remove it or pass overwrite=True")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        L, k = meta.num_layers, meta.top_k
        self._token_ids = _NpyAppender(self._tmp / TOKEN_IDS_FILE, TOKEN_ID_DTYPE, ())
        self._experts = _NpyAppender(self._tmp / EXPERTS_FILE, EXPERT_DTYPE, (L, k))
        self._hidden = (
            _NpyAppender(self._tmp / HIDDEN_FILE, HIDDEN_DTYPE, (L, meta.hidden_size))
            if meta.hidden_size is not None
            else None
        )
        self._weights: _NpyAppender | None = None  # created by the first prompt that has weights
        self._has_weights: bool | None = None  # decided by the first prompt
        self._offsets = [0]
        self._prompt_lines: list[str] = []
        self._seen_ids: set[int] = set()
        self._closed = False

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def add(self, trace: PromptTrace) -> None:
        if self._closed:
            raise RuntimeError("TraceWriter.add after close/abort")
        _check_prompt(trace, self.meta)
        pid = int(trace.prompt_id)
        if pid in self._seen_ids:
            raise TraceFormatError(f"prompt_id {pid} added twice; prompt ids must be unique")
        has_weights = trace.weights is not None
        if self._has_weights is None:
            self._has_weights = has_weights
            if has_weights:
                self._weights = _NpyAppender(
                    self._tmp / WEIGHTS_FILE, WEIGHT_DISK_DTYPE, (self.meta.num_layers, self.meta.top_k)
                )
        elif has_weights != self._has_weights:
            raise TraceFormatError(
                f"prompt {pid}: weights {'present' if has_weights else 'missing'}, unlike earlier "
                "prompts; a trace set records weights for all prompts or for none"
            )
        self._seen_ids.add(pid)
        self._token_ids.append(trace.token_ids)
        self._experts.append(trace.experts)
        if self._weights is not None:
            self._weights.append(trace.weights)
        if self._hidden is not None:
            self._hidden.append(trace.hidden)
        T = trace.n_tokens
        self._offsets.append(self._offsets[-1] + T)
        record = {
            "prompt_id": pid,
            "task": trace.task,
            "text": trace.text,
            "n_tokens": T,
            "n_prefill": int(trace.n_prefill),
            "tokens": None if trace.tokens is None else list(trace.tokens),
        }
        self._prompt_lines.append(json.dumps(record, ensure_ascii=False))

    def _appenders(self) -> list[_NpyAppender]:
        return [a for a in (self._token_ids, self._experts, self._weights, self._hidden) if a is not None]

    def close(self) -> None:
        if self._closed:
            return
        try:
            for appender in self._appenders():
                appender.close()
            np.save(self._tmp / OFFSETS_FILE, np.asarray(self._offsets, dtype=OFFSET_DTYPE))
            with open(self._tmp / PROMPTS_FILE, "w", encoding="utf-8") as f:
                for line in self._prompt_lines:
                    f.write(line + "\n")
            meta_doc = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                **self.meta.to_json(),
                "num_prompts": len(self._prompt_lines),
                "num_tokens": self._offsets[-1],
                "has_weights": bool(self._has_weights),
                "has_hidden": self._hidden is not None,
            }
            # One key per line, values on one line: readable, and short for 100s of layers.
            lines = [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in meta_doc.items()]
            (self._tmp / META_FILE).write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")
            self._publish()
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def _publish(self) -> None:
        # mkdtemp made the directory private (0o700); published sets are readable by all.
        os.chmod(self._tmp, 0o755)
        if self.path.exists() and not self.overwrite:
            raise FileExistsError(f"{self.path} appeared while writing; the new trace set was not saved")
        replace_dir(self._tmp, self.path)

    def abort(self) -> None:
        """Discard everything written so far; the destination is left untouched."""
        if self._closed:
            return
        self._closed = True
        for appender in self._appenders():
            try:
                appender.discard()
            except OSError:
                pass
        shutil.rmtree(self._tmp, ignore_errors=True)


# ---------------------------------------------------------------- reader


@dataclass(frozen=True)
class _Columns:
    """Row-concatenated arrays of a trace set, shared by every view over it."""

    offsets: np.ndarray  # [P+1] int64
    token_ids: np.ndarray  # [N] int32
    experts: np.ndarray  # [N, L, k] int16
    weights: np.ndarray | None  # [N, L, k] float16
    hidden: np.ndarray | None  # [N, L, H] float16
    records: list[dict[str, Any]]  # [P] prompts.jsonl objects


class TraceSet:
    """A read-only sequence of PromptTrace; arrays are memory-mapped when loaded from disk.

    `select` returns a view over a subset of prompts (in the given order) that
    shares the underlying arrays, e.g. for train/validation splits.
    """

    def __init__(self, meta: TraceMeta, columns: _Columns, rows: np.ndarray | None = None):
        self.meta = meta
        self._cols = columns
        P = len(columns.records)
        self._rows = np.arange(P, dtype=np.int64) if rows is None else rows  # [P_view] into columns
        self.prompt_ids = np.asarray(  # [P_view] int64
            [columns.records[r]["prompt_id"] for r in self._rows], dtype=np.int64
        )
        self.tasks: list[str] = [columns.records[r]["task"] for r in self._rows]

    # -- construction

    @classmethod
    def load(cls, path: str | os.PathLike, *, check_values: bool = True) -> TraceSet:
        """Open the trace set at `path`; shapes are always checked against each other.

        `check_values` also scans experts.npy and token_ids.npy once for ids out
        of range (about 20 ms for 5M token-layer rows); pass False to touch no data.
        """
        meta, columns = _load_columns(Path(path))
        if check_values:
            _check_values(Path(path), meta, columns)
        return cls(meta, columns)

    @staticmethod
    def from_prompts(meta: TraceMeta, prompts: list[PromptTrace]) -> TraceSet:
        """An in-memory trace set (for tests); validated exactly like written ones."""
        ids = set()
        has_weights = {p.weights is not None for p in prompts}
        if len(has_weights) > 1:
            raise TraceFormatError("some prompts have weights and some do not; give all or none")
        for p in prompts:
            _check_prompt(p, meta)
            if p.prompt_id in ids:
                raise TraceFormatError(f"prompt_id {p.prompt_id} appears twice; prompt ids must be unique")
            ids.add(p.prompt_id)
        L, k = meta.num_layers, meta.top_k
        offsets = np.zeros(len(prompts) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([p.n_tokens for p in prompts])

        def cat(parts: list[np.ndarray], dtype: np.dtype, row_shape: tuple[int, ...]) -> np.ndarray:
            if not parts:
                return np.zeros((0, *row_shape), dtype=dtype)
            return np.concatenate([np.asarray(a, dtype=dtype) for a in parts], axis=0)

        weights = None
        if prompts and has_weights == {True}:
            # Rounded to the on-disk dtype so in-memory and loaded sets read back identically.
            weights = cat([p.weights for p in prompts], WEIGHT_DISK_DTYPE, (L, k))
        hidden = None
        if meta.hidden_size is not None:
            hidden = cat([p.hidden for p in prompts], HIDDEN_DTYPE, (L, meta.hidden_size))
        records = [
            {
                "prompt_id": int(p.prompt_id),
                "task": p.task,
                "text": p.text,
                "n_tokens": p.n_tokens,
                "n_prefill": int(p.n_prefill),
                "tokens": None if p.tokens is None else list(p.tokens),
            }
            for p in prompts
        ]
        columns = _Columns(
            offsets=offsets,
            token_ids=cat([p.token_ids for p in prompts], TOKEN_ID_DTYPE, ()),
            experts=cat([p.experts for p in prompts], EXPERT_DTYPE, (L, k)),
            weights=weights,
            hidden=hidden,
            records=records,
        )
        return TraceSet(meta, columns)

    # -- sequence protocol

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> PromptTrace:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"TraceSet index must be an int, got {type(i).__name__}; use select() for subsets")
        n = len(self._rows)
        if not -n <= i < n:
            raise IndexError(f"prompt index {i} out of range for a trace set of {n} prompts")
        r = int(self._rows[i])
        c = self._cols
        start, stop = int(c.offsets[r]), int(c.offsets[r + 1])
        rec = c.records[r]
        tokens = rec.get("tokens")
        return PromptTrace(
            prompt_id=int(rec["prompt_id"]),
            task=rec["task"],
            text=rec["text"],
            token_ids=c.token_ids[start:stop],
            experts=c.experts[start:stop],
            weights=None if c.weights is None else np.asarray(c.weights[start:stop], dtype=WEIGHT_DTYPE),
            n_prefill=int(rec["n_prefill"]),
            hidden=None if c.hidden is None else c.hidden[start:stop],
            tokens=None if tokens is None else tuple(tokens),
        )

    def __iter__(self) -> Iterator[PromptTrace]:
        for i in range(len(self)):
            yield self[i]

    # -- views and summaries

    def select(self, indices: Sequence[int] | np.ndarray | slice) -> TraceSet:
        """A view over prompts `indices` (positions in this set; ints, a slice or a bool mask)."""
        n = len(self._rows)
        if isinstance(indices, slice):
            idx = np.arange(n, dtype=np.int64)[indices]
        else:
            idx = np.asarray(indices)
            if idx.dtype == bool:
                if idx.shape != (n,):
                    raise ValueError(f"boolean mask has shape {idx.shape}, expected ({n},)")
                idx = np.flatnonzero(idx)
            elif idx.size == 0:
                idx = np.zeros(0, dtype=np.int64)
            elif not np.issubdtype(idx.dtype, np.integer) or idx.ndim != 1:
                raise TypeError(f"select() takes a 1-D sequence of ints, a slice or a bool mask, got {idx.dtype} {idx.shape}")
            if idx.size and (idx.min() < -n or idx.max() >= n):
                raise IndexError(f"select() index out of range for a trace set of {n} prompts")
            idx = np.where(idx < 0, idx + n, idx).astype(np.int64)
        return TraceSet(self.meta, self._cols, self._rows[idx])

    @property
    def n_tokens(self) -> int:
        """Total tokens over the prompts of this view."""
        o = self._cols.offsets
        return int((o[self._rows + 1] - o[self._rows]).sum())

    @property
    def has_weights(self) -> bool:
        return self._cols.weights is not None

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"TraceSet(model={m.model!r}, prompts={len(self)}, tokens={self.n_tokens}, "
            f"L={m.num_layers}, E={m.num_experts}, k={m.top_k}, weights={self.has_weights}, "
            f"hidden={self._cols.hidden is not None})"
        )


def _check_values(path: Path, meta: TraceMeta, c: _Columns) -> None:
    if c.experts.size and (c.experts.min() < 0 or c.experts.max() >= meta.num_experts):
        raise TraceFormatError(
            f"{path / EXPERTS_FILE} holds expert ids in [{c.experts.min()}, {c.experts.max()}], "
            f"outside [0, {meta.num_experts}); the file is corrupt or meta.json is wrong"
        )
    if c.token_ids.size and c.token_ids.min() < -1:
        raise TraceFormatError(f"{path / TOKEN_IDS_FILE} holds token ids below -1; the file is corrupt")


def _load_columns(path: Path) -> tuple[TraceMeta, _Columns]:
    if not path.is_dir():
        raise FileNotFoundError(f"no trace set at {path} (expected a directory with {META_FILE})")

    def need(name: str) -> Path:
        p = path / name
        if not p.is_file():
            raise TraceFormatError(f"trace set {path} is incomplete: {name} is missing")
        return p

    try:
        meta_doc = json.loads(need(META_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TraceFormatError(f"{path / META_FILE} is not valid JSON: {e}") from None
    if not isinstance(meta_doc, dict) or meta_doc.get("format") != FORMAT_NAME:
        raise TraceFormatError(f"{path / META_FILE} does not describe an {FORMAT_NAME} trace set")
    if meta_doc.get("version") != FORMAT_VERSION:
        raise TraceFormatError(
            f"{path / META_FILE}: format version {meta_doc.get('version')!r}, this code reads {FORMAT_VERSION}"
        )
    try:
        meta = TraceMeta.from_json(meta_doc)
    except (TypeError, ValueError) as e:
        raise TraceFormatError(f"{path / META_FILE}: {e}") from None

    records: list[dict[str, Any]] = []
    keys = {"prompt_id", "task", "text", "n_tokens", "n_prefill"}
    with open(need(PROMPTS_FILE), encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceFormatError(f"{path / PROMPTS_FILE} line {line_no} is not valid JSON: {e}") from None
            if not isinstance(rec, dict) or not keys <= rec.keys():
                raise TraceFormatError(f"{path / PROMPTS_FILE} line {line_no} lacks one of {sorted(keys)}")
            records.append(rec)

    def load_npy(name: str, dtype: np.dtype, shape: tuple[int | None, ...]) -> np.ndarray:
        p = need(name)
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise TraceFormatError(f"{p} is not a readable .npy file (corrupt or truncated): {e}") from None
        if arr.dtype != dtype:
            raise TraceFormatError(f"{p} has dtype {arr.dtype}, expected {dtype}")
        if arr.ndim != len(shape) or any(s is not None and a != s for a, s in zip(arr.shape, shape)):
            want = ["?" if s is None else s for s in shape]
            raise TraceFormatError(f"{p} has shape {list(arr.shape)}, expected {want}")
        return arr

    P = len(records)
    offsets = np.asarray(load_npy(OFFSETS_FILE, OFFSET_DTYPE, (P + 1,)))
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise TraceFormatError(f"{path / OFFSETS_FILE} must start at 0 and never decrease")
    N = int(offsets[-1])
    L, k = meta.num_layers, meta.top_k
    n_tokens = np.diff(offsets)
    for i, rec in enumerate(records):
        if rec["n_tokens"] != n_tokens[i]:
            raise TraceFormatError(
                f"{path / PROMPTS_FILE}: prompt {rec['prompt_id']} says n_tokens={rec['n_tokens']} "
                f"but offsets.npy gives it {n_tokens[i]} rows"
            )
        if not 0 <= rec["n_prefill"] <= rec["n_tokens"]:
            raise TraceFormatError(f"{path / PROMPTS_FILE}: prompt {rec['prompt_id']} has n_prefill outside [0, n_tokens]")
        if rec.get("tokens") is not None and len(rec["tokens"]) != rec["n_tokens"]:
            raise TraceFormatError(f"{path / PROMPTS_FILE}: prompt {rec['prompt_id']} has {len(rec['tokens'])} token strings for {rec['n_tokens']} tokens")
    if len({r["prompt_id"] for r in records}) != P:
        raise TraceFormatError(f"{path / PROMPTS_FILE}: prompt ids are not unique")

    token_ids = load_npy(TOKEN_IDS_FILE, TOKEN_ID_DTYPE, (N,))
    experts = load_npy(EXPERTS_FILE, EXPERT_DTYPE, (N, L, k))
    weights = load_npy(WEIGHTS_FILE, WEIGHT_DISK_DTYPE, (N, L, k)) if (path / WEIGHTS_FILE).exists() else None
    if meta_doc.get("has_weights") and weights is None:
        raise TraceFormatError(f"trace set {path} is incomplete: {WEIGHTS_FILE} is missing")
    hidden = None
    if meta.hidden_size is not None:
        hidden = load_npy(HIDDEN_FILE, HIDDEN_DTYPE, (N, L, meta.hidden_size))
    return meta, _Columns(offsets, token_ids, experts, weights, hidden, records)
