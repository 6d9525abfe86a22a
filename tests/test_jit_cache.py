import jax
import jax.numpy as jnp
from flax import nnx

from emoe_jax.model.jit_cache import canonical, jitted
from emoe_jax.runtime.compile_count import compile_count


def _build_apply(graphdef, scale):
    return jax.jit(lambda state, x: scale * nnx.merge(graphdef, state)(x))


def test_equal_graphdefs_share_one_closure_and_one_compilation():
    a = nnx.split(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
    b = nnx.split(nnx.Linear(3, 4, rngs=nnx.Rngs(1)))  # equal structure, other weights, distinct object
    assert a[0] is not b[0] and a[0] == b[0]
    fa, fb = jitted(_build_apply, a[0], 2.0), jitted(_build_apply, b[0], 2.0)
    assert fa is fb and canonical(b[0]) is canonical(a[0])
    x = jnp.ones((2, 3))
    before = compile_count()
    ya, yb = fa(a[1], x), fb(b[1], x)
    assert compile_count() - before == 1
    assert jnp.allclose(ya, 2.0 * nnx.merge(*a)(x)) and jnp.allclose(yb, 2.0 * nnx.merge(*b)(x))
    # Other statics or another structure get their own closure.
    assert jitted(_build_apply, a[0], 3.0) is not fa
    other = nnx.split(nnx.Linear(3, 5, rngs=nnx.Rngs(0)))[0]
    assert jitted(_build_apply, other, 2.0) is not fa
