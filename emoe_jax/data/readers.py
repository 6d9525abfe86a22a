"""Readers that turn a package's files into raw documents `(group_id, text)`.

Each reader knows one format and nothing about packages, so tests run them on
small fixture folders. Output order is sorted by path, so a build is
reproducible. Text is returned raw; cleaning and chunking happen in the builder.

  read_python_files  one document per .py file (skipping tests and data tables)
  read_rest_files    one document per reST source (`*.rst.txt` / `*.rst`)
  read_tex_sections  one document per \\section / \\subsec block of plain-TeX/LaTeX files
  read_fortunes      '%'-separated fortune cookies, grouped into documents of ~N chars
  read_chitchat      one document per conversation of the chitchat-dataset JSON
  read_text_files    one document per *.txt file (BBC News articles)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from emoe_jax.data.documents import decode_bytes
from emoe_jax.data.errors import DataError

RawDocument = tuple[str, str]  # (group_id, text)

# Folders of the standard library that are not ordinary code: tests (data files
# in odd encodings), codec tables and generated help text.
PYTHON_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
     "encodings", "pydoc_data"}
)


def _require_dir(folder: Path, what: str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{what}: folder {folder} does not exist")
    return folder


def _read(path: Path) -> str:
    return decode_bytes(path.read_bytes())


def _relative_files(folder: Path, pattern: str) -> list[Path]:
    return sorted(p for p in folder.rglob(pattern) if p.is_file() and not p.is_symlink())


def read_python_files(folder: Path) -> Iterator[RawDocument]:
    """Every .py file under `folder` except those in PYTHON_SKIP_DIRS."""
    folder = _require_dir(folder, "Python sources")
    for path in _relative_files(folder, "*.py"):
        rel = path.relative_to(folder)
        if any(part in PYTHON_SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        yield rel.as_posix(), _read(path)


def read_rest_files(folder: Path) -> Iterator[RawDocument]:
    """Every reStructuredText source under `folder` (Sphinx ships them as `*.rst.txt`)."""
    folder = _require_dir(folder, "reST sources")
    paths = sorted(set(_relative_files(folder, "*.rst.txt")) | set(_relative_files(folder, "*.rst")))
    for path in paths:
        yield path.relative_to(folder).as_posix(), _read(path)


_TEX_SECTION = re.compile(r"^\\(?:chapter|section|subsection|subsubsection|subsec|subsubsec)\b",
                          re.MULTILINE)


def read_tex_sections(folder: Path, skip: frozenset[str] = frozenset()) -> Iterator[RawDocument]:
    """*.tex files under `folder` (minus `skip` names), cut before each sectioning command."""
    folder = _require_dir(folder, "TeX sources")
    for path in _relative_files(folder, "*.tex"):
        if path.name in skip:
            continue
        text = _read(path)
        starts = [0] + [m.start() for m in _TEX_SECTION.finditer(text) if m.start() > 0]
        rel = path.relative_to(folder).as_posix()
        for index, (begin, end) in enumerate(zip(starts, starts[1:] + [len(text)])):
            if text[begin:end].strip():
                yield f"{rel}:{index}", text[begin:end]


def _split_fortunes(text: str) -> list[str]:
    fortunes, current = [], []
    for line in text.split("\n"):
        if line.strip() == "%":
            fortunes.append("\n".join(current).strip("\n"))
            current = []
        else:
            current.append(line)
    fortunes.append("\n".join(current).strip("\n"))
    return [f for f in fortunes if f.strip()]


def read_fortunes(folder: Path, group_chars: int = 1500) -> Iterator[RawDocument]:
    """Fortune files under `folder` (not `.dat` indexes, not symlinks).

    Single fortunes are often one line, too short to be useful training
    documents, so consecutive fortunes of one file are joined (blank line
    between) until a document reaches `group_chars`. Repeated fortunes within
    a file are dropped.
    """
    folder = _require_dir(folder, "fortune files")
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        if path.suffix in (".dat", ".gz") or path.name.startswith("."):
            continue
        rel = path.relative_to(folder).as_posix()
        seen: set[str] = set()
        group: list[str] = []
        group_len, group_start = 0, 0
        fortunes = _split_fortunes(_read(path))
        for index, fortune in enumerate(fortunes):
            if fortune in seen:
                continue
            seen.add(fortune)
            if not group:
                group_start = index
            group.append(fortune)
            group_len += len(fortune) + 2
            if group_len >= group_chars:
                yield f"{rel}:{group_start}", "\n\n".join(group) + "\n"
                group, group_len = [], 0
        if group:
            yield f"{rel}:{group_start}", "\n\n".join(group) + "\n"


def read_chitchat(json_path: Path) -> Iterator[RawDocument]:
    """Conversations of chitchat-dataset as `A: ...` / `B: ...` lines, one utterance a line.

    Senders are anonymous ids in the data; they are renamed A, B, ... in order
    of appearance within each conversation.
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise DataError(f"chitchat dataset file {json_path} does not exist")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{json_path} is not valid chitchat JSON ({error}); reinstall chitchat-dataset") from error
    for conversation_id in sorted(data):
        speakers: dict[str, str] = {}
        lines: list[str] = []
        for message in data[conversation_id].get("messages", []):
            for utterance in message:
                sender = speakers.setdefault(utterance["sender"], chr(ord("A") + min(len(speakers), 25)))
                text = " ".join(utterance["text"].split())
                if text:
                    lines.append(f"{sender}: {text}")
        if lines:
            yield conversation_id, "\n".join(lines) + "\n"


def read_text_files(folder: Path) -> Iterator[RawDocument]:
    """Every *.txt file under `folder`, id = relative path without the suffix."""
    folder = _require_dir(folder, "text files")
    for path in _relative_files(folder, "*.txt"):
        yield path.relative_to(folder).with_suffix("").as_posix(), _read(path)
