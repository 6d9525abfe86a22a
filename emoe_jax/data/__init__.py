"""emoe_jax.data"""
