"""emoe_jax.train"""
