"""Task extraction for eMoE: which task type a prompt belongs to.

Two extractors, one interface (``classify(text) -> str``):

1. ``KeywordTaskMatcher``: the paper's approach (eMoE, arXiv 2503.06823,
   classifies prompts into task types by keywords). Steps: lower-case the
   prompt; count, per task, how many of its keywords occur (whole words or
   phrases); the task with most hits wins, ties go to the task listed first;
   no hit gives ``default``. The keyword tables are ours (the paper does not
   publish its lists): ``PAPER_STYLE_KEYWORDS`` for instruction-style task
   types, ``CORPUS_KEYWORDS`` for the seven tasks of ``emoe_jax.data``.
2. ``NaiveBayesTaskClassifier``: multinomial naive Bayes over hashed character
   n-grams (numpy only). Steps: ``fit`` lower-cases texts, hashes every
   character 2..4-gram (crc32) into ``buckets`` counters, adds Laplace
   smoothing ``alpha`` and stores per-task log-probabilities; ``classify``
   returns the task maximising log prior + sum of n-gram log-likelihoods.
   ``save``/``load`` use one ``.npz`` (written to a temporary name, then renamed).

``corpus_snippets`` cuts task-labelled documents (``out/corpus/*.jsonl``) into
prompt-sized snippets for training and for measuring both extractors.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from emoe_jax.atomic_io import write_atomic
from emoe_jax.errors import EmoeError

PAPER_STYLE_KEYWORDS: dict[str, tuple[str, ...]] = {
    "translation": ("translate", "translation", "in french", "in german", "in spanish", "into english",
                    "to english", "to french", "to german", "to spanish"),
    "summarization": ("summarize", "summarise", "summary", "tl;dr", "in short", "key points", "condense"),
    "code": ("code", "function", "python", "javascript", "java", "c++", "sql", "bug", "compile", "script",
             "class", "api", "regex", "html", "css", "program"),
    "math": ("solve", "equation", "calculate", "integral", "derivative", "probability", "prove", "theorem",
             "matrix", "sum of", "how many"),
    "classification": ("classify", "sentiment", "positive or negative", "category", "categorize", "label"),
    "generation": ("write", "story", "poem", "essay", "compose", "letter", "lyrics", "create a"),
    "question_answering": ("what is", "what are", "who", "why", "when", "where", "how does", "how do",
                           "explain", "describe"),
}  # fmt: skip

CORPUS_KEYWORDS: dict[str, tuple[str, ...]] = {
    "code": ("def", "import", "return", "self", "class", "none", "raise", "elif"),
    "docs": ("module", "function", "parameter", "method", "see", "versionadded", "attribute", "python"),
    "dialogue": ("a:", "b:", "you", "i'm", "my", "lol", "yeah", "do you"),
    "news": ("said", "mr", "year", "government", "company", "bbc", "market", "minister"),
    "german": ("der", "die", "und", "ist", "nicht", "das", "ich", "ein"),
    "spanish": ("el", "la", "que", "los", "es", "por", "una", "del"),
    "math": ("theorem", "integer", "polynomial", "modulo", "matrix", "\\var", "prime", "function of"),
}


class TaskExtractionError(EmoeError):
    """A task extractor got bad input or a missing/corrupt model file."""


class KeywordTaskMatcher:
    def __init__(self, keywords: dict[str, Sequence[str]] | None = None, default: str = "general") -> None:
        table = PAPER_STYLE_KEYWORDS if keywords is None else keywords
        if not table:
            raise TaskExtractionError("keyword table is empty: give at least one task with keywords")
        self.keywords = {task: tuple(k.lower() for k in words) for task, words in table.items()}
        self.default = default
        # One regex per task; \b only where the keyword starts/ends with a word character.
        self._patterns = {
            task: [re.compile((r"\b" if w[0].isalnum() else "") + re.escape(w) + (r"\b" if w[-1].isalnum() else ""))
                   for w in words]
            for task, words in self.keywords.items()
        }  # fmt: skip

    @property
    def tasks(self) -> list[str]:
        return [*self.keywords, self.default]

    def scores(self, text: str) -> dict[str, int]:
        low = text.lower()
        return {task: sum(len(p.findall(low)) for p in pats) for task, pats in self._patterns.items()}

    def classify(self, text: str) -> str:
        scores = self.scores(text)
        best = max(scores.values(), default=0)
        if best == 0:
            return self.default
        return next(task for task, s in scores.items() if s == best)


def _ngram_ids(text: str, buckets: int, n_min: int = 2, n_max: int = 4) -> np.ndarray:
    low = text.lower()
    grams = [low[i : i + n] for n in range(n_min, n_max + 1) for i in range(len(low) - n + 1)]
    return np.fromiter((zlib.crc32(g.encode("utf-8")) % buckets for g in grams), np.int64, len(grams))


class NaiveBayesTaskClassifier:
    def __init__(self, buckets: int = 1 << 16, alpha: float = 0.1) -> None:
        if buckets < 1 or alpha <= 0:
            raise TaskExtractionError(f"need buckets >= 1 and alpha > 0, got {buckets}, {alpha}")
        self.buckets, self.alpha = int(buckets), float(alpha)
        self.tasks: list[str] = []
        self.log_prior: np.ndarray | None = None  # [C]
        self.log_lik: np.ndarray | None = None  # [C, buckets]

    def fit(self, texts: Sequence[str], labels: Sequence[str]) -> "NaiveBayesTaskClassifier":
        if len(texts) == 0 or len(texts) != len(labels):
            raise TaskExtractionError(f"fit needs equally many texts and labels (> 0), got {len(texts)} and {len(labels)}")
        self.tasks = sorted(set(labels))
        index = {t: i for i, t in enumerate(self.tasks)}
        counts = np.zeros((len(self.tasks), self.buckets), np.float64)
        docs = np.zeros(len(self.tasks), np.float64)
        for text, label in zip(texts, labels):
            c = index[label]
            docs[c] += 1
            np.add.at(counts[c], _ngram_ids(text, self.buckets), 1.0)
        smoothed = counts + self.alpha
        self.log_lik = np.log(smoothed / smoothed.sum(1, keepdims=True)).astype(np.float32)
        self.log_prior = np.log(docs / docs.sum()).astype(np.float32)
        return self

    def log_posterior(self, text: str) -> np.ndarray:
        if self.log_lik is None:
            raise TaskExtractionError("the classifier is not trained: call fit() or load()")
        ids = _ngram_ids(text, self.buckets)
        return self.log_prior + self.log_lik[:, ids].sum(1)  # [C] unnormalised

    def classify(self, text: str) -> str:
        return self.tasks[int(np.argmax(self.log_posterior(text)))]

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        if self.log_lik is None:
            raise TaskExtractionError("nothing to save: the classifier is not trained")
        return write_atomic(path, lambda tmp: np.savez_compressed(
            tmp, log_lik=self.log_lik.astype(np.float16), log_prior=self.log_prior,
            tasks=np.array(json.dumps(self.tasks)), alpha=self.alpha))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NaiveBayesTaskClassifier":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"task classifier {path} does not exist; train one with "
                                    "python -m emoe_jax.predict.emoe train-task-classifier")  # fmt: skip
        try:
            with np.load(path) as z:
                log_lik = z["log_lik"].astype(np.float32)
                out = cls(buckets=log_lik.shape[1], alpha=float(z["alpha"]))
                out.log_lik, out.log_prior = log_lik, z["log_prior"].astype(np.float32)
                out.tasks = list(json.loads(str(z["tasks"])))
        except (KeyError, ValueError, OSError, json.JSONDecodeError) as exc:
            raise TaskExtractionError(f"task classifier {path} is corrupt ({exc}); retrain it") from exc
        if len(out.tasks) != out.log_lik.shape[0]:
            raise TaskExtractionError(f"task classifier {path} is corrupt (task list and table disagree)")
        return out


def corpus_snippets(jsonl: str | os.PathLike, chars: int = 300, per_doc: int = 3, seed: int = 0
                    ) -> tuple[list[str], list[str]]:  # fmt: skip
    """(texts, tasks): up to ``per_doc`` random ``chars``-long snippets of every document of a corpus split."""
    path = Path(jsonl)
    if not path.is_file():
        raise FileNotFoundError(f"corpus split {path} does not exist; build it with python -m emoe_jax.data build")
    rng = np.random.default_rng(seed)
    texts, tasks = [], []
    with path.open() as f:
        for line in f:
            rec = json.loads(line)
            text = rec["text"]
            starts = [0] if len(text) <= chars else rng.integers(0, len(text) - chars, per_doc)
            for s in starts:
                texts.append(text[int(s) : int(s) + chars])
                tasks.append(rec["task"])
    return texts, tasks


def accuracy(extractor, texts: Iterable[str], labels: Sequence[str]) -> float:
    preds = [extractor.classify(t) for t in texts]
    return float(np.mean([p == y for p, y in zip(preds, labels)])) if preds else float("nan")
