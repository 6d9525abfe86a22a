"""emoe_jax.sim"""
