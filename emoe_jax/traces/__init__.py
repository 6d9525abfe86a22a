"""emoe_jax.traces"""
