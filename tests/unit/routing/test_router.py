"""The router, the policy book, the fleet state and the latency estimates: pure
logic, no I/O, driven with tables and properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.profiles import Profile, ProfileEntry, profile_row_fraction
from backends.protocol.errors import InvalidInput
from backends.protocol.tensors import TensorSpec
from gateway.config import PoliciesSettings, PolicySettings
from gateway.routing.estimates import RTT_WINDOW, LatencyEstimate, NetworkEstimate
from gateway.routing.fleet import BackendState, Ejection, FleetState, ModelInfo, Route
from gateway.routing.policy import PolicyBook
from gateway.routing.router import (
    ROW_FRACTION,
    Policy,
    RoundRobin,
    RouteRequest,
    cheapest_only,
    choose,
    cost_usd,
    explain,
    fastest_only,
    least_loaded,
    predict_ms,
)
from gateway.serving.converters import parse_profile

REQ = RouteRequest("m")


def route(
    name: str,
    price: float,
    p50: float = 1.0,
    p99: float = 2.0,
    in_flight: int = 0,
    slots: int = 1,
    available: bool = True,
    carbon: tuple[float, float] | None = None,
) -> Route:
    state = BackendState(name, "127.0.0.1:1", "cpu", price, slots=slots)
    state.network.rtt_ms = 0.0
    state.healthy = available
    if carbon is not None:
        state.set_carbon(*carbon)
    state.refresh()
    r = Route(state, "m", "v", True)
    r.estimate.seed(p50, p99)
    busy(r, in_flight)
    return r


def busy(r: Route, in_flight: int, started_s: float = 0.0) -> None:
    """`in_flight` requests on `r`'s backend, sent at `started_s` and already due
    (ahead of any request routed after), in place of what it had."""
    r.state.clear()
    for _ in range(in_flight):
        r.state.admit(r, r.estimate.mean_ms, started_s, started_s)


def names(routes: list[Route]) -> list[str]:
    return [r.backend for r in routes]


def test_cheapest_feasible_route_is_chosen() -> None:
    cheap, dear = route("cheap", 0.1), route("dear", 0.4)
    decision = choose(REQ, [dear, cheap], Policy(latency_ms=10), 0.0)
    assert decision.route is cheap and decision.reason == "cheapest-feasible"
    assert decision.cost_usd == pytest.approx(cost_usd(cheap))
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
    # One slot: the one in service, then four waiting, one after another.
    assert predict_ms(one, 99.0, 0.0) == pytest.approx(2 + 2 + 4 * 2.0, rel=0.02)
    # Four slots: the first of four in service to end, then four waiting shared by four.
    assert predict_ms(four, 99.0, 0.0) == pytest.approx(2 + 2 + 4 * 2.0 / 4, rel=0.05)


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
    assert predict_ms(cpu, 99.0, 0.0, 1, 10) < 8.0
    # A bronze request waits behind all ten: about 20 ms more.
    assert predict_ms(cpu, 99.0, 0.0, 1, 250) > predict_ms(cpu, 99.0, 0.0, 1, 10) + 19.0
    assert choose(REQ, [cpu, gpu], bronze, 0.0).route is cpu
    # Ten gold requests due before it fill the 10 ms: the next gold goes to the GPU.
    for _ in range(10):
        cpu.state.admit(cpu, 2.0, 0.005, 0.0)
    assert choose(REQ, [cpu, gpu], gold, 0.0).route is gpu


def test_a_request_in_service_frees_its_slot_sooner_the_longer_it_has_run() -> None:
    fresh = route("fresh", 0.1, p50=4, p99=4)
    busy(fresh, 1, started_s=0.0)
    old = route("old", 0.1, p50=4, p99=4)
    busy(old, 1, started_s=-0.003)  # three of its four milliseconds done
    assert predict_ms(fresh, 99.0, 0.0) - predict_ms(old, 99.0, 0.0) == pytest.approx(3.0)
    # Running past its own p99 it is expected to end now, not in the past.
    late = route("late", 0.1, p50=4, p99=4)
    busy(late, 1, started_s=-1.0)
    est = late.estimate
    spread = est.p99_ms - est.mean_ms  # the spread of the one wait (0.05 ms)
    assert predict_ms(late, 99.0, 0.0) == pytest.approx(est.p99_ms + spread)
    # Of several in service, the first to end frees a slot: each is read at the
    # percentile that puts the first of them at the policy's (here of two: p99.5).
    two = route("two", 0.1, p50=4, p99=4, slots=2)
    busy(two, 2, started_s=-0.001)
    assert predict_ms(two, 99.0, 0.0) == pytest.approx(
        est.p99_ms + est.quantile_ms(99.5) - 1.0 + spread * math.sqrt(1 / 2)
    )


def test_tighter_classes_arriving_lengthen_a_looser_wait() -> None:
    """A bronze request waits for what is due before it now and for the gold requests
    that arrive while it waits (they go ahead): its wait grows by 1 / (1 - rho)^2 with
    rho the share of the slots gold's work takes."""
    cpu = route("cpu", 0.1, p50=2, p99=2)
    cpu.state.admit(cpu, 2.0, 0.250, 0.0)
    cpu.state.admit(cpu, 2.0, 0.250, 0.0)
    quiet = predict_ms(cpu, 99.0, 0.0, 1, 250)
    # Gold at 250 requests/s of 2 ms each: half the slot (decayed over about a second).
    for _ in range(250):  # sent and answered at once: only their rate remains
        cpu.state.finish(cpu.state.admit(cpu, 2.0, 0.01, 0.0, budget_ms=10.0), 0.0)
    assert cpu.state.tighter_load(250, 0.0) == pytest.approx(0.5)
    assert cpu.state.tighter_load(10, 0.0) == 0.0  # gold itself is not slowed by gold
    loud = predict_ms(cpu, 99.0, 0.0, 1, 250)
    wait_quiet = quiet - cpu.estimate.p99_ms
    assert loud - cpu.estimate.p99_ms == pytest.approx(wait_quiet * 4.0)
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


# ---- policies ---------------------------------------------------------------------


def test_policy_resolution_order() -> None:
    book = PolicyBook(
        PoliciesSettings(
            default=PolicySettings(
                latency_ms=100, percentile=99, objective="cost", on_infeasible="fastest"
            ),
            classes={"gold": PolicySettings(latency_ms=10, on_infeasible="reject", hedge=True)},
            models={"digits": PolicySettings(latency_ms=20, retries=1)},
        )
    )
    assert book.resolve(RouteRequest("cnn")).latency_ms == 100
    assert book.resolve(RouteRequest("cnn")).name == "default"
    digits = book.resolve(RouteRequest("digits"))
    assert (digits.latency_ms, digits.retries, digits.hedge) == (20, 1, False)
    gold = book.resolve(RouteRequest("digits", sla_class="gold"))
    assert (gold.latency_ms, gold.on_infeasible, gold.objective, gold.name) == (
        10,
        "reject",
        "cost",
        "gold",
    )
    assert gold.hedge and gold.retries == 1
    custom = book.resolve(RouteRequest("digits", sla_class="gold", sla_ms=3))
    assert (custom.latency_ms, custom.name) == (3, "custom")
    with pytest.raises(InvalidInput, match="unknown sla_class 'tin' \\(classes: gold\\)"):
        book.resolve(RouteRequest("digits", sla_class="tin"))


def test_the_request_overhead_comes_off_every_sla() -> None:
    """`request_overhead_ms`: what clients see beyond the gateway's calls to backends.
    A route predicted at 9.4 ms meets a 10 ms SLA as the gateway sees it, not once 1 ms
    of the client's own hop counts too; every class and a request's own `sla_ms` carry
    it, and a rejection and `explain` say so."""
    settings = PoliciesSettings(
        default=PolicySettings(latency_ms=100, on_infeasible="reject"),
        classes={"gold": PolicySettings(latency_ms=10)},
    )
    cpu = route("cpu", 0.1, p50=8.5, p99=9.0)
    cpu.state.network.rtt_ms = 0.2
    gold = RouteRequest("m", sla_class="gold")
    bare = PolicyBook(settings).resolve(gold)
    assert choose(gold, [cpu], bare, 0.0).route is cpu
    book = PolicyBook(settings, overhead_ms=1.0)
    policy = book.resolve(gold)
    assert (policy.latency_ms, policy.overhead_ms, policy.budget_ms) == (10, 1.0, 9.0)
    decision = choose(gold, [cpu], policy, 0.0)
    assert decision.route is None and decision.reason == "infeasible-reject"
    assert "p99 <= 10 ms (less 1 ms overhead)" in decision.message
    _, (verdict,) = explain(gold, [cpu], policy, 0.0)
    assert "> SLA 10 ms less 1 ms overhead" in verdict.why
    assert book.resolve(RouteRequest("m")).overhead_ms == 1.0
    assert book.resolve(RouteRequest("m", sla_ms=12)).budget_ms == 11.0
    assert (
        choose(
            RouteRequest("m", sla_ms=12), [cpu], book.resolve(RouteRequest("m", sla_ms=12)), 0.0
        ).route
        is cpu
    )


# ---- fleet state --------------------------------------------------------------------

INFO = ModelInfo(
    "m",
    ("1",),
    "onnxruntime_onnx",
    (TensorSpec("x", "FP32", (-1, 2)),),
    (),
    8,
    "ort-cpu-fp32",
    ("ort-cpu-fp32", "ort-cpu-int8-qdq"),
    (("ort-cpu-fp32", 2.0, 3.0, None), ("ort-cpu-int8-qdq", 1.0, 1.5, 0.1)),
)


def two_backends() -> FleetState:
    return FleetState(
        [
            BackendState("a", "127.0.0.1:1", "cpu", 0.1),
            BackendState("b", "127.0.0.1:2", "cpu", 0.2),
        ],
        Ejection(after_failures=2, base_s=1.0, max_s=4.0),
    )


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


# ---- estimates ------------------------------------------------------------------------


def test_estimate_follows_samples_and_forgets_old_ones() -> None:
    est = LatencyEstimate()
    est.seed(2.0, 4.0)
    assert est.p50_ms == pytest.approx(2.0, rel=0.08) and est.p99_ms == pytest.approx(4.0, rel=0.08)
    for i in range(200):
        est.observe(10.0, 1.0 + i * 0.01)
    assert est.p50_ms == pytest.approx(10.0, rel=0.08)
    assert est.mean_ms == pytest.approx(10.0, rel=0.01)
    # Much later, a few fast samples dominate the decayed history.
    for i in range(40):
        est.observe(1.0, 200.0 + i * 0.01)
    assert est.p50_ms == pytest.approx(1.0, rel=0.08)
    assert est.quantile_ms(90.0) <= est.p99_ms


@given(st.lists(st.floats(0.01, 1000.0), min_size=1, max_size=300))
def test_estimate_quantiles_are_ordered_and_within_the_samples(samples: list[float]) -> None:
    est = LatencyEstimate()
    for s in samples:
        est.observe(s, 0.0)
    est.observe(samples[-1], 0.0)
    assert est.p50_ms <= est.p95_ms <= est.p99_ms
    assert min(samples) * 0.99 <= est.p50_ms <= max(samples) * 1.09


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


def test_a_sparse_routes_quantiles_follow_each_sample_after_a_second() -> None:
    # A route that only gets a probe every few seconds must not wait for 8 samples
    # (16 s of probes) before its quantiles move.
    est = LatencyEstimate()
    est.observe(1.0, 0.0)
    assert est.p99_ms == pytest.approx(1.0, rel=0.1)
    est.observe(50.0, 2.0)  # one sample, two seconds later
    assert est.p99_ms == pytest.approx(50.0, rel=0.1)
    for i in range(3):  # within the same second: refreshed by count only
        est.observe(50.0, 2.1 + i * 0.1)
    before = est.p50_ms
    est.observe(1.0, 2.5)
    assert est.p50_ms == before


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
    for route, rows in zip(routes, (1.0, 0.05), strict=True):
        route.estimate.seed(2.0, 2.2)
        route.row_fraction = rows
    policy = Policy(latency_ms=100)
    one = choose(RouteRequest("m", 1), routes, policy, 0.0)
    assert one.route is routes[0]
    many = choose(RouteRequest("m", 16), routes, policy, 0.0)
    assert many.route is routes[1]
    rtt = cpu.network.rtt_ms
    assert predict_ms(routes[0], 99.0, 0.0, 16) - rtt == pytest.approx(
        16 * (predict_ms(routes[0], 99.0, 0.0, 1) - rtt)
    )
    assert cost_usd(routes[1], 16) == pytest.approx(cost_usd(routes[1], 1) * 1.75)


def test_profile_parameter_parses_row_fractions_and_skips_bad_entries() -> None:
    text = "a:1:2;b:1.5:3:0.25;c:1:2:x;d:1:2:5;e:nope:2;f:1"
    assert parse_profile(text) == (
        ("a", 1.0, 2.0, None),
        ("b", 1.5, 3.0, 0.25),
        ("c", 1.0, 2.0, None),
        ("d", 1.0, 2.0, None),
    )


def test_row_fraction_comes_from_the_profile_at_batch_1_and_the_largest_batch() -> None:
    def entry(batch: int, per_call_ms: float, hardware: str = "cpu-1c") -> ProfileEntry:
        return ProfileEntry(
            hardware_class=hardware,
            threads=1,
            batch_size=batch,
            p50_ms=per_call_ms,
            p99_ms=per_call_ms,
            throughput_per_s=1000.0 * batch / per_call_ms,
            runs=10,
        )

    # One row 2 ms, 16 rows 8 ms: each extra row adds 6/15 ms = 0.2 of a row.
    profile = Profile(
        model="m", variant="v", entries=[entry(1, 2.0), entry(4, 4.0), entry(16, 8.0)]
    )
    assert profile_row_fraction(profile, "cpu-1c", 1) == pytest.approx(0.2)
    # A worker emulating 8 ms more per row: batching saves almost nothing.
    assert profile_row_fraction(profile, "cpu-1c", 1, shift_ms=8.0) == pytest.approx(
        (8.0 + 16 * 8.0) / (2.0 + 8.0) / 15 - 1 / 15
    )
    assert profile_row_fraction(profile, "gpu", 1) is None  # not profiled there
    assert (
        profile_row_fraction(Profile(model="m", variant="v", entries=[entry(1, 2.0)]), "cpu-1c", 1)
        is None
    )


def test_network_estimate_ignores_a_stalled_probe_and_follows_a_lasting_rise() -> None:
    net = NetworkEstimate()
    for rtt in (1.0, 1.2, 0.9, 1.1):
        net.observe(rtt)
    assert net.rtt_ms == 0.9
    net.observe(150.0)  # one probe that waited on a paused process
    assert net.rtt_ms == 0.9
    for _ in range(RTT_WINDOW):
        net.observe(5.0)  # the network really got slower
    assert net.rtt_ms == 5.0
