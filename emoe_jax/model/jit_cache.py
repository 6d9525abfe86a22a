"""Jitted closures over nnx graph definitions, looked up by identity.

Passing a `GraphDef` as a static jit argument makes jax hash it (and compare it
with the cached one) on every call, and flax does not cache that hash: for a
small model it was a quarter to a third of a decode step. Instead, each jitted
function closes over its graph definition, built once per distinct structure:

    step = jitted(_build_step, graphdef, "auto")   # cheap after the first call
    out = step(state, x)

Lookups go by `id(graphdef)`. The first time an object is seen it is hashed
once and mapped to a canonical equal object, so equal graph definitions (every
MoE layer of a model, the same model split again by a second engine) share one
closure and hence one compilation, as they did when jit compared them equal.
The cache keeps a reference to every graph definition it has seen so ids are
never reused; graph definitions are small (jit's own cache kept them too).
"""

from __future__ import annotations

import threading
from typing import Callable, Hashable

_lock = threading.Lock()
_canonical: dict = {}  # graphdef -> the first equal graphdef seen (hashed once per object)
_by_id: dict[tuple, tuple[Callable, tuple]] = {}  # (build, ids..., static...) -> (closure, graphdefs kept alive)


def canonical(graphdef):
    """The canonical object equal to `graphdef` (hashes it: call once per object, not per step)."""
    with _lock:
        return _canonical.setdefault(graphdef, graphdef)


def jitted(build: Callable[..., Callable], graphdefs, *static: Hashable) -> Callable:
    """`build(*graphdefs, *static)` (a jitted closure), cached per build, graph identity and statics.
    `graphdefs`: one graph definition or a tuple of them."""
    if not isinstance(graphdefs, tuple):
        graphdefs = (graphdefs,)
    key = (build, *map(id, graphdefs), *static)
    hit = _by_id.get(key)
    if hit is not None:
        return hit[0]
    canon = tuple(canonical(g) for g in graphdefs)
    with _lock:
        canon_key = (build, *map(id, canon), *static)
        hit = _by_id.get(canon_key)
        if hit is None:
            hit = _by_id[canon_key] = (build(*canon, *static), canon)
        _by_id[key] = (hit[0], graphdefs)  # holding `graphdefs` keeps their ids from being reused
    return hit[0]
