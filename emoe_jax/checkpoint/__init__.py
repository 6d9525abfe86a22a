"""emoe_jax.checkpoint"""
