"""Documents, text cleaning, long-document chunking and the train/validation/test split.

Steps applied to every raw document a source yields:
  1. `clean_text`: normalise newlines, drop control characters other than tab
     and newline (terminal escapes in fortune files, form feeds in man pages).
  2. `chunk_text`: cut documents longer than `max_chars` at paragraph
     boundaries (falling back to line boundaries, then a hard cut) so one huge
     file cannot dominate a task; parts get ids `GROUP#k`.
  3. `assign_split`: SHA-256 of `task/GROUP` mapped to [0, 1) picks the split.
     All parts of one source document share a split (no train/test leakage
     between halves of one file), and the assignment depends only on the id,
     never on which other documents exist, so adding data never moves a
     document from train to test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

from emoe_jax.data.errors import DataError

SPLITS: tuple[str, ...] = ("train", "validation", "test")
DEFAULT_SPLIT_FRACTIONS: tuple[float, float, float] = (0.90, 0.05, 0.05)

# C0 controls except \t and \n, plus DEL; \r is handled before (CRLF -> LF).
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# ANSI escape sequences (colour codes in some fortune files) go whole, not just the ESC.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclasses.dataclass(frozen=True, slots=True)
class Document:
    """One corpus document. `doc_id` is unique within its task."""

    task: str
    doc_id: str
    text: str

    @property
    def group_id(self) -> str:
        """Id of the source document this one was cut from (the split key)."""
        return self.doc_id.split("#", 1)[0]

    def to_json(self) -> dict[str, str]:
        return {"task": self.task, "doc_id": self.doc_id, "text": self.text}


def check_split(split: str) -> str:
    """`split` if it is one of SPLITS, else a DataError naming the choices."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return split


def clean_text(text: str) -> str:
    """Normalise newlines and strip control characters (keeps tabs and newlines)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _ANSI_ESCAPE.sub("", text)
    return _CONTROL_CHARS.sub("", text)


def decode_bytes(data: bytes) -> str:
    """UTF-8, falling back to cp1252/latin-1 for old files (e.g. one BBC article)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        try:
            return data.decode("cp1252")
        except UnicodeDecodeError:
            return data.decode("latin-1")


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Cut `text` into pieces of at most `max_chars`, preferring paragraph then line breaks.

    Concatenating the pieces gives back `text` exactly (separators stay at the
    end of the piece before the cut).
    """
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    pieces: list[str] = []
    start = 0
    while len(text) - start > max_chars:
        window = text[start : start + max_chars]
        cut = window.rfind("\n\n")
        if cut >= max_chars // 4:
            cut += 2
        else:
            cut = window.rfind("\n")
            cut = cut + 1 if cut >= max_chars // 4 else max_chars
        pieces.append(text[start : start + cut])
        start += cut
    pieces.append(text[start:])
    return pieces


def unit_hash(key: str) -> float:
    """Deterministic map of a string to [0, 1) (first 8 bytes of SHA-256)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(
    task: str, group_id: str, fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS
) -> str:
    """The split ("train"/"validation"/"test") of every part of source document `group_id`."""
    u = unit_hash(f"split/{task}/{group_id}")
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "validation"
    return "test"


def check_split_fractions(fractions: tuple[float, ...]) -> tuple[float, float, float]:
    """Validate three non-negative fractions that sum to 1 (train > 0)."""
    if len(fractions) != 3:
        raise ValueError(f"need three split fractions (train, validation, test), got {fractions}")
    if any(f < 0 for f in fractions) or fractions[0] <= 0:
        raise ValueError(f"split fractions must be >= 0 with train > 0, got {fractions}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions} (sum {sum(fractions)})")
    return (float(fractions[0]), float(fractions[1]), float(fractions[2]))
