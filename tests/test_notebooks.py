"""The Colab notebooks: stripped, badged, in sync with their cell lists, and each runs top to bottom.

Every colab/*.ipynb is picked up, so a new notebook needs no change here. Execution uses
nbclient with the python3 kernel, in small mode (EMOE_NOTEBOOK_SMALL=1: tiny sizes, no
downloads), with colab/ as the working directory, and fails on the first cell that raises.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _require(name: str):
    """The module; CI installs the test extra, so there a missing one fails instead of skipping."""
    if os.environ.get("CI"):
        return importlib.import_module(name)
    return pytest.importorskip(name, reason="pip install -e '.[test]' installs it")


nbformat = _require("nbformat")

REPO = Path(__file__).resolve().parents[1]
COLAB = REPO / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
BADGE_URL = "https://colab.research.google.com/github/emoe-jax/emoe_jax/blob/main/colab/{name}"
CELL_TIMEOUT_S = 900  # one cell; CI's whole budget is far larger, and a hung kernel must still end


def _ids(paths):
    return [p.stem for p in paths]


def test_there_are_notebooks():
    assert {"quickstart", "hf_models", "predictor_lab"} <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_stripped_badged_and_valid(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and BADGE_URL.format(name=path.name) in first.source, (
        f"{path.name}: the first cell must be an 'Open in Colab' badge linking to {BADGE_URL.format(name=path.name)}")
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name}: cell {i} has outputs; strip them (python colab/build_notebooks.py rewrites "
                "generated notebooks; others: jupyter nbconvert --clear-output)")
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert any("pip" in src and "install" in src for src in code[:2]), f"{path.name}: no install cell at the top"
    assert any("jax.devices()" in src for src in code[:3]), f"{path.name}: no accelerator detection cell"


def test_generated_notebooks_match_their_cell_lists():
    proc = subprocess.run([sys.executable, str(COLAB / "build_notebooks.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _execute(path: Path, tmp_path: Path, monkeypatch, **env: str) -> float:
    nbclient = _require("nbclient")
    _require("ipykernel")
    # The kernel inherits this environment: small mode, a private work dir, and this
    # checkout's emoe_jax first on the path (whatever is installed).
    monkeypatch.setenv("EMOE_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("EMOE_NOTEBOOK_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(COLAB)}})
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{path.name}: a cell raised (small mode, cwd colab/):\n{exc}", pytrace=False)
    seconds = time.perf_counter() - start
    print(f"\n{path.name}: executed in {seconds:.1f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: error outputs {errors}"
    return seconds


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    _execute(path, tmp_path, monkeypatch)


@pytest.mark.slow
def test_predictor_lab_synthetic_fallback(tmp_path, monkeypatch):
    """The path CI takes where the shared DeepSeek-V2-Lite traces are absent."""
    _execute(COLAB / "predictor_lab.ipynb", tmp_path, monkeypatch,
             EMOE_PUFFIN_TRACES=str(tmp_path / "no-such-traces"))
