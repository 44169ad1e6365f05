"""The fleet state (gateway/routing/fleet.py): a backend's queue model (slots taken,
requests waiting earliest deadline first), routes per backend and variant seeded from
profiles, passive outlier detection, drains and prices, and traffic shares."""

from __future__ import annotations

import pytest

from gateway.routing.fleet import BackendState, Ejection, FleetState, Route
from gateway.routing.router import ROW_FRACTION, choose
from gateway.routing.sla import Policy
from tests.unit.routing.builders import INFO, REQ, route, two_backends


def test_a_backend_takes_waiting_requests_earliest_deadline_first() -> None:
    state = BackendState("b", "127.0.0.1:1", "cpu", 1.0, slots=1)
    running = state.admit(None, 5.0, 9.0, 0.0)
    assert running.started_s == 0.0
    bronze = state.admit(None, 5.0, 0.250, 0.001)
    gold = state.admit(None, 1.0, 0.011, 0.001)
    silver = state.admit(None, 2.0, 0.032, 0.002)
    assert (state.in_flight, state.queued) == (4, 3)
    assert state.due_before(0.030) == (1, 1.0)
    assert state.due_before(0.300) == (3, 8.0)
    # An answer frees the slot for the request due first, whatever came first.
    assert state.finish(running, 0.004) is gold and gold.started_s == 0.004
    # A waiting request answered (it travelled in a merged call) frees no slot.
    assert state.finish(silver, 0.005) is None
    assert (state.in_flight, state.queued) == (2, 1)
    assert state.finish(gold, 0.006) is bronze
    assert state.finish(bronze, 0.010) is None and state.in_flight == 0
    # A long queue: every request leaves in deadline order, the list compacting as it goes.
    state.admit(None, 1.0, 0.0, 0.0)
    dues = [((i * 37) % 101) / 1000.0 for i in range(100)]
    for due in dues:
        state.admit(None, 1.0, due, 0.0)
    order = []
    current = state.serving[0]
    while True:
        nxt = state.finish(current, 1.0)
        if nxt is None:
            break
        order.append(nxt.due_s)
        current = nxt
    assert order == sorted(dues) and state.in_flight == 0 and state.queued == 0
    # A backend that dies loses everything in flight at once.
    lost = [state.admit(None, 1.0, float(i), 0.0) for i in range(3)]
    assert sorted(state.clear(), key=lambda t: t.due_s) == lost
    assert (state.in_flight, state.queued, state.finish(lost[0], 1.0)) == (0, 0, None)


def test_fleet_has_a_route_per_backend_and_variant_seeded_from_the_profile() -> None:
    fleet = two_backends()
    assert fleet.routes("m") == [] and not fleet.any_ready()
    fleet.record_probe("a", 1.0, {"m": INFO})
    fleet.record_probe("b", 1.0, {})
    routes = fleet.routes("m")
    assert [(r.backend, r.variant, r.default) for r in routes] == [
        ("a", "ort-cpu-fp32", True),
        ("a", "ort-cpu-int8-qdq", False),
    ]
    assert routes[1].estimate.p50_ms == pytest.approx(1.0, rel=0.08)
    assert routes[0].estimate.p99_ms == pytest.approx(3.0, rel=0.08)
    # Each extra row of a batch: the profile's fraction, else the default.
    assert (routes[0].row_fraction, routes[1].row_fraction) == (ROW_FRACTION, 0.1)
    # The faster variant costs less busy time: the router picks it.
    decision = choose(REQ, routes, Policy(latency_ms=10), 2.0)
    assert decision.route is routes[1]
    # Estimates survive a re-probe with the same models.
    routes[1].estimate.observe(5.0, 2.0)
    fleet.record_probe("a", 3.0, {"m": INFO})
    assert fleet.routes("m")[1] is routes[1]
    ticket = routes[0].state.admit(routes[0], 1.0, 4.0, 3.0)
    assert routes[0].state.in_flight == 1
    routes[0].state.finish(ticket, 3.1)
    assert routes[0].state.in_flight == 0
    fleet.record_failure("a", 4.0, "connection refused")
    assert fleet.available_routes("m") == [] and not fleet.model_ready("m")
    assert fleet.model_info("m") == INFO  # metadata survives for the API
    assert fleet.backends["a"].consecutive_failures == 1


def test_passive_outlier_detection_ejects_with_growing_back_off() -> None:
    fleet = two_backends()
    fleet.record_probe("a", 0.0, {"m": INFO})
    r = fleet.routes("m")[0]
    assert not fleet.record_attempt(r, False, 1.0, "INTERNAL: boom")
    assert fleet.record_attempt(r, False, 1.0, "INTERNAL: boom")
    assert r.state.status == "ejected" and not r.state.available
    assert "after 2 failures" in r.state.last_error
    # A probe before the back-off passes does not re-admit; after it, it does.
    fleet.record_probe("a", 1.5, {"m": INFO})
    assert not r.state.available
    fleet.record_probe("a", 2.0, {"m": INFO})
    assert r.state.available
    # Failing again right away: twice as long.
    fleet.record_attempt(r, False, 2.1)
    fleet.record_attempt(r, False, 2.1)
    assert r.state.ejected_until_s == pytest.approx(4.1)
    fleet.record_probe("a", 4.1, {"m": INFO})
    assert r.state.available
    # A success resets the back-off.
    fleet.record_attempt(r, True, 4.2)
    fleet.record_attempt(r, False, 5.0)
    fleet.record_attempt(r, False, 5.0)
    assert r.state.ejected_until_s == pytest.approx(6.0)


def test_drain_and_price_change_reach_the_router() -> None:
    fleet = two_backends()
    fleet.record_probe("a", 0.0, {"m": INFO})
    fleet.record_probe("b", 0.0, {"m": INFO})
    policy = Policy(latency_ms=10)
    assert choose(REQ, fleet.routes("m"), policy, 0.0).route.backend == "a"  # type: ignore[union-attr]
    fleet.set_price("a", 1.0)
    assert choose(REQ, fleet.routes("m"), policy, 0.0).route.backend == "b"  # type: ignore[union-attr]
    fleet.set_drained("b", True)
    assert choose(REQ, fleet.routes("m"), policy, 0.0).route.backend == "a"  # type: ignore[union-attr]
    assert fleet.backends["b"].status == "drained"


def test_traffic_share_follows_recent_attempts_not_the_whole_history() -> None:
    old, new = route("old", 0.04), route("new", 0.08)
    for t in range(1000):  # a long past on `old`
        old.count(t * 0.01)
    for t in range(100):  # then 60 s later, the last seconds on `new`
        new.count(70.0 + t * 0.01)
    now = 71.0
    recent_old, recent_new = old.recent_requests(now), new.recent_requests(now)
    assert old.requests == 1000 and new.requests == 100  # lifetime counts stay
    share_new = recent_new / (recent_old + recent_new)
    assert share_new > 0.9  # what SREs see: where traffic goes now
    assert old.recent_requests(now + 1e6) == pytest.approx(0.0)


def fleet_of(n: int, ejection: Ejection) -> FleetState:
    fleet = FleetState(
        [BackendState(f"b{i}", f"127.0.0.1:{i + 1}", "cpu", 0.1) for i in range(n)], ejection
    )
    for i in range(n):
        fleet.record_probe(f"b{i}", 0.0, {"m": INFO})
    return fleet


def one_route_each(fleet: FleetState) -> list[Route]:
    """A route of each backend, in the fleet's order."""
    return [next(r for r in fleet.routes("m") if r.backend == name) for name in fleet.backends]


def test_no_verdict_outcomes_neither_count_nor_reset() -> None:
    """A caller's expired deadline or cancellation, or load shed, is no verdict on the
    backend: it neither counts toward ejection nor clears the failures before it."""
    fleet = fleet_of(4, Ejection(after_failures=3))
    r = one_route_each(fleet)[0]
    fleet.record_attempt(r, False, 1.0)
    fleet.record_attempt(r, False, 1.0)
    for _ in range(50):
        assert not fleet.record_attempt(r, None, 1.0)
    assert r.state.attempt_failures == 2 and r.state.available
    assert fleet.record_attempt(r, False, 1.0)
    assert r.requests == 53  # every attempt counts in the traffic share


def test_ejection_stops_at_the_fleets_maximum_share() -> None:
    fleet = fleet_of(4, Ejection(after_failures=1, max_share=0.5))
    routes = one_route_each(fleet)
    assert fleet.record_attempt(routes[0], False, 1.0, "boom")
    assert fleet.record_attempt(routes[1], False, 1.0, "boom")
    # Half the fleet is out: the third failing backend stays in the routes.
    assert not fleet.record_attempt(routes[2], False, 1.0, "boom")
    assert routes[2].state.available
    assert "not ejected" in routes[2].state.last_error
    assert {r.backend for r in fleet.available_routes("m")} == {"b2", "b3"}
    # A fleet of one never ejects its backend.
    single = fleet_of(1, Ejection(after_failures=1))
    assert not single.record_attempt(single.routes("m")[0], False, 1.0)
    assert single.routes("m")[0].state.available


def test_success_rate_ejection_catches_a_backend_failing_now_and_then() -> None:
    ejection = Ejection(after_failures=3, success_rate_below=0.8, window_s=10.0, min_requests=20)
    fleet = fleet_of(4, ejection)
    flaky, fine = one_route_each(fleet)[:2]
    ejected = []
    for i in range(40):
        now = 1.0 + i * 0.1
        ejected.append(fleet.record_attempt(flaky, i % 3 != 0, now, "INTERNAL"))  # 1 in 3 fail
        assert not fleet.record_attempt(fine, i % 10 != 0, now)  # 1 in 10: kept
    # Never two failures in a row, yet ejected once 20 attempts showed the rate.
    assert ejected.index(True) == 21 and sum(ejected) == 1  # the first failure past 20
    assert "8 of 22 attempts failed" in flaky.state.last_error
    assert fine.state.available


def test_retry_tokens_fall_with_faults_and_come_back_with_successes() -> None:
    fleet = fleet_of(2, Ejection(after_failures=100, success_rate_below=0.0))
    state = fleet.backends["b0"]
    r = one_route_each(fleet)[0]
    assert fleet.may_retry_on(state)
    for _ in range(5):
        fleet.record_attempt(r, False, 1.0)
    assert state.retry_tokens == 5.0 and not fleet.may_retry_on(state)
    for _ in range(10):
        fleet.record_attempt(r, True, 1.0)
    assert fleet.may_retry_on(state)


def test_a_probe_timeout_takes_a_backend_out_only_when_it_happens_twice_in_a_row() -> None:
    fleet = fleet_of(2, Ejection())
    state = fleet.backends["b0"]
    fleet.record_failure("b0", 1.0, "DEADLINE_EXCEEDED: probe", confirm_after=2)
    assert state.healthy and state.available and state.consecutive_failures == 1
    fleet.record_probe("b0", 2.0, {"m": INFO})  # a good probe starts the count again
    fleet.record_failure("b0", 3.0, "DEADLINE_EXCEEDED: probe", confirm_after=2)
    assert state.available
    fleet.record_failure("b0", 4.0, "DEADLINE_EXCEEDED: probe", confirm_after=2)
    assert not state.healthy and not state.available
    # A refused connection takes it out at once.
    fleet.record_failure("b1", 5.0, "UNAVAILABLE: connection refused")
    assert not fleet.backends["b1"].available


def test_latest_due_is_when_the_last_waiting_request_is_due_else_now() -> None:
    state = BackendState("b", "127.0.0.1:1", "cpu", 1.0, slots=1)
    assert state.latest_due_s(5.0) == 5.0  # nothing waits
    state.admit(None, 1.0, 9.0, 5.0)  # takes the slot: it does not wait
    assert state.latest_due_s(5.0) == 5.0
    state.admit(None, 1.0, 7.0, 5.0)
    state.admit(None, 1.0, 8.0, 5.0)
    state.admit(None, 1.0, float("inf"), 5.0)  # no due time: not a time to go by
    assert state.latest_due_s(5.0) == 8.0
    probe = state.admit(None, 1.0, state.latest_due_s(5.0), 5.0)
    assert state.due_before(8.0)[0] == 3 and probe.started_s is None  # after the two due
