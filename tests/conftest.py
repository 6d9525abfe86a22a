"""Suite-wide test setup."""

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_executables():
    """Drop compiled executables after each test module. Every XLA:CPU executable keeps a few
    hundred memory mappings alive, and the suite compiles hundreds of one-jit decode steps (one per
    model, slot count and predictor); kept for the whole run they pass the kernel's mapping limit
    (vm.max_map_count, 65530) and the process dies in the compiler."""
    yield
    jax.clear_caches()
