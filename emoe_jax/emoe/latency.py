"""eMoE's latency estimate (Eq. 3 of arXiv 2503.06823) with constants measured on the engine.

Eq. 3 estimates the latency of request i as

    t_i = d * E + (W + n_i * G_i) * c + r_i

with d the time to load one expert, E the experts that must be loaded before the
request can run, W the prompt tokens that are prefilled with it, n_i * G_i the
decode tokens (n_i requests in the batch, G_i the task's expected output length),
c the time per token and r_i the time the request has waited and still waits
before the engine is free.

Interpretation (the paper gives the formula, not how its constants are obtained):
- c is split into a prefill and a decode constant (``prefill_s_per_token``,
  ``decode_s_per_token``); with both equal this is exactly Eq. 3. On every
  backend prefill tokens are far cheaper than decode tokens, so one c misjudges
  one of the two.
- W is the prompt tokens of the whole batch the request is prefilled with: a
  request's first token comes after the batch's prefill.
- The TTFT part drops the decode term: ``ttft = d * E + W * c_prefill + r``.
- The constants are calibrated from measured runs (``observe``: an
  exponentially weighted mean), never assumed.
"""

from __future__ import annotations

import dataclasses

from emoe_jax.errors import EmoeError


class LatencyModelError(EmoeError):
    """Negative or missing constants or inputs of the latency estimate."""


@dataclasses.dataclass
class LatencyModel:
    load_s_per_expert: float  # d
    prefill_s_per_token: float  # c during prefill
    decode_s_per_token: float  # c during decode
    smoothing: float = 0.5  # weight of a new measurement in observe()

    def __post_init__(self) -> None:
        for name in ("load_s_per_expert", "prefill_s_per_token", "decode_s_per_token"):
            if not getattr(self, name) >= 0:
                raise LatencyModelError(f"{name} must be >= 0 seconds, got {getattr(self, name)}")
        if not 0 < self.smoothing <= 1:
            raise LatencyModelError(f"smoothing must be in (0, 1], got {self.smoothing}")

    @classmethod
    def paper(cls, d: float, c: float) -> "LatencyModel":
        """Eq. 3 exactly: one per-token constant c for prefill and decode."""
        return cls(d, c, c)

    def ttft(self, experts_to_load: int, batch_prompt_tokens: int, wait_s: float) -> float:
        """Time from now to the first token: d * E + W * c_prefill + r (r: queueing still ahead + waited)."""
        _check_counts(experts_to_load, batch_prompt_tokens, wait_s)
        return self.load_s_per_expert * experts_to_load + batch_prompt_tokens * self.prefill_s_per_token + wait_s

    def latency(self, experts_to_load: int, batch_prompt_tokens: int, batch_size: int, output_tokens: float,
                wait_s: float) -> float:
        """Eq. 3: t_i = d * E + W * c_prefill + n_i * G_i * c_decode + r_i."""
        if batch_size < 1 or output_tokens < 0:
            raise LatencyModelError(f"need batch_size >= 1 and output_tokens >= 0, got {batch_size}, {output_tokens}")
        return (self.ttft(experts_to_load, batch_prompt_tokens, wait_s)
                + batch_size * output_tokens * self.decode_s_per_token)  # fmt: skip

    def observe(self, *, prefill_s: float = 0.0, prefill_tokens: int = 0, decode_s: float = 0.0,
                decode_tokens: int = 0, load_s: float = 0.0, experts_loaded: int = 0) -> None:
        """Fold one measured run into the constants (only the parts that were measured)."""
        a = self.smoothing
        if prefill_tokens > 0:
            self.prefill_s_per_token = (1 - a) * self.prefill_s_per_token + a * prefill_s / prefill_tokens
        if decode_tokens > 0:
            self.decode_s_per_token = (1 - a) * self.decode_s_per_token + a * decode_s / decode_tokens
        if experts_loaded > 0:
            self.load_s_per_expert = (1 - a) * self.load_s_per_expert + a * load_s / experts_loaded

    def as_dict(self) -> dict:
        return {"load_s_per_expert": self.load_s_per_expert, "prefill_s_per_token": self.prefill_s_per_token,
                "decode_s_per_token": self.decode_s_per_token}  # fmt: skip


def _check_counts(experts: int, tokens: int, wait_s: float) -> None:
    if experts < 0 or tokens < 0 or wait_s < 0:
        raise LatencyModelError(f"experts to load, prompt tokens and wait must be >= 0, got {experts}, {tokens}, {wait_s}")
