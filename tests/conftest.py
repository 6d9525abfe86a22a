"""Suite-wide test setup."""

import atexit
import os
import shutil
import tempfile

# One persistent compilation cache for the whole run, fresh each run (nothing carries over
# between runs): test modules, notebook kernels and CLI subprocesses compile many identical
# programs (the same tiny models, the embedded model's decode steps), and after the first
# compile each later one loads from disk. Set before jax is imported so subprocesses inherit it.
_CACHE = tempfile.mkdtemp(prefix="emoe_jax_test_xla_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run (the suite must be deterministic); a new
# failure shows up when the code changes, not at random in CI.
settings.register_profile("emoe_jax", derandomize=True, print_blob=True)
settings.load_profile("emoe_jax")

jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_executables():
    """Drop compiled executables after each test module. Every XLA:CPU executable keeps a few
    hundred memory mappings alive, and the suite compiles hundreds of one-jit decode steps (one per
    model, slot count and predictor); kept for the whole run they pass the kernel's mapping limit
    (vm.max_map_count, 65530) and the process dies in the compiler. Later modules that need the
    same program load it from the run's persistent cache instead of compiling it again."""
    yield
    jax.clear_caches()
