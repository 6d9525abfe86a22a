"""Checking sampling arguments at the API and CLI boundary.

The sampler itself is `emoe_jax.runtime.stages.sample` (used by the staged loop and,
in-graph, by the one-jit decode step). Its edges follow transformers:
  - temperature 0 means greedy (transformers' `do_sample=False`); a negative or
    non-finite temperature is an error (transformers: "has to be a strictly
    positive float"), never silently greedy;
  - top_p in [0, 1] (transformers' `TopPLogitsWarper` range): a token is kept when
    the probability mass of the tokens ranked above it is below top_p, and the most
    probable token is always kept (`min_tokens_to_keep=1`), so top_p = 0 samples
    only the argmax and top_p = 1 keeps every token.
"""

from __future__ import annotations

import math

from emoe_jax.errors import EmoeError


class SamplingError(EmoeError):
    """A temperature or top-p the sampler cannot honour; the message says what is allowed."""


def check_sampling(temperature: float, top_p: float, names: tuple[str, str] = ("temperature", "top_p")) -> None:
    """Raise SamplingError for a temperature < 0 (or NaN/inf) or a top_p outside [0, 1].
    `names`: how the caller spells the two (e.g. the CLI flags), for the message."""
    try:
        t, p = float(temperature), float(top_p)
    except (TypeError, ValueError):
        raise SamplingError(f"{names[0]}={temperature!r} and {names[1]}={top_p!r} must be numbers") from None
    if not math.isfinite(t) or t < 0:
        raise SamplingError(
            f"{names[0]}={temperature} is invalid: use 0 for greedy decoding or a positive value "
            "(e.g. 0.7) to sample")
    if not math.isfinite(p) or not 0 <= p <= 1:
        raise SamplingError(
            f"{names[1]}={top_p} is invalid: it is a probability mass in [0, 1] (1 keeps every token, "
            "0 keeps only the most probable one)")
