"""emoe_jax: Mixture-of-Experts inference with offloaded experts, in JAX."""

__version__ = "0.1.0"
