"""Tiny, deterministic synthetic corpora: the test suite's corpora and the notebooks' offline fallback.

`fixture_sources(root)` writes three small local "packages" of generated text
under `root` (English-like prose, German-like prose with umlauts and emoji,
Python-like code) and returns a registry of `Source`s reading them, so the
real builder, tokenizer and stream code run on them without any download.
`tiny_corpus` and `tiny_tokenizer` build a corpus / train a tokenizer from
them in well under a second.

The text is synthetic: use it to test mechanics, never to judge a model.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from emoe_jax.data import readers
from emoe_jax.data.builder import BuildConfig, build_corpus
from emoe_jax.data.fetch import PackageFiles
from emoe_jax.data.sources import Source
from emoe_jax.data.tokenizer import train_tokenizer

_WORDS = {
    "prose": "the a river city old new light went saw people morning under across quietly and but "
             "because house garden winter summer friend letter road long small".split(),
    "umlaut": "der die das über schön Straße Mädchen Bäume grün früh Größe müde Tür Käse und oder "
              "weil heute morgen 😀 €".split(),
    "code": "def return if else for in range x y value self items append len print None True "
            "import lambda".split(),
}


def _document(rng: random.Random, task: str) -> str:
    words = _WORDS[task]
    lines = []
    for _ in range(rng.randint(3, 12)):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        if task == "code":
            line = " " * (4 * rng.randint(0, 2)) + line.replace(" in ", " in (") + ("):" if rng.random() < .3 else "")
        else:
            line = line[0].upper() + line[1:] + rng.choice([".", "!", "?", ","])
        lines.append(line)
    return "\n".join(lines) + "\n"


def fixture_sources(root: str | os.PathLike, docs_per_task: int = 40, seed: int = 0) -> dict[str, Source]:
    """Write `docs_per_task` generated documents per task under `root`; return their sources."""
    root = Path(root)
    registry: dict[str, Source] = {}
    for task in _WORDS:
        rng = random.Random(f"{seed}/{task}")
        folder = root / f"fixture-{task}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(docs_per_task):
            (folder / f"doc{index:04d}.txt").write_text(_document(rng, task), encoding="utf-8")
        files = PackageFiles(name=f"fixture-{task}", version=str(seed), kind="local", root=folder)
        registry[task] = Source(
            task=task,
            description=f"synthetic {task} text for tests",
            obtain=lambda _cache, files=files: files,
            read=lambda f: readers.read_text_files(f.root),
            install_hint="created by emoe_jax.data.synthetic.fixture_sources",
        )
    return registry


def tiny_corpus(out_dir: str | os.PathLike, docs_per_task: int = 40, seed: int = 0) -> Path:
    """Build a three-task corpus of generated text into `out_dir` (packages go to a sibling folder)."""
    out_dir = Path(out_dir)
    registry = fixture_sources(out_dir.parent / f".{out_dir.name}-packages", docs_per_task, seed)
    config = BuildConfig(max_chars_per_task=None, min_doc_chars=1, seed=seed)
    build_corpus(out_dir, registry=registry, config=config, progress=False)
    return out_dir


def tiny_tokenizer(corpus_dir: str | os.PathLike, out_dir: str | os.PathLike, vocab_size: int = 384) -> Path:
    """Train a small byte-level BPE on a (tiny) corpus; returns `out_dir`."""
    train_tokenizer(corpus_dir, out_dir, vocab_size=vocab_size, progress=False)
    return Path(out_dir)
