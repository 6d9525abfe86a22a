"""Request admission and ordering: FCFS, and eMoE's SLO-aware Alg. 1 (arXiv 2503.06823).

The engine runs one batch at a time (static batching: a batch is prefilled
together and decoded to its longest request). Whenever it is free, a policy
picks the next batch from the requests that have arrived.

``fcfs``: arrival order; stop at the first request that does not fit the
token cap or the batch size (head-of-line order is kept).

``slo_admit`` (Alg. 1, as we read it; the paper's pseudo-code is summarised in
docs/emoe.md):
  1. sort the waiting requests by TTFT deadline (arrival + the task's TTFT
     SLO); ties by arrival, then id;
  2. walk that order; a request is skipped (it keeps waiting) when adding it
     would exceed the token cap (prompt + expected output tokens of the batch:
     the KV cache it needs) or the batch size;
  3. otherwise estimate, with Eq. 3 (``LatencyModel.ttft``), every already
     admitted request's time to first token with the candidate in the batch;
     admit the candidate only if no admitted request that would meet its SLO
     without the candidate misses it with it. The candidate's own SLO is no
     condition: it is served in deadline order, and one that can no longer
     make its deadline must still be served;
  4. the admitted requests form the batch, in deadline order.
The first request in deadline order is always admitted when it fits the cap,
so the queue never stalls.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from emoe_jax.errors import EmoeError
from .latency import LatencyModel


class SchedulerError(EmoeError):
    """Bad scheduler input: a request larger than the token cap, a bad cap or batch size."""


@dataclasses.dataclass(frozen=True)
class Request:
    rid: int
    task: str  # the task the system extracted (decides G and the SLO it schedules for)
    arrival: float  # seconds on the serving clock
    prompt_tokens: int  # W_i
    output_tokens: int  # G_i: expected output length of the task
    ttft_slo: float  # seconds from arrival to the first token

    @property
    def deadline(self) -> float:
        return self.arrival + self.ttft_slo

    @property
    def tokens(self) -> int:
        """KV-cache tokens the request occupies: prompt + output."""
        return self.prompt_tokens + self.output_tokens


def check_fits(requests: Sequence[Request], token_cap: int, max_batch: int) -> None:
    if token_cap < 1 or max_batch < 1:
        raise SchedulerError(f"token cap and max batch must be >= 1, got {token_cap} and {max_batch}")
    for r in requests:
        if r.tokens > token_cap:
            raise SchedulerError(f"request {r.rid} needs {r.tokens} tokens (prompt {r.prompt_tokens} + output "
                                 f"{r.output_tokens}) but the token cap is {token_cap}; raise the cap or cut the prompt")  # fmt: skip


def fcfs(waiting: Sequence[Request], token_cap: int, max_batch: int) -> list[Request]:
    """The longest arrival-order prefix of ``waiting`` within the token cap and batch size."""
    check_fits(waiting, token_cap, max_batch)
    batch, tokens = [], 0
    for r in sorted(waiting, key=lambda r: (r.arrival, r.rid)):
        if len(batch) == max_batch or tokens + r.tokens > token_cap:
            break
        batch.append(r)
        tokens += r.tokens
    return batch


def slo_admit(waiting: Sequence[Request], now: float, model: LatencyModel, token_cap: int, max_batch: int,
              experts_to_load: Callable[[Sequence[Request]], int] | int = 0, busy_s: float = 0.0) -> list[Request]:
    """Alg. 1: the batch to run next, in TTFT-deadline order (see the module docstring).

    ``experts_to_load``: E of Eq. 3 for a candidate batch (a number, or a function of
    the batch); ``busy_s``: time until the engine is free (0 when it is idle).
    """
    check_fits(waiting, token_cap, max_batch)
    loads = experts_to_load if callable(experts_to_load) else (lambda _batch: int(experts_to_load))

    def ttfts(batch: Sequence[Request]) -> list[float]:
        e, w = loads(batch), sum(r.prompt_tokens for r in batch)
        return [model.ttft(e, w, max(now - r.arrival, 0.0) + busy_s) for r in batch]

    batch: list[Request] = []
    tokens = 0
    for cand in sorted(waiting, key=lambda r: (r.deadline, r.arrival, r.rid)):
        if len(batch) == max_batch or tokens + cand.tokens > token_cap:
            continue
        if batch:
            before = ttfts(batch)
            after = ttfts([*batch, cand])[:-1]
            if any(b <= r.ttft_slo < a for r, b, a in zip(batch, before, after)):
                continue  # admitting it would make an admitted request miss its SLO
        batch.append(cand)
        tokens += cand.tokens
    return batch


def ttft_estimates(batch: Sequence[Request], now: float, model: LatencyModel, experts_to_load: int = 0,
                   busy_s: float = 0.0) -> list[float]:
    """Eq. 3 TTFT (from arrival) of every request of ``batch`` if it runs as one batch now."""
    w = sum(r.prompt_tokens for r in batch)
    return [model.ttft(experts_to_load, w, max(now - r.arrival, 0.0) + busy_s) for r in batch]
