"""Cells every notebook opens with: badge and title, install, accelerator detection.

The install cell works in three places:
- Colab: clones the repository (it ships the embedded model and the trained
  predictors under checkpoints/, which a wheel would not), installs it with the
  JAX build for the runtime's accelerator, and puts it on sys.path (the running
  kernel does not see an editable install until it restarts);
- a local clone (Jupyter started anywhere inside it): uses the checkout;
- CI: the package is installed already; nothing is installed.

Environment switches, read by every notebook:
- EMOE_NOTEBOOK_SMALL=1: tiny sizes, no downloads (CI runs each notebook on
  2 CPU cores in about a minute with it);
- EMOE_NOTEBOOK_WORK=DIR: where notebooks write (default: a temporary
  directory; /content/emoe_work on Colab);
- EMOE_JAX_EXTRA: the pip extra for JAX on Colab (default: cuda12 on a GPU
  runtime, tpu on a TPU runtime, none on CPU).
"""

from __future__ import annotations

REPO_URL = "https://github.com/emoe-jax/emoe_jax"
COLAB_URL = "https://colab.research.google.com/github/emoe-jax/emoe_jax/blob/main/colab/{stem}.ipynb"
BADGE_IMG = "https://colab.research.google.com/assets/colab-badge.svg"


def badge(stem: str) -> str:
    return f"[![Open In Colab]({BADGE_IMG})]({COLAB_URL.format(stem=stem)})"


INSTALL_MD = """
## Install

On Colab this clones the repository and installs it (about a minute; the JAX
build matches the runtime's GPU or TPU). In a local clone, or where
`emoe_jax` is installed already, nothing is installed.
"""

SETUP = r'''
# Install emoe_jax unless it is importable; find the checkout (it holds checkpoints/).
import importlib.util, os, shutil, subprocess, sys, tempfile
from pathlib import Path

REPO_URL = "__REPO_URL__"
SMALL = os.environ.get("EMOE_NOTEBOOK_SMALL") == "1"  # CI: tiny sizes, no downloads
IN_COLAB = "google.colab" in sys.modules


def find_checkout():
    """The emoe_jax checkout this notebook runs in (cwd or a parent), or None."""
    for d in [Path.cwd(), *Path.cwd().parents]:
        if (d / "emoe_jax" / "__init__.py").is_file() and (d / "checkpoints").is_dir():
            return d
    return None


def installed_checkout():
    """The checkout an importable emoe_jax comes from (an editable install), or None."""
    spec = importlib.util.find_spec("emoe_jax")
    if spec is None or not spec.origin:
        return None
    d = Path(spec.origin).resolve().parents[1]
    return d if (d / "checkpoints").is_dir() else None


REPO = find_checkout() or installed_checkout()
if REPO is None:  # Colab, or a notebook opened outside a clone
    REPO = Path("emoe_jax_repo").resolve()
    if not REPO.exists():
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, str(REPO)], check=True)
if importlib.util.find_spec("emoe_jax") is None:
    extra = os.environ.get("EMOE_JAX_EXTRA")
    if extra is None:  # the JAX build for this runtime's accelerator
        on_tpu = bool(os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_ACCELERATOR_TYPE")
                      or Path("/dev/accel0").exists() or Path("/dev/vfio/0").exists())
        extra = "cuda12" if shutil.which("nvidia-smi") else ("tpu" if on_tpu else "")
    jax_pkg = [f"jax[{extra}]>=0.10"] if extra else []
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(REPO), *jax_pkg], check=True)
    sys.path.insert(0, str(REPO))  # the running kernel does not see the editable install until a restart

import emoe_jax

WORK = Path(os.environ.get("EMOE_NOTEBOOK_WORK")
            or ("/content/emoe_work" if IN_COLAB else tempfile.mkdtemp(prefix="emoe_notebook_")))
WORK.mkdir(parents=True, exist_ok=True)
print(f"emoe_jax {emoe_jax.__version__} from {Path(emoe_jax.__file__).parent}")
print(f"checkout: {REPO}\nwork dir: {WORK}\nsmall mode: {SMALL}")
'''.replace("__REPO_URL__", REPO_URL)

ACCEL_MD = """
## Accelerator

`jax.devices()` says what this runtime has: TPU, GPU or CPU. The sizes below
follow from it (and from the small mode CI uses).
"""

ACCEL = r'''
import jax

DEVICE = jax.devices()[0]
PLATFORM = DEVICE.platform  # "tpu", "gpu" or "cpu"
# Allocator limit on GPU/TPU; CPU has no allocator stats.
_mem = DEVICE.memory_stats() if hasattr(DEVICE, "memory_stats") else None
DEVICE_BYTES = (_mem or {}).get("bytes_limit")
HOST_BYTES = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
print(f"JAX {jax.__version__}: {len(jax.devices())} x {DEVICE.device_kind} ({PLATFORM})")
print("device memory:", f"{DEVICE_BYTES / 2**30:.1f} GiB" if DEVICE_BYTES else "n/a (CPU: host memory)",
      f"| host memory: {HOST_BYTES / 2**30:.1f} GiB")

SIZE = "small" if SMALL else ("cpu" if PLATFORM == "cpu" else "accelerator")
'''


def opening_cells(stem: str, title: str, intro: str, sizes: str) -> list[tuple[str, str]]:
    """Badge + title + intro, install, accelerator detection followed by the notebook's `sizes` code."""
    head = f"{badge(stem)}\n\n# {title}\n\n{intro.strip()}"
    return [("md", head), ("md", INSTALL_MD), ("code", SETUP), ("md", ACCEL_MD),
            ("code", ACCEL.rstrip() + "\n" + sizes.strip("\n"))]
