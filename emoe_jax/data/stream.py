"""Token streams and fixed-length training windows for language-model training.

`encode_corpus` turns one split of a corpus into one token stream per task:
every document becomes `<bos> tokens <eos>` and the documents of a task are
concatenated in corpus order (int32, shape [N_task]).

`random_batches` yields training batches forever:
  1. per row, draw a task uniformly (or by `task_weights`) with a seeded
     NumPy Generator;
  2. draw a start uniformly in [0, N_task - seq_len];
  3. gather the windows into tokens [B, T] with task_ids [B].
Windows never cross tasks (each task has its own stream); they may cross
document boundaries, which `<bos>`/`<eos>` mark. For next-token prediction
use `tokens[:, :-1]` as inputs and `tokens[:, 1:]` as targets (so ask for
seq_len = context + 1).

`sequential_batches` walks every task's stream in non-overlapping windows
(the evaluation order: deterministic, each token at most once), padding the
last batch with `<pad>` rows marked `valid = False`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from emoe_jax.atomic_io import write_atomic
from emoe_jax.data.corpus import Corpus
from emoe_jax.data.documents import check_split
from emoe_jax.data.errors import DataError
from emoe_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, load_tokenizer

_ENCODE_CHUNK = 256  # documents per encode_batch call: enough to use the Rust threads, bounded memory


@dataclasses.dataclass(frozen=True)
class TokenStreams:
    """One concatenated token stream per task, for one split."""

    tasks: tuple[str, ...]
    arrays: dict[str, np.ndarray]  # task -> [N_task] int32
    split: str
    vocab_size: int

    def task_id(self, task: str) -> int:
        if task not in self.tasks:
            raise DataError(f"unknown task {task!r}; streams hold {list(self.tasks)}")
        return self.tasks.index(task)

    def num_tokens(self) -> dict[str, int]:
        return {task: int(self.arrays[task].size) for task in self.tasks}

    def save(self, path: str | os.PathLike) -> Path:
        """Write an .npz (one array per task + metadata), atomically."""
        meta = {"tasks": list(self.tasks), "split": self.split, "vocab_size": self.vocab_size}
        return write_atomic(path, lambda tmp: np.savez(
            tmp, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            **{f"task_{i}": self.arrays[t] for i, t in enumerate(self.tasks)}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> TokenStreams:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; create it with TokenStreams.save or `encode`")
        try:
            with np.load(path) as data:
                meta = json.loads(bytes(data["__meta__"]).decode())
                arrays = {t: data[f"task_{i}"].astype(np.int32, copy=False) for i, t in enumerate(meta["tasks"])}
        except (OSError, KeyError, ValueError) as error:
            raise DataError(f"{path} is not a token-stream file ({error}); re-encode the corpus") from error
        return cls(tasks=tuple(meta["tasks"]), arrays=arrays, split=meta["split"], vocab_size=meta["vocab_size"])


def encode_corpus(corpus_dir: str | os.PathLike, tokenizer: Tokenizer | str | os.PathLike, split: str = "train",
                  *, tasks: Sequence[str] | None = None, progress: bool = True) -> TokenStreams:
    """Encode one split into per-task streams `<bos> doc <eos> <bos> doc <eos> ...` (int32)."""
    corpus = Corpus(corpus_dir)
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    selected = tuple(corpus.tasks if tasks is None else tasks)
    unknown = [t for t in selected if t not in corpus.tasks]
    if unknown or not selected:
        raise DataError(f"task(s) {unknown or '(none)'} not in corpus {corpus_dir}; it has {corpus.tasks}")
    pieces: dict[str, list[np.ndarray]] = {task: [] for task in selected}
    pending: list[tuple[str, str]] = []

    def flush() -> None:
        encodings = tokenizer.encode_batch([text for _, text in pending], add_special_tokens=False)
        for (task, _), encoding in zip(pending, encodings):
            ids = np.empty(len(encoding.ids) + 2, dtype=np.int32)  # [len + 2]
            ids[0], ids[1:-1], ids[-1] = BOS_ID, encoding.ids, EOS_ID
            pieces[task].append(ids)
        pending.clear()

    total = sum(corpus.manifest["tasks"][t]["documents"][check_split(split)] for t in selected)
    for doc in tqdm(corpus.documents(split), total=total, desc=f"encoding {split}", unit="doc",
                    disable=not progress):
        if doc.task in pieces:
            pending.append((doc.task, doc.text))
            if len(pending) >= _ENCODE_CHUNK:
                flush()
    if pending:
        flush()
    arrays = {t: np.concatenate(p) if p else np.zeros(0, dtype=np.int32) for t, p in pieces.items()}
    return TokenStreams(tasks=selected, arrays=arrays, split=split, vocab_size=tokenizer.get_vocab_size())


@dataclasses.dataclass(frozen=True)
class Batch:
    """A batch of token windows."""

    tokens: np.ndarray  # [B, T] int32
    task_ids: np.ndarray  # [B] int32, index into TokenStreams.tasks (-1 on padding rows)
    starts: np.ndarray  # [B] int64, offset of each window in its task's stream (-1 on padding rows)
    valid: np.ndarray  # [B] bool, False on padding rows (only sequential_batches pads)


def _check_shapes(streams: TokenStreams, batch_size: int, seq_len: int) -> None:
    if batch_size <= 0 or seq_len <= 0:
        raise DataError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    short = {t: n for t, n in streams.num_tokens().items() if n < seq_len}
    if short:
        raise DataError(f"task stream(s) shorter than seq_len={seq_len}: {short}; use a shorter "
                        f"seq_len or drop those tasks")


def random_batches(streams: TokenStreams, batch_size: int, seq_len: int, *, seed: int = 0,
                   task_weights: dict[str, float] | None = None) -> Iterator[Batch]:
    """Endless batches of random windows, tasks mixed uniformly (or by `task_weights`)."""
    _check_shapes(streams, batch_size, seq_len)
    num_tasks = len(streams.tasks)
    if task_weights is None:
        probs = np.full(num_tasks, 1.0 / num_tasks)
    else:
        unknown = set(task_weights) - set(streams.tasks)
        if unknown:
            raise DataError(f"task_weights names unknown task(s) {sorted(unknown)}; tasks: {list(streams.tasks)}")
        probs = np.array([float(task_weights.get(t, 0.0)) for t in streams.tasks])
        if (probs < 0).any() or probs.sum() <= 0:
            raise DataError(f"task_weights must be >= 0 with a positive sum, got {task_weights}")
        probs = probs / probs.sum()
    rng = np.random.default_rng(seed)
    window_counts = np.array([streams.arrays[t].size - seq_len + 1 for t in streams.tasks])  # [K]
    offsets = np.arange(seq_len)  # [T]
    while True:
        task_ids = rng.choice(num_tasks, size=batch_size, p=probs).astype(np.int32)  # [B]
        starts = rng.integers(0, window_counts[task_ids])  # [B] int64, per-row upper bound
        tokens = np.empty((batch_size, seq_len), dtype=np.int32)  # [B, T]
        for k in np.unique(task_ids):
            rows = np.nonzero(task_ids == k)[0]
            tokens[rows] = streams.arrays[streams.tasks[k]][starts[rows, None] + offsets]
        yield Batch(tokens=tokens, task_ids=task_ids, starts=starts, valid=np.ones(batch_size, dtype=bool))


def sequential_batches(streams: TokenStreams, batch_size: int, seq_len: int) -> Iterator[Batch]:
    """Every full non-overlapping window of every task once, in task order; the last batch is padded."""
    _check_shapes(streams, batch_size, seq_len)
    windows = [(k, start) for k, task in enumerate(streams.tasks)
               for start in range(0, streams.arrays[task].size - seq_len + 1, seq_len)]
    for first in range(0, len(windows), batch_size):
        chunk = windows[first : first + batch_size]
        tokens = np.full((batch_size, seq_len), PAD_ID, dtype=np.int32)  # [B, T]
        task_ids = np.full(batch_size, -1, dtype=np.int32)
        starts = np.full(batch_size, -1, dtype=np.int64)
        for row, (k, start) in enumerate(chunk):
            tokens[row] = streams.arrays[streams.tasks[k]][start : start + seq_len]
            task_ids[row], starts[row] = k, start
        yield Batch(tokens=tokens, task_ids=task_ids, starts=starts, valid=np.arange(batch_size) < len(chunk))
