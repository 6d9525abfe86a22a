"""Task-labelled prompts from the corpus (``python -m emoe_jax.data build``), cut to token budgets."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Sequence

from emoe_jax.errors import EmoeError


class PromptSourceError(EmoeError):
    """Missing corpus split, unknown task, or too few documents."""


def corpus_texts(corpus: str | os.PathLike, split: str = "validation", per_task: int = 4,
                 tasks: Sequence[str] | None = None, seed: int = 0) -> dict[str, list[str]]:
    """{task: [text, ...]}: ``per_task`` non-empty documents of each task, a seed-deterministic choice."""
    path = Path(corpus) / f"{split}.jsonl"
    if not path.is_file():
        raise PromptSourceError(f"corpus split {path} does not exist; build the corpus with "
                                f"python -m emoe_jax.data build {corpus} (docs/corpus.md)")  # fmt: skip
    by_task: dict[str, list[tuple[str, str]]] = {}
    with path.open() as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("text"):
                by_task.setdefault(rec["task"], []).append((str(rec.get("doc_id", "")), rec["text"]))
    wanted = list(tasks) if tasks else sorted(by_task)
    unknown = [t for t in wanted if t not in by_task]
    if unknown:
        raise PromptSourceError(f"unknown task(s) {unknown} in {path}; known: {sorted(by_task)}")
    out = {}
    for task in wanted:
        docs = sorted(by_task[task])
        random.Random(f"{seed}/{task}").shuffle(docs)
        out[task] = [text for _, text in docs[:per_task]]
    return out


def encode_cut(tokenizer, text: str, max_tokens: int) -> list[int]:
    """Token ids of ``text`` (with the tokenizer's BOS rule), cut to ``max_tokens``."""
    # Encode a prefix only: corpus documents can be far longer than any prompt.
    ids = tokenizer.encode(text[: max_tokens * 16])
    if not ids:
        raise PromptSourceError(f"text {text[:40]!r} encodes to no tokens")
    return ids[:max_tokens]
