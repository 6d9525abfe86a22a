"""The persistent compilation cache: on where asked, off with EMOE_JAX_COMPILE_CACHE=0."""

import jax

from emoe_jax.compile_cache import default_cache_dir, enable_compile_cache


def test_enable_points_jax_at_the_directory_and_can_be_turned_off(tmp_path, monkeypatch):
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    try:
        target = tmp_path / "xla"
        assert enable_compile_cache(target) == target and target.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(target)
        monkeypatch.setenv("EMOE_JAX_COMPILE_CACHE", "0")
        assert enable_compile_cache(tmp_path / "other") is None and not (tmp_path / "other").exists()
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


def test_default_directory_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("EMOE_JAX_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "xla"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert default_cache_dir() == tmp_path / "jax"
