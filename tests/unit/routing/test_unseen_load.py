"""Other callers' load between load reports (BackendState): a report's tickets for the
others' waiting requests stand until the whole queue as it stands would be done, this
gateway's own requests included (capped at REPORT_MAX_AGE_S); the others' rate of
requests, from the sequence numbers this gateway's reports skip; the wait behind the
others' requests sent since the report (`unseen_ms`) that the router adds to its
prediction; and whether a backend is shared (`shared`), which the coalescer reads.
Plain floats for time."""

from __future__ import annotations

import math

import pytest

from backends.protocol.load import PROBE_MODULUS
from gateway.routing.fleet import (
    OTHERS_RATE_TAU_S,
    REPORT_MAX_AGE_S,
    SHARED_WINDOW_S,
    BackendState,
    poisson_quantile,
)
from gateway.routing.router import choose, predict_ms, queue_wait_ms
from gateway.routing.sla import Policy
from tests.unit.routing.builders import REQ, route
from tests.unit.routing.test_load_reports import one_slot, report, waiting


def test_the_others_waiting_tickets_stand_behind_this_gateways_queue() -> None:
    # No requests of this gateway's: the others' 8 ms of waiting work, as before.
    alone = one_slot()
    alone.record_report(report(1, queued=waiting(e25=(2, 8000))), 0.002)
    assert alone.report_until_s == pytest.approx(0.002 + 0.008)

    # One of this gateway's in service since 0 (10 ms, 2 done) and one waiting (10 ms):
    # the others' requests leave the model once all 26 ms of the queue would be done.
    state = one_slot()
    serving = state.admit(None, 10.0, 0.050, 0.0)
    behind = state.admit(None, 10.0, 0.200, 0.0)
    assert state.record_report(report(1, queued=waiting(e25=(2, 8000))), 0.002)
    assert state.serving == [serving] and behind.started_s is None
    assert state.report_until_s == pytest.approx(0.002 + 0.008 + 0.010 + 0.008)
    assert state.in_flight == 4
    # Until then they stand in the queue; after, the gateway's own view is all.
    assert state.due_before(0.0271) == (1, 8.0)
    state.expire_report(0.027)
    assert state.in_flight == 4
    state.expire_report(0.0281)
    assert state.in_flight == 2 and state.due_before(math.inf) == (1, 10.0)

    # Two slots share the queue's work: (8 + 10 + 8) ms over two.
    two = BackendState("b", "127.0.0.1:1", "cpu", 1.0, slots=2)
    for due_s in (0.050, 0.060, 0.200):
        two.admit(None, 10.0, due_s, 0.0)
    two.record_report(report(1, queued=waiting(e25=(2, 8000))), 0.002)
    assert two.report_until_s == pytest.approx(0.002 + (8.0 + 8.0 + 10.0 + 8.0) / 2 / 1000)


def test_the_others_batch_running_counts_once_in_the_queue_ahead() -> None:
    """The others' running batch, placed ahead of everything when this gateway's own
    request holds the slot in its view, is 5 ms of the queue: once."""
    state = one_slot()
    state.admit(None, 10.0, 0.050, 0.0)  # 10 ms from 0: 6 ms left at 0.004
    state.record_report(report(1, in_service=1, rest_us=5000, queued=waiting(e50=(1, 3000))), 0.004)
    assert state.report_until_s == pytest.approx(0.004 + 0.006 + 0.005 + 0.003)
    # With a slot free for it, the same: the batch's rest, then the waiting 3 ms.
    free = one_slot()
    free.record_report(report(1, in_service=1, rest_us=5000, queued=waiting(e50=(1, 3000))), 0.004)
    assert free.report_until_s == pytest.approx(0.004 + 0.005 + 0.003)


def test_the_queue_ahead_holds_the_others_tickets_at_most_report_max_age() -> None:
    state = one_slot()
    state.admit(None, 5_000.0, 10.0, 0.0)  # five seconds of this gateway's own work
    state.record_report(report(1, queued=waiting(later=(1, 1000))), 0.001)
    assert state.report_until_s == pytest.approx(0.001 + REPORT_MAX_AGE_S)


def test_the_others_rate_comes_from_the_reports_this_gateway_did_not_get() -> None:
    state = one_slot()
    state.record_report(report(1), 0.0)
    assert state.others_rate == 0.0  # one report: no gap yet
    # Reports 2 to 7 went to other callers in half a second; 8 is this gateway's own.
    state.record_report(report(8), 0.5)
    weight = 1.0 - math.exp(-0.5 / OTHERS_RATE_TAU_S)
    first = weight * 6 / 0.5
    assert state.others_rate == pytest.approx(first)
    # The next is this gateway's again with none between: the mean falls, time-weighted.
    state.record_report(report(9), 1.0)
    assert state.others_rate == pytest.approx(first * (1.0 - weight))
    second = state.others_rate
    # An older report (overtaken on another stream) is ignored, the rate with it...
    assert not state.record_report(report(4), 1.1)
    assert state.others_rate == second
    # ...and one taken because the standing report is old (a restarted worker's,
    # counting from 1 again) gives no gap: the rate stands.
    assert state.record_report(report(1), 1.0 + REPORT_MAX_AGE_S)
    assert state.others_rate == second
    # A long gap weighs almost alone: 90 others' reports over 10 s.
    state.record_report(report(92), 11.0 + REPORT_MAX_AGE_S)
    assert state.others_rate == pytest.approx(9.0, rel=1e-3)
    # Two reports at the same instant give no rate (no time between them).
    same = one_slot()
    same.record_report(report(1), 2.0)
    same.record_report(report(5), 2.0)
    assert same.others_rate == 0.0


def reported(slots: int = 1, rtt_ms: float = 0.0) -> BackendState:
    """A backend whose reports said 300 other callers' requests a second (over 10 s),
    the last showing 3 of theirs waiting (6 ms of work) at t = 10 s."""
    state = BackendState("b", "127.0.0.1:1", "cpu", 1.0, slots=slots)
    state.network.rtt_ms = rtt_ms
    state.record_report(report(1), 0.0)
    state.record_report(report(3002, queued=waiting(e10=(3, 6000))), 10.0)
    assert state.others_rate == pytest.approx(300.0, rel=1e-3)
    assert state.report_work_ms == pytest.approx(6.0 / slots)
    return state


def test_the_probes_among_the_skipped_reports_count_apart() -> None:
    """Reports that tell the worker's probe count split the reports sent to others
    between two of this gateway's into probes and other callers' requests; a report that
    does not tell (an older worker) leaves them all requests, as before."""
    state = one_slot()
    state.record_report(report(1, probes=7), 0.0)
    # Reports 2 to 7 went to others in half a second, 2 of them answering probes.
    state.record_report(report(8, probes=9), 0.5)
    weight = 1.0 - math.exp(-0.5 / OTHERS_RATE_TAU_S)
    assert state.others_rate == pytest.approx(weight * 4 / 0.5)
    assert state.probes_rate == pytest.approx(weight * 2 / 0.5)
    # The count wraps at PROBE_MODULUS; never more probes than reports skipped.
    wrap = one_slot()
    wrap.record_report(report(1, probes=PROBE_MODULUS - 1), 0.0)
    wrap.record_report(report(4, probes=1), 0.5)
    assert wrap.probes_rate == pytest.approx(weight * 2 / 0.5) and wrap.others_rate == 0.0
    odd = one_slot()
    odd.record_report(report(1, probes=0), 0.0)
    odd.record_report(report(3, probes=50), 0.5)
    assert odd.probes_rate == pytest.approx(weight * 1 / 0.5) and odd.others_rate == 0.0
    untold = one_slot()
    untold.record_report(report(1), 0.0)
    untold.record_report(report(8), 0.5)
    assert untold.others_rate == pytest.approx(weight * 6 / 0.5) and untold.probes_rate == 0.0


def test_an_idle_gateways_probes_count_at_their_expected_number_not_the_percentile() -> None:
    """A one-slot backend that another, idle gateway probes about once a second: at p99,
    counted as requests, a probe would stand a whole request ahead of every request;
    counted at their expected number, they add that fraction of one."""
    probed, counted = one_slot(), one_slot()
    for state, probes in ((probed, 0), (counted, None)):
        state.network.rtt_ms = 0.0
        state.record_report(report(1, probes=probes), 0.0)
        # A probe of the other gateway's running as this report was made: shared.
        later = None if probes is None else 10
        state.record_report(report(12, in_service=1, rest_us=5000, probes=later), 10.0)
    assert probed.others_rate == 0.0 and probed.probes_rate > 0.0
    assert counted.others_rate == pytest.approx(probed.probes_rate)
    mean, now = 30.0, 10.02
    assert probed.shared(now) and counted.shared(now)
    for state in (probed, counted):  # the report's work done; one request of its own runs
        state.expire_report(now)
        state.admit(None, mean, now + 0.1, now)
        assert state.in_flight == 1
    assert counted.unseen_ms(mean, now, 99.0) == pytest.approx(mean)  # one whole request
    fraction = probed.probes_rate * 0.02 * math.exp(-0.02)
    assert probed.unseen_ms(mean, now, 99.0) == pytest.approx(fraction * mean)
    assert probed.unseen_ms(mean, now, 99.0) == probed.unseen_ms(mean, now)
    assert 0.0 < probed.unseen_ms(mean, now, 99.0) < 0.05 * mean


def test_no_unseen_wait_without_reports_of_others() -> None:
    state = one_slot()
    assert state.unseen_ms(2.0, 1.0) == 0.0
    state.record_report(report(1, queued=waiting(e10=(3, 6000))), 1.0)
    state.record_report(report(2), 1.5)  # this gateway's reports only: no gap
    assert state.others_rate == 0.0 and state.unseen_ms(2.0, 1.6) == 0.0


def test_a_lone_gateways_skipped_numbers_add_no_unseen_wait() -> None:
    """Alone at a backend, a gateway's reports skip numbers all the same (its latency
    probes' answers, reports overtaken on another stream), but none shows another
    caller's request: the backend is not shared, and nothing unseen is counted."""
    state = one_slot()
    state.record_report(report(10), 1.0)
    state.record_report(report(14), 1.01)  # three probes' answers between
    state.record_report(report(13), 1.011)  # overtaken: ignored
    assert state.others_rate > 0.0 and not state.shared(1.012)
    state.admit(None, 2.0, 1.1, 1.012)
    assert state.unseen_ms(2.0, 1.012) == 0.0


def test_the_poisson_quantile_counts_the_arrivals_a_window_holds_at_a_percentile() -> None:
    assert poisson_quantile(0.0, 0.99) == 0.0
    # A third of an arrival expected: none 72% of the time, so one at p50 is not needed,
    # at p90 and p99 it is (27% hold one or more), and two at p99 (4.5% hold two or more).
    assert poisson_quantile(1 / 3, 0.5) == 0.0
    assert poisson_quantile(1 / 3, 0.9) == 1.0
    assert poisson_quantile(1 / 3, 0.99) == 2.0
    assert poisson_quantile(4.0, 0.99) == 9.0  # scipy.stats.poisson.ppf(0.99, 4)
    assert poisson_quantile(80.0, 0.99) == 80.0  # large: its mean stands


def test_the_unseen_wait_at_a_percentile_counts_whole_requests() -> None:
    """The router meets its SLA at a percentile: the unseen requests it counts are as
    many as the others' rate brings there, not their expected fraction."""
    state = reported()
    mean, now = 2.0, 10.002
    expected = state.unseen_ms(mean, now) / mean  # requests, at their mean
    assert 0.0 < expected < 1.0
    assert state.unseen_ms(mean, now, 99.0) == pytest.approx(
        poisson_quantile(expected, 0.99) * mean
    )
    assert state.unseen_ms(mean, now, 99.0) >= mean > state.unseen_ms(mean, now)
    assert queue_wait_ms(state, mean, 3.0, 100.0, 99.0, now) >= state.unseen_ms(mean, now, 99.0)


def test_the_unseen_wait_grows_with_the_reports_age_up_to_its_work_then_fades() -> None:
    state = reported()
    rate, mean = state.others_rate, 2.0
    # The report's queue holds the slot (3 requests in flight): no slot free.
    assert state.in_flight == 3
    assert state.unseen_ms(mean, 10.0) == 0.0  # made this instant, no round trip

    def expected(age_s: float) -> float:
        return rate * age_s * math.exp(-age_s / OTHERS_RATE_TAU_S) * mean

    ages = [0.001, 0.002, 0.004, 0.006]
    waits = [state.unseen_ms(mean, 10.0 + age) for age in ages]
    assert waits == sorted(waits) and waits[0] > 0.0
    assert waits == pytest.approx([expected(age) for age in ages])
    # Capped at the report's work and one request more (6 + 2 ms): those sent earlier
    # have been served by then; only the fade lowers it after.
    capped = rate * 0.008 * mean
    assert state.unseen_ms(mean, 10.008) == pytest.approx(capped * math.exp(-0.008))
    assert state.unseen_ms(mean, 10.2) == pytest.approx(capped * math.exp(-0.2))
    assert state.unseen_ms(mean, 10.9) == pytest.approx(capped * math.exp(-0.9))
    # Once no report has shown the others for SHARED_WINDOW_S, none is counted.
    assert state.unseen_ms(mean, 10.0 + SHARED_WINDOW_S) == 0.0
    # A round trip counts too: the report was made half of one before it came, and
    # a request sent now reaches the backend half of one after.
    far = reported(rtt_ms=3.0)
    assert far.unseen_ms(mean, 10.001) == pytest.approx(expected(0.004) / math.exp(-0.003))


def test_the_unseen_wait_is_less_the_slots_free() -> None:
    # 3,000 other callers' requests a second; their last report showed 2 waiting
    # (16 ms of work, 4 ms over the 4 slots), which hold one slot (a ticket).
    state = BackendState("b", "127.0.0.1:1", "cpu", 1.0, slots=4)
    state.network.rtt_ms = 0.0
    state.record_report(report(1), 0.0)
    state.record_report(report(30_002, queued=waiting(e10=(2, 16_000))), 10.0)
    assert state.in_flight == 2 and state.report_until_s == pytest.approx(10.004)
    mean = 2.0
    ahead = state.others_rate * 0.003 * math.exp(-0.003)  # 3 ms on: about 9 unseen
    # Two slots free in this gateway's view: two of those unseen take them.
    assert state.unseen_ms(mean, 10.003) == pytest.approx((ahead - 2) * mean / 4)
    state.admit(None, 2.0, 10.1, 10.003)
    assert state.in_flight == 3
    assert state.unseen_ms(mean, 10.003) == pytest.approx((ahead - 1) * mean / 4)
    # As many slots free as unseen requests, or more: no wait.
    idle = reported(slots=4)
    idle.expire_report(10.1)  # the report's tickets leave: four slots free
    assert idle.in_flight == 0 and idle.others_rate > 0.0
    assert idle.unseen_ms(mean, 10.1) == 0.0


def test_clear_forgets_the_others() -> None:
    state = reported()
    assert state.unseen_ms(2.0, 10.004) > 0.0 and state.shared(10.004)
    state.clear()
    assert state.others_rate == 0.0 and state.report_work_ms == 0.0
    assert state.unseen_ms(2.0, 10.004) == 0.0 and not state.shared(10.004)


def test_a_backend_is_shared_for_a_while_after_a_report_showed_others() -> None:
    state = one_slot()
    assert not state.shared(0.0)
    state.record_report(report(1), 1.0)
    state.record_report(report(5), 1.1)  # others' requests answered, none in its queue
    assert not state.shared(1.1)
    state.record_report(report(6, queued=waiting(e50=(1, 2000))), 2.0)
    assert state.shared(2.0) and state.shared(2.0 + SHARED_WINDOW_S * 0.99)
    # A later report showing none does not renew it; the window runs out.
    state.record_report(report(7), 2.5)
    assert state.shared(2.5)
    assert not state.shared(2.0 + SHARED_WINDOW_S)
    # One running for them counts too.
    state.record_report(report(8, in_service=1, rest_us=1000), 4.0)
    assert state.shared(4.0) and not state.shared(4.0 + SHARED_WINDOW_S)


def test_the_router_counts_the_unseen_wait_and_picks_the_next_route() -> None:
    """The cheap backend's 3 ms p99 meets a 5 ms SLA, and its last report's work is done
    (its slot free in this gateway's view); but the others' requests sent since, 600 a
    second, push it past, and the dear one takes the request until the wait fades."""
    policy = Policy(latency_ms=5.0)
    cheap, dear = route("cheap", 0.04, p50=2.0, p99=3.0), route("dear", 2.0, p50=0.5, p99=1.0)
    assert choose(REQ, [cheap, dear], policy, 10.0).route is cheap
    cheap.state.record_report(report(1), 0.0)
    cheap.state.record_report(report(6002, queued=waiting(e10=(3, 6000))), 10.0)
    now = 10.007  # the report's 6 ms of work is done: its tickets leave
    decision = choose(REQ, [cheap, dear], policy, now)
    assert decision.route is dear
    assert cheap.state.in_flight == 0
    mean = cheap.estimate.mean_ms
    unseen = cheap.state.unseen_ms(mean, now, 99.0)
    assert unseen > 5.0 - 3.0
    # `queue_wait_ms` is that wait alone (no queue of its own), and so the prediction.
    wait = queue_wait_ms(cheap.state, mean, cheap.estimate.p99_ms, 5.0, 99.0, now)
    assert wait == pytest.approx(unseen)
    assert predict_ms(cheap, 99.0, now, sla_ms=5.0) == pytest.approx(cheap.estimate.p99_ms + wait)
    # Seconds on, faded: the cheap route again.
    assert cheap.state.unseen_ms(mean, 14.0) == 0.0
    assert choose(REQ, [cheap, dear], policy, 14.0).route is cheap


def test_queue_wait_and_choose_agree_on_the_unseen_wait() -> None:
    """What `predict_ms` (hedging, explain) predicts for a route is what `choose` worked
    with, also once the report's work is done but its tickets not yet dropped."""
    policy = Policy(latency_ms=50.0)
    for now in (10.003, 10.005, 10.007, 10.010, 10.5):
        cheap = route("cheap", 0.04, p50=2.0, p99=3.0)
        cheap.state.record_report(report(1), 0.0)
        cheap.state.record_report(report(3002, queued=waiting(e10=(3, 6000))), 10.0)
        predicted = predict_ms(cheap, 99.0, now, sla_ms=50.0)
        fresh = route("cheap", 0.04, p50=2.0, p99=3.0)
        fresh.state.record_report(report(1), 0.0)
        fresh.state.record_report(report(3002, queued=waiting(e10=(3, 6000))), 10.0)
        decision = choose(REQ, [fresh], policy, now)
        assert decision.predicted_ms == pytest.approx(predicted), now
