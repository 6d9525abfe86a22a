"""emoe_jax.predict"""
