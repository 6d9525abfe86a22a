"""Eq. 3 latency estimate and Alg. 1 admission/ordering on hand-worked cases."""

import pytest

from emoe_jax.emoe.latency import LatencyModel, LatencyModelError
from emoe_jax.emoe.scheduler import Request, SchedulerError, fcfs, slo_admit, ttft_estimates

# d = 0.5 s per expert, c = 0.01 s per prefill token, 0.1 s per decode token.
MODEL = LatencyModel(0.5, 0.01, 0.1)


def req(rid, arrival, w, slo, g=10, task="x"):
    return Request(rid=rid, task=task, arrival=arrival, prompt_tokens=w, output_tokens=g, ttft_slo=slo)


def test_eq3_by_hand():
    # t = d*E + W*c_p + n*G*c_d + r = 0.5*2 + 100*0.01 + 3*10*0.1 + 4 = 1 + 1 + 3 + 4
    assert MODEL.latency(2, 100, 3, 10, 4.0) == pytest.approx(9.0)
    assert MODEL.ttft(2, 100, 4.0) == pytest.approx(6.0)
    paper = LatencyModel.paper(d=0.5, c=0.01)  # one c: (W + n*G) * c
    assert paper.latency(2, 100, 3, 10, 4.0) == pytest.approx(1 + (100 + 30) * 0.01 + 4)


def test_observe_is_an_ewma_of_measured_constants():
    m = LatencyModel(1.0, 1.0, 1.0, smoothing=0.5)
    m.observe(prefill_s=2.0, prefill_tokens=100, decode_s=3.0, decode_tokens=10)
    assert m.prefill_s_per_token == pytest.approx(0.5 * 1.0 + 0.5 * 0.02)
    assert m.decode_s_per_token == pytest.approx(0.5 * 1.0 + 0.5 * 0.3)
    assert m.load_s_per_expert == 1.0  # nothing loaded: unchanged
    with pytest.raises(LatencyModelError, match="load_s_per_expert"):
        LatencyModel(-1.0, 0.0, 0.0)


# now = 10. B: deadline 13, C: 26, A: 30 (long prompt), D: 49.
B = req(1, 5.0, 50, 8.0)
C = req(2, 6.0, 50, 20.0)
A = req(0, 0.0, 400, 30.0)
D = req(3, 9.0, 20, 40.0)


def test_alg1_orders_by_deadline_and_skips_a_request_that_breaks_an_admitted_slo():
    # B alone: TTFT = waited 5 + 50*0.01 = 5.5 <= 8.  + C: W=100 -> B 6.0 <= 8, admit.
    # + A: W=500 -> B 5 + 5 = 10 > 8: A would break B's SLO, skip (it keeps waiting).
    # + D: W=120 -> B 6.2, C 4 + 1.2 = 5.2: admit.
    batch = slo_admit([A, B, C, D], now=10.0, model=MODEL, token_cap=10_000, max_batch=8)
    assert [r.rid for r in batch] == [1, 2, 3]
    assert ttft_estimates(batch, 10.0, MODEL) == pytest.approx([6.2, 5.2, 2.2])


def test_alg1_a_request_whose_slo_is_already_lost_does_not_veto():
    lost_b = req(1, 5.0, 50, 4.0)  # alone 5.5 > 4: lost whatever we do
    batch = slo_admit([A, lost_b, C], now=10.0, model=MODEL, token_cap=10_000, max_batch=8)
    # deadline order: B (9), C (26), A (30); + C: B not newly broken, C fine; + A: C 4 + 5 = 9 <= 20.
    assert [r.rid for r in batch] == [1, 2, 0]


def test_alg1_token_cap_and_batch_size_skip_but_keep_walking():
    # tokens: B 60, C 60, A 410, D 30. Cap 410: B + C = 120, A (530) skipped by the cap, D -> 150.
    batch = slo_admit([A, B, C, D], now=10.0, model=MODEL, token_cap=410, max_batch=8)
    assert [r.rid for r in batch] == [1, 2, 3]
    # Cap 150: B + C = 120, E (110 tokens, deadline 59.5) would make 230: skipped; D after it fits exactly.
    late_d = req(3, 9.0, 20, 60.0)
    batch = slo_admit([B, C, late_d, req(4, 9.5, 100, 50.0)], now=10.0, model=MODEL, token_cap=150, max_batch=8)
    assert [r.rid for r in batch] == [1, 2, 3]
    batch = slo_admit([A, B, C, D], now=10.0, model=MODEL, token_cap=10_000, max_batch=2)
    assert [r.rid for r in batch] == [1, 2]


def test_alg1_expert_loading_enters_the_estimate():
    # A batch with a task-"y" request needs 4 experts loaded: d*E = 2.0 s (d = 0.5), 2.4 s (d = 0.6).
    y = req(2, 6.0, 50, 20.0, task="y")

    def loads(batch):
        return 4 if any(r.task == "y" for r in batch) else 0

    # d = 0.5: B with y: 5 + 2.0 + 1.0 = 8.0 <= 8: admitted.
    assert [r.rid for r in slo_admit([B, y], 10.0, MODEL, 10_000, 8, loads)] == [1, 2]
    # d = 0.6: 5 + 2.4 + 1.0 = 8.4 > 8: y would break B's SLO.
    slower = LatencyModel(0.6, 0.01, 0.1)
    assert [r.rid for r in slo_admit([B, y], 10.0, slower, 10_000, 8, loads)] == [1]


def test_alg1_always_admits_the_first_request_and_fcfs_keeps_arrival_order():
    assert [r.rid for r in slo_admit([A], 10.0, MODEL, 10_000, 1)] == [0]
    assert slo_admit([], 10.0, MODEL, 10_000, 1) == []
    # FCFS: arrival order A, B, C, D; A (410 tokens) first, then B; C does not fit 480 -> stop.
    assert [r.rid for r in fcfs([D, C, B, A], token_cap=480, max_batch=8)] == [0, 1]
    assert [r.rid for r in fcfs([D, C, B, A], token_cap=10_000, max_batch=3)] == [0, 1, 2]


def test_request_larger_than_the_cap_is_a_clear_error():
    with pytest.raises(SchedulerError, match="token cap"):
        slo_admit([A], 10.0, MODEL, token_cap=100, max_batch=4)
    with pytest.raises(SchedulerError, match="max batch"):
        fcfs([A], token_cap=1000, max_batch=0)
