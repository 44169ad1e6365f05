"""The router (gateway/routing/router.py): which route it chooses and why, its
predicted latency and cost, `explain`, and the baselines; pure logic, driven with
tables and properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.routing.estimates import LatencyEstimate
from gateway.routing.fleet import BackendState, Route
from gateway.routing.router import (
    RoundRobin,
    RouteRequest,
    cheapest_only,
    choose,
    cost_usd,
    explain,
    fastest_only,
    least_loaded,
    predict_ms,
    retry_hint_ms,
)
from gateway.routing.sla import Policy
from tests.unit.routing.builders import REQ, busy, names, route

# What the estimates read for a seeded route, worked out by hand (not by the code under
# test): the sketch's buckets are 1.08 wide from 0.01 ms and a bucket reads as its
# upper edge, so 2 ms reads as 0.01 x 1.08^69, 2.2 ms as 0.01 x 1.08^71, 3 ms as
# 0.01 x 1.08^75, 4 ms as 0.01 x 1.08^78 and 8 ms as 0.01 x 1.08^87. A seed puts 90% of
# its weight at the p50, 8.5% halfway to the p99 and 1.5% at the p99, so its p99 reads
# the p99's bucket, a level at or under 90 the p50's, and its mean is
# 0.9 p50 + 0.085 (p50 + p99) / 2 + 0.015 p99.
READ_2MS = 2.024133  # 0.01 x 1.08^69
READ_2_2MS = 2.360949  # 0.01 x 1.08^71
READ_3MS = 3.212045  # 0.01 x 1.08^75
READ_4MS = 4.046252  # 0.01 x 1.08^78
READ_8MS = 8.088476  # 0.01 x 1.08^87


def exactly(value: float) -> object:
    """A hand-computed figure, to the precision the constants above carry."""
    return pytest.approx(value, rel=1e-6)


def test_cheapest_feasible_route_is_chosen() -> None:
    cheap, dear = route("cheap", 0.1), route("dear", 0.4)
    decision = choose(REQ, [dear, cheap], Policy(latency_ms=10), 0.0)
    assert decision.route is cheap and decision.reason == "cheapest-feasible"
    # 0.1 USD/h over 3.6e6 ms/h, for the mean of a (1 ms, 2 ms) seed:
    # 0.9 x 1 + 0.085 x 1.5 + 0.015 x 2 = 1.0575 ms.
    assert decision.cost_usd == pytest.approx(0.1 / 3.6e6 * 1.0575)
    assert names(decision.alternatives(0.0)) == ["dear"]


def test_a_route_too_slow_for_the_sla_is_skipped_even_when_cheap() -> None:
    slow = route("slow", 0.01, p50=15, p99=20)
    fast = route("fast", 0.5)
    assert choose(REQ, [slow, fast], Policy(latency_ms=10), 0.0).route is fast
    # A looser SLA lets the cheap route take it.
    assert choose(REQ, [slow, fast], Policy(latency_ms=50), 0.0).route is slow


def test_load_spills_to_the_next_route_and_comes_back_when_it_drains() -> None:
    cheap = route("cheap", 0.1, p50=2, p99=3)
    dear = route("dear", 0.3, p50=2, p99=3)
    policy = Policy(latency_ms=10)
    chosen = []
    for in_flight in (0, 1, 2, 6, 1, 0):
        busy(cheap, in_flight)
        chosen.append(choose(REQ, [cheap, dear], policy, 0.0).route)
    # p99 3.2 ms, behind the one in service (3.2 ms at p99, just started) 7.6 ms, and
    # 2 ms more for each waiting: feasible while none waits (in flight 1).
    assert names(chosen) == ["cheap", "cheap", "dear", "dear", "cheap", "cheap"]  # type: ignore[arg-type]


def test_parallel_slots_shorten_the_predicted_wait() -> None:
    one = route("one", 0.1, p50=2, p99=2, in_flight=5, slots=1)
    four = route("four", 0.1, p50=2, p99=2, in_flight=8, slots=4)
    # Every read of this route is the 2 ms bucket, its mean 2 ms, so one wait's spread
    # above its mean is READ_2MS - 2. One slot: the one in service (READ_2MS from its
    # start, now), then four waiting (2 ms each, one after another), the spread of five
    # waits (sqrt 5 of one), and its own service.
    spread = READ_2MS - 2
    assert predict_ms(one, 99.0, 0.0) == exactly(READ_2MS + 4 * 2 + spread * 5**0.5 + READ_2MS)
    # Four slots: the first of the four in service to end (each read at p68, still the
    # 2 ms bucket), then the four waiting shared by four slots, and the spread of five
    # waits over four slots.
    assert predict_ms(four, 99.0, 0.0) == exactly(
        READ_2MS + 4 * 2 / 4 + spread * (5 / 4) ** 0.5 + READ_2MS
    )


def test_only_the_work_due_first_is_ahead_of_a_request() -> None:
    """A gold request (10 ms) is not kept waiting by bronze requests (250 ms) queued
    before it: they are due later, so they wait behind it."""
    cpu = route("cpu", 0.1, p50=2, p99=3)
    gpu = route("gpu", 1.0, p50=0.5, p99=1)
    cpu.state.admit(cpu, 2.0, 0.250, 0.0)  # in service, just started
    for _ in range(10):
        cpu.state.admit(cpu, 2.0, 0.250, 0.0)
    gold = Policy(latency_ms=10, name="gold")
    bronze = Policy(latency_ms=250, name="bronze")
    assert choose(REQ, [cpu, gpu], gold, 0.0).route is cpu
    # The cpu route reads READ_3MS at p99 and has a mean of 0.9 x 2 + 0.085 x 2.5 +
    # 0.015 x 3 = 2.0575 ms. Gold waits only for the one in service (READ_3MS from now),
    # plus one wait's spread, then its own service.
    spread = READ_3MS - 2.0575
    assert predict_ms(cpu, 99.0, 0.0, 1, 10) == exactly(READ_3MS + spread + READ_3MS)
    # A bronze request waits behind all ten too: 20 ms more, and the spread of eleven waits.
    assert predict_ms(cpu, 99.0, 0.0, 1, 250) == exactly(
        READ_3MS + 10 * 2.0 + spread * 11**0.5 + READ_3MS
    )
    assert choose(REQ, [cpu, gpu], bronze, 0.0).route is cpu
    # Ten gold requests due before it fill the 10 ms: the next gold goes to the GPU.
    for _ in range(10):
        cpu.state.admit(cpu, 2.0, 0.005, 0.0)
    assert choose(REQ, [cpu, gpu], gold, 0.0).route is gpu


def test_a_request_in_service_frees_its_slot_sooner_the_longer_it_has_run() -> None:
    # Every read of these routes is the 4 ms bucket, their mean 4 ms: a request waits
    # until the one in service ends (READ_4MS from its start), plus one wait's spread
    # (READ_4MS - 4), then its own service.
    spread = READ_4MS - 4
    fresh = route("fresh", 0.1, p50=4, p99=4)
    busy(fresh, 1, started_s=0.0)
    assert predict_ms(fresh, 99.0, 0.0) == exactly(READ_4MS + spread + READ_4MS)
    old = route("old", 0.1, p50=4, p99=4)
    busy(old, 1, started_s=-0.003)  # three of its four milliseconds done
    assert predict_ms(old, 99.0, 0.0) == exactly(READ_4MS - 3 + spread + READ_4MS)
    # Running past its own p99 it is expected to end now, not in the past.
    late = route("late", 0.1, p50=4, p99=4)
    busy(late, 1, started_s=-1.0)
    assert predict_ms(late, 99.0, 0.0) == exactly(spread + READ_4MS)
    # Of several in service, the first to end frees a slot: each is read at the level
    # that puts the first of them at the policy's percentile. Of three at p99, each is
    # read at 1 - 0.01^(1/3) = p78.5: the p50's bucket (READ_4MS), where p99 would read
    # the p99's (READ_8MS). The new request's own service reads READ_8MS; the route's
    # mean is 0.9 x 4 + 0.085 x 6 + 0.015 x 8 = 4.23 ms; three slots share the spread.
    three = route("three", 0.1, p50=4, p99=8, slots=3)
    busy(three, 3, started_s=-0.001)
    assert predict_ms(three, 99.0, 0.0) == exactly(
        READ_4MS - 1 + (READ_8MS - 4.23) * math.sqrt(1 / 3) + READ_8MS
    )


def test_tighter_classes_arriving_lengthen_a_looser_wait() -> None:
    """A bronze request waits for what is due before it now and for the gold requests
    that arrive while it waits (they go ahead): its wait grows by 1 / (1 - rho)^2 with
    rho the share of the slots gold's work takes."""
    cpu = route("cpu", 0.1, p50=2, p99=2)
    cpu.state.admit(cpu, 2.0, 0.250, 0.0)
    cpu.state.admit(cpu, 2.0, 0.250, 0.0)
    # The one in service (READ_2MS), the one waiting (2 ms), the spread of two waits,
    # then its own service.
    wait_quiet = READ_2MS + 2.0 + (READ_2MS - 2) * math.sqrt(2)
    assert predict_ms(cpu, 99.0, 0.0, 1, 250) == exactly(wait_quiet + READ_2MS)
    # Gold at 250 requests/s of 2 ms each: half the slot (decayed over about a second).
    for _ in range(250):  # sent and answered at once: only their rate remains
        cpu.state.finish(cpu.state.admit(cpu, 2.0, 0.01, 0.0, budget_ms=10.0), 0.0)
    assert cpu.state.tighter_load(250, 0.0) == pytest.approx(0.5)
    assert cpu.state.tighter_load(10, 0.0) == 0.0  # gold itself is not slowed by gold
    # rho 0.5: the wait grows by 1 / (1 - 0.5)^2 = 4, the service does not.
    assert predict_ms(cpu, 99.0, 0.0, 1, 250) == exactly(4 * wait_quiet + READ_2MS)
    # The rate decays: a second later it counts for 1/e of it.
    assert cpu.state.tighter_load(250, 1.0) == pytest.approx(0.5 / math.e)
    # Admitted requests count in their class's rate.
    state = BackendState("b", "127.0.0.1:1", "cpu", 1.0, slots=2)
    for _ in range(100):
        state.admit(None, 4.0, 0.01, 0.0, budget_ms=10.0)
    state.admit(None, 4.0, 0.25, 0.0, budget_ms=250.0)
    assert state.tighter_load(250, 0.0) == pytest.approx(400.0 / 2000.0)


def test_infeasible_falls_back_to_the_fastest_or_rejects_with_the_reason() -> None:
    a = route("a", 0.1, p50=30, p99=40)
    b = route("b", 0.2, p50=20, p99=25)
    fallback = choose(REQ, [a, b], Policy(latency_ms=10), 0.0)
    assert fallback.route is b and fallback.reason == "infeasible-fallback"
    reject = choose(REQ, [a, b], Policy(latency_ms=10, on_infeasible="reject"), 0.0)
    assert reject.route is None and reject.reason == "infeasible-reject"
    assert "model 'm'" in reject.message and "p99 <= 10 ms" in reject.message
    assert "fastest is b/v" in reject.message


def test_cost_cap_makes_a_route_infeasible() -> None:
    dear = route("dear", 36.0, p50=1, p99=1)  # 36 USD/h = 10 USD per 1M ms: 10/1M
    cheap_slow = route("cheap", 0.036, p50=30, p99=30)
    capped = Policy(latency_ms=10, max_cost_usd_per_1m=5.0, on_infeasible="reject")
    decision = choose(REQ, [dear, cheap_slow], capped, 0.0)
    assert decision.route is None and "within $5/1M" in decision.message
    assert choose(REQ, [dear], Policy(latency_ms=10, max_cost_usd_per_1m=20.0), 0.0).route is dear


def test_objectives_latency_and_carbon() -> None:
    fast_dear = route("fast", 1.0, p50=1, p99=1, carbon=(500, 100))
    slow_green = route("green", 0.5, p50=3, p99=4, carbon=(20, 100))
    cheap_dirty = route("dirty", 0.1, p50=3, p99=4, carbon=(900, 100))
    routes = [fast_dear, slow_green, cheap_dirty]
    assert choose(REQ, routes, Policy(latency_ms=10), 0.0).route is cheap_dirty
    latency = choose(REQ, routes, Policy(latency_ms=10, objective="latency"), 0.0)
    assert latency.route is fast_dear and latency.reason == "fastest-feasible"
    carbon = choose(REQ, routes, Policy(latency_ms=10, objective="carbon"), 0.0)
    assert carbon.route is slow_green and carbon.reason == "lowest-carbon-feasible"


def test_unavailable_routes_are_never_chosen() -> None:
    down = route("down", 0.01, available=False)
    drained = route("drained", 0.02)
    drained.state.drained = True
    drained.state.refresh()
    up = route("up", 0.5)
    decision = choose(REQ, [down, drained, up], Policy(latency_ms=10), 0.0)
    assert decision.route is up and decision.alternatives(0.0) == []
    assert choose(REQ, [down], Policy(), 0.0).reason == "no-healthy-route"


def test_alternatives_are_feasible_by_cost_then_the_rest_fastest_first() -> None:
    routes = [
        route("slow-cheap", 0.01, p50=50, p99=60),
        route("ok-dear", 0.9),
        route("ok-mid", 0.5),
        route("slower-cheap", 0.02, p50=70, p99=80),
        route("ok-cheap", 0.1),
    ]
    decision = choose(REQ, routes, Policy(latency_ms=10), 0.0)
    assert decision.route is not None and decision.route.backend == "ok-cheap"
    assert names(decision.alternatives(0.0)) == ["ok-mid", "ok-dear", "slow-cheap", "slower-cheap"]


def test_explain_agrees_with_choose_and_says_why() -> None:
    down = route("down", 0.01, available=False)
    down.state.last_error = "connection refused"
    routes = [route("slow", 0.02, p50=30, p99=40), down, route("dear", 0.9), route("ok", 0.1)]
    decision, verdicts = explain(REQ, routes, Policy(latency_ms=10), 0.0)
    assert decision.route is not None and decision.route.backend == "ok"
    why = {v.route.backend: v.why for v in verdicts}
    assert why["ok"] == "chosen: cheapest-feasible"
    assert why["down"] == "unhealthy: connection refused"
    assert why["slow"].startswith("predicted p99 40.") and why["slow"].endswith("> SLA 10 ms")
    assert why["dear"].startswith("feasible, $") and "dearer than the chosen" in why["dear"]
    assert [v.feasible for v in verdicts] == [False, False, True, True]
    chosen = next(v for v in verdicts if v.chosen)
    assert chosen.predicted_ms == pytest.approx(decision.predicted_ms)


ROUTE_SPECS = st.lists(
    st.tuples(
        st.floats(0.0, 5.0),  # price
        st.floats(0.1, 30.0),  # p50
        st.floats(0.0, 30.0),  # p99 - p50
        st.integers(0, 20),  # in flight
        st.integers(1, 4),  # slots
        st.booleans(),  # available
    ),
    min_size=1,
    max_size=12,
)


@given(ROUTE_SPECS, st.floats(1.0, 60.0))
def test_choice_is_feasible_and_cheapest_among_feasible(
    specs: list[tuple[float, float, float, int, int, bool]], sla: float
) -> None:
    routes = [
        route(f"b{i}", price, p50, p50 + extra, in_flight, slots, up)
        for i, (price, p50, extra, in_flight, slots, up) in enumerate(specs)
    ]
    policy = Policy(latency_ms=sla)
    decision = choose(REQ, routes, policy, 0.0)
    live = [r for r in routes if r.state.available]
    feasible = [r for r in live if predict_ms(r, 99.0, 0.0, 1, sla) <= sla]
    if not live:
        assert decision.route is None
    elif feasible:
        assert decision.route in feasible and decision.reason == "cheapest-feasible"
        assert cost_usd(decision.route) <= min(cost_usd(r) for r in feasible) + 1e-18
    else:
        assert decision.reason == "infeasible-fallback" and decision.route is not None
        fastest = min(predict_ms(r, 99.0, 0.0, 1, sla) for r in live)
        assert predict_ms(decision.route, 99.0, 0.0, 1, sla) == fastest
    # Every other available route is offered once for retries.
    if decision.route is not None:
        assert sorted(names(decision.alternatives(0.0))) == sorted(
            r.backend for r in live if r is not decision.route
        )


def test_baselines() -> None:
    fast = route("fast", 1.0, p50=0.5, p99=1)
    cheap = route("cheap", 0.1, p50=2, p99=3, in_flight=3)
    mid = route("mid", 0.5, p50=1, p99=2, in_flight=1, slots=2)
    routes = [fast, cheap, mid]
    assert fastest_only(REQ, routes, Policy(), 0.0).route is fast
    assert cheapest_only(REQ, routes, Policy(), 0.0).route is cheap
    assert least_loaded(REQ, routes, Policy(), 0.0).route is fast
    rr = RoundRobin()
    assert names([rr(REQ, routes, Policy(), 0.0).route for _ in range(4)]) == [  # type: ignore[misc]
        "fast",
        "cheap",
        "mid",
        "fast",
    ]


def test_a_batch_is_predicted_and_priced_with_the_route_s_own_row_fraction() -> None:
    """Two routes equally fast for one row: one where a batch costs little more than a
    row (row fraction 0.05, a GPU), one where each row costs a full row's time (1.0).
    One row: the cheaper per hour wins. Sixteen rows: the batching route is both
    faster and cheaper, and the other is predicted at 16 rows' time."""
    cpu = BackendState("cpu", "127.0.0.1:1", "cpu", 1.0)
    gpu = BackendState("gpu", "127.0.0.1:2", "gpu", 2.0)
    for state in (cpu, gpu):
        state.healthy = True
        state.refresh()
    routes = [Route(cpu, "m", "v", True), Route(gpu, "m", "v", True)]
    for r, rows in zip(routes, (1.0, 0.05), strict=True):
        r.estimate.seed(2.0, 2.2)
        r.row_fraction = rows
    policy = Policy(latency_ms=100)
    one = choose(RouteRequest("m", 1), routes, policy, 0.0)
    assert one.route is routes[0]
    many = choose(RouteRequest("m", 16), routes, policy, 0.0)
    assert many.route is routes[1]
    # Idle routes: the round trip (0.2 ms until a probe measures it) and the p99 (the
    # 2.2 ms bucket) times the batch's factor, 1 + row fraction x 15 extra rows.
    assert cpu.network.rtt_ms == 0.2
    assert predict_ms(routes[0], 99.0, 0.0, 1) == exactly(0.2 + READ_2_2MS)
    assert predict_ms(routes[0], 99.0, 0.0, 16) == exactly(0.2 + READ_2_2MS * 16)
    assert predict_ms(routes[1], 99.0, 0.0, 16) == exactly(0.2 + READ_2_2MS * 1.75)
    # The busy time priced: the mean, 0.9 x 2 + 0.085 x 2.1 + 0.015 x 2.2 = 2.0115 ms,
    # times the factor, at the price per ms (USD/h over 3.6e6).
    assert cost_usd(routes[0], 1) == pytest.approx(1.0 / 3.6e6 * 2.0115)
    assert cost_usd(routes[0], 16) == pytest.approx(1.0 / 3.6e6 * 2.0115 * 16)
    assert cost_usd(routes[1], 16) == pytest.approx(2.0 / 3.6e6 * 2.0115 * 1.75)


def test_a_backend_at_its_queue_limit_gets_no_more_work_and_all_full_is_queue_full() -> None:
    cheap, dear = route("cheap", 0.1), route("dear", 0.5)
    for r in (cheap, dear):
        r.state.queue_limit = 2
    policy = Policy(latency_ms=1000)
    for _ in range(3):  # one running, two waiting: at the limit
        cheap.state.admit(cheap, 1.0, 1.0, 0.0)
    decision = choose(REQ, [cheap, dear], policy, 0.0)
    assert decision.route is dear
    for _ in range(3):
        dear.state.admit(dear, 1.0, 1.0, 0.0)
    decision = choose(REQ, [cheap, dear], policy, 0.0)
    assert decision.route is None and decision.reason == "queue-full"
    assert "is at its queue limit" in decision.message and "limit 2" in decision.message
    # The retry hint: about when the queue has room again (one waiting request's work).
    assert decision.predicted_ms == pytest.approx(dear.estimate.mean_ms)
    assert retry_hint_ms(decision, policy) == math.ceil(dear.estimate.mean_ms)
    # One answer frees a place: work goes there again.
    cheap.state.finish(cheap.state.serving[0], 0.1)
    assert choose(REQ, [cheap, dear], policy, 0.1).route is cheap


def _outlier_route(samples: int, slow_ms: float = 40.0) -> Route:
    """A route measured `samples` times at 1 ms (no profile), then once at `slow_ms`."""
    r = route("r", 0.1)
    r.estimate = LatencyEstimate()
    for _ in range(samples):
        r.estimate.observe(1.0, 0.0)
    r.estimate.observe(slow_ms, 1.0)  # a second on: the quantiles take it at once
    return r


def test_a_route_one_outlier_rules_out_under_reject_is_explored_until_it_is_measured() -> None:
    reject = Policy(latency_ms=10, on_infeasible="reject")
    r = _outlier_route(5)
    assert r.estimate.p99_ms > 10 and r.estimate.p50_ms < 10
    now = 1.0
    explored = 0
    decision = choose(REQ, [r], reject, now)
    while decision.reason == "infeasible-explore":
        assert decision.route is r
        explored += 1
        now += 0.01
        r.estimate.observe(1.0, now)  # its answer, as the dispatcher measures it
        decision = choose(REQ, [r], reject, now)
    # About 100 samples (1 / (1 - 0.99)) outweigh the outlier: the route is feasible again.
    assert 80 <= explored <= 100, explored
    assert decision.reason == "cheapest-feasible" and decision.route is r


def test_reject_explores_no_route_its_queue_its_median_or_many_samples_rule_out() -> None:
    reject = Policy(latency_ms=10, on_infeasible="reject")
    assert choose(REQ, [_outlier_route(5)], reject, 1.0).reason == "infeasible-explore"
    busy_route = _outlier_route(5)
    busy(busy_route, 1)  # its one slot is taken: the queue, not the estimate, decides
    assert choose(REQ, [busy_route], reject, 1.0).reason == "infeasible-reject"
    slow = route("slow", 0.1)
    slow.estimate = LatencyEstimate()
    for _ in range(5):
        slow.estimate.observe(30.0, 0.0)  # its median misses too: not an outlier
    assert choose(REQ, [slow], reject, 0.0).reason == "infeasible-reject"
    many = _outlier_route(5)
    for _ in range(150):  # many slow answers: the percentile is measured, and misses
        many.estimate.observe(40.0, 2.0)
        many.estimate.observe(1.0, 2.0)
    assert choose(REQ, [many], reject, 2.0).reason == "infeasible-reject"
    profiled = route("profiled", 0.1, p50=1.0, p99=40.0)  # only its profile: trusted
    assert choose(REQ, [profiled], reject, 0.0).reason == "infeasible-reject"
    fallback = Policy(latency_ms=10)
    assert choose(REQ, [_outlier_route(5)], fallback, 1.0).reason == "infeasible-fallback"
