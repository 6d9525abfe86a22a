"""Reading a built corpus directory: `Corpus`, `load_corpus`, `iter_corpus`.

A corpus directory holds `{train,validation,test}.jsonl` and `manifest.json`
(written by `emoe_jax.data.builder`). Reading checks the manifest format and
that the split files exist; `Corpus.verify()` also checks file hashes and the
per-task counts against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from emoe_jax.data.builder import CORPUS_FORMAT, MANIFEST_NAME
from emoe_jax.data.documents import SPLITS, Document, check_split
from emoe_jax.data.errors import DataError


class Corpus:
    """A built multi-task corpus on disk."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{manifest_path} not found: {self.path} is not a built corpus. "
                f"Build one with `python -m emoe_jax.data build {self.path}`."
            )
        try:
            self.manifest: dict = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(f"{manifest_path} is corrupt ({error}); rebuild the corpus") from error
        if self.manifest.get("format") != CORPUS_FORMAT:
            raise DataError(
                f"{manifest_path} has format {self.manifest.get('format')!r}, expected {CORPUS_FORMAT!r}; "
                f"rebuild the corpus with this version of emoe_jax"
            )
        for split in SPLITS:
            if not (self.path / f"{split}.jsonl").is_file():
                raise FileNotFoundError(f"{self.path / f'{split}.jsonl'} is missing; rebuild the corpus")

    @property
    def tasks(self) -> list[str]:
        """Task names, in build order."""
        return list(self.manifest["tasks"])

    def documents(self, split: str) -> Iterator[Document]:
        """Stream the documents of `split` in file order (tasks in build order, ids sorted)."""
        path = self.path / f"{check_split(split)}.jsonl"
        with open(path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                try:
                    record = json.loads(line)
                    yield Document(task=record["task"], doc_id=record["doc_id"], text=record["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise DataError(
                        f"{path}:{line_number} is not a corpus record ({error}); rebuild the corpus") from error

    def load(self, split: str) -> list[Document]:
        return list(self.documents(split))

    def stats(self) -> dict[str, dict[str, dict[str, int]]]:
        """{task: {split: {"documents": n, "chars": n}}} from the manifest."""
        return {
            task: {split: {"documents": info["documents"][split], "chars": info["chars"][split]} for split in SPLITS}
            for task, info in self.manifest["tasks"].items()
        }

    def verify(self) -> None:
        """Check file hashes and per-task document/char counts against the manifest."""
        for name, expected in self.manifest.get("files", {}).items():
            actual = hashlib.sha256((self.path / name).read_bytes()).hexdigest()
            if actual != expected:
                raise DataError(f"{self.path / name} does not match its manifest hash; rebuild the corpus")
        for split in SPLITS:
            counts: dict[str, list[int]] = {}
            for doc in self.documents(split):
                count = counts.setdefault(doc.task, [0, 0])
                count[0] += 1
                count[1] += len(doc.text)
            for task, info in self.manifest["tasks"].items():
                found = counts.pop(task, [0, 0])
                if found != [info["documents"][split], info["chars"][split]]:
                    raise DataError(
                        f"{split}: task {task} has {found[0]} docs / {found[1]} chars, manifest says "
                        f"{info['documents'][split]} / {info['chars'][split]}; rebuild the corpus"
                    )
            if counts:
                raise DataError(f"{split}: tasks {sorted(counts)} are not in the manifest; rebuild the corpus")

    def format_stats(self) -> str:
        """A plain-text table of documents and characters per task and split."""
        header = f"{'task':<10}" + "".join(f"{s + ' docs':>16}{s + ' chars':>18}" for s in SPLITS)
        lines = [header]
        for task, per_split in self.stats().items():
            lines.append(f"{task:<10}" + "".join(
                f"{per_split[s]['documents']:>16,}{per_split[s]['chars']:>18,}" for s in SPLITS))
        return "\n".join(lines)


def open_corpus(path: str | os.PathLike) -> Corpus:
    return Corpus(path)


def iter_corpus(path: str | os.PathLike, split: str) -> Iterator[Document]:
    """Stream the documents of one split of the corpus at `path`."""
    return Corpus(path).documents(split)


def load_corpus(path: str | os.PathLike, split: str) -> list[Document]:
    """All documents of one split of the corpus at `path`."""
    return Corpus(path).load(split)
