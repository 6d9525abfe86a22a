"""emoe_jax.model"""
