"""Build the Colab notebooks in colab/ from the cell lists in colab/nbcells/*.py.

    python colab/build_notebooks.py            # (re)write every notebook this script knows
    python colab/build_notebooks.py --check    # exit 1 if a notebook differs from its cell list

Why: a notebook is JSON, hard to review and to diff. Its cells live here as
Python strings, one module per notebook under colab/nbcells/ with a
``TITLE``, ``INTRO`` and ``CELLS`` list of ("md" | "code", source) pairs. The
badge, install and accelerator cells are shared (colab/nbcells/common.py),
so every notebook opens the same way. Outputs are never written (the
repository keeps notebooks stripped); cell ids are derived from the notebook's
name and the cell's position, so rebuilding an unchanged notebook changes no
byte. Files are written under a temporary name and renamed.

A notebook that is not in ``NOTEBOOKS`` (e.g. one written by hand) is left
alone; tests/test_notebooks.py executes every colab/*.ipynb either way.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
from pathlib import Path

import nbformat

COLAB = Path(__file__).resolve().parent
# Notebook stem -> module under colab/nbcells/ that holds its cells.
NOTEBOOKS = {
    "quickstart": "quickstart",
    "hf_models": "hf_models",
    "predictor_lab": "predictor_lab",
    "emoe_ablations": "emoe_ablations",
}


def _import(module: str):
    """Import colab/nbcells/<module>.py (colab/ is not a package on sys.path)."""
    if str(COLAB) not in sys.path:
        sys.path.insert(0, str(COLAB))
    return importlib.import_module(f"nbcells.{module}")


def build(stem: str) -> nbformat.NotebookNode:
    """The notebook `stem` as an nbformat 4 node: outputs empty, deterministic cell ids."""
    mod, common = _import(NOTEBOOKS[stem]), _import("common")
    cells = common.opening_cells(stem, mod.TITLE, mod.INTRO, mod.SIZES) + list(mod.CELLS)
    nb = nbformat.v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        # Colab reads these: open on a GPU runtime by default (TPU and CPU work too).
        "colab": {"provenance": [], "toc_visible": True},
        "accelerator": "GPU",
    }
    for i, (kind, source) in enumerate(cells):
        source = source.strip("\n")
        if kind == "md":
            cell = nbformat.v4.new_markdown_cell(source)
        elif kind == "code":
            cell = nbformat.v4.new_code_cell(source)
        else:
            raise ValueError(f"{stem}: cell {i} has kind {kind!r}; use 'md' or 'code'")
        cell.id = f"{stem}-{i:02d}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render(stem: str) -> str:
    return nbformat.writes(build(stem)) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python colab/build_notebooks.py",
        description="Write colab/NAME.ipynb from the cell lists in colab/nbcells/NAME.py (outputs stripped).")
    parser.add_argument("names", nargs="*", help=f"notebooks to build (default: all of {', '.join(NOTEBOOKS)})")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a notebook is missing or differs from its cell list")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in NOTEBOOKS]
    if unknown:
        parser.error(f"unknown notebook(s) {', '.join(unknown)}; known: {', '.join(NOTEBOOKS)}")
    stale = []
    for stem in args.names or NOTEBOOKS:
        path = COLAB / f"{stem}.ipynb"
        text = render(stem)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
            continue
        _atomic_write(path, text)
        print(f"wrote {path.relative_to(COLAB.parent)}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python colab/build_notebooks.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
