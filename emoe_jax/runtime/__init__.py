"""emoe_jax.runtime"""
