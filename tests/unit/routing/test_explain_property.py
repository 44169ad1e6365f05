"""`explain` tells the truth about `choose`: on random snapshots of routes (prices,
estimates, slots, queues of three classes, health, network), policies and batch
sizes, it reports the route `choose` takes, with the prediction and cost `choose`
worked with, and calls feasible exactly the routes that could have been chosen."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.routing.fleet import BackendState, Route
from gateway.routing.router import RouteRequest, choose, explain
from gateway.routing.sla import Policy

FEASIBLE_REASONS = {"cheapest-feasible", "fastest-feasible", "lowest-carbon-feasible"}


@st.composite
def snapshots(draw: st.DrawFn) -> tuple[list[Route], Policy, RouteRequest, float]:
    now_s = draw(st.floats(0.0, 5.0))
    routes = []
    for i in range(draw(st.integers(1, 6))):
        slots = draw(st.integers(1, 4))
        state = BackendState(f"b{i}", "127.0.0.1:1", "cpu", draw(st.floats(0.01, 3.0)), slots)
        state.network.rtt_ms = draw(st.floats(0.0, 3.0))
        state.healthy = draw(st.booleans()) or i == 0
        state.drained = draw(st.integers(0, 5)) == 0
        if draw(st.booleans()):
            state.set_carbon(draw(st.floats(10.0, 800.0)), draw(st.floats(5.0, 300.0)))
        state.refresh()
        route = Route(state, "m", f"v{i % 2}", i % 2 == 0)
        p50 = draw(st.floats(0.2, 30.0))
        route.estimate.seed(p50, p50 * draw(st.floats(1.0, 4.0)))
        route.row_fraction = draw(st.floats(0.05, 1.0))
        for _ in range(draw(st.integers(0, 8))):
            sent_s = now_s - draw(st.floats(0.0, 0.05))
            budget_ms = draw(st.sampled_from([10.0, 25.0, 250.0]))
            state.admit(route, route.estimate.mean_ms, sent_s + budget_ms / 1000, sent_s, budget_ms)
        routes.append(route)
    policy = Policy(
        latency_ms=draw(st.floats(1.0, 200.0)),
        percentile=draw(st.sampled_from([50.0, 90.0, 95.0, 99.0])),
        objective=draw(st.sampled_from(["cost", "latency", "carbon"])),
        on_infeasible=draw(st.sampled_from(["fastest", "reject"])),
        max_cost_usd_per_1m=draw(st.none() | st.floats(0.001, 50.0)),
        overhead_ms=draw(st.sampled_from([0.0, 0.5, 1.0])),
    )
    request = RouteRequest("m", batch_size=draw(st.integers(1, 8)))
    return routes, policy, request, now_s


@settings(max_examples=300, deadline=None)
@given(snapshots())
def test_explain_reports_what_choose_does(
    snapshot: tuple[list[Route], Policy, RouteRequest, float],
) -> None:
    routes, policy, request, now_s = snapshot
    decision = choose(request, routes, policy, now_s)
    explained, verdicts = explain(request, routes, policy, now_s)
    assert explained.route is decision.route and explained.reason == decision.reason
    assert [v.route for v in verdicts] == routes
    chosen = [v for v in verdicts if v.chosen]
    if decision.route is None:
        assert chosen == []
    else:
        (verdict,) = chosen
        assert verdict.route is decision.route
        assert verdict.predicted_ms == decision.predicted_ms
        assert verdict.cost_usd_per_1m * request.batch_size / 1e6 == _close(decision.cost_usd)
    feasible = [v for v in verdicts if v.feasible]
    for v in verdicts:
        within_cap = (
            policy.max_cost_usd_per_1m is None or v.cost_usd_per_1m <= policy.max_cost_usd_per_1m
        )
        expected = v.route.state.available and v.predicted_ms <= policy.budget_ms and within_cap
        assert v.feasible == expected, v.why
    if feasible:
        assert decision.reason in FEASIBLE_REASONS
        assert decision.route in [v.route for v in feasible]
        if policy.objective == "cost":
            cheapest = min(v.cost_usd_per_1m for v in feasible)
            assert verdict.cost_usd_per_1m == _close(cheapest)
        if policy.objective == "latency":
            assert verdict.predicted_ms == min(v.predicted_ms for v in feasible)
    elif any(v.route.state.available for v in verdicts):
        assert decision.reason in {"infeasible-fallback", "infeasible-explore", "infeasible-reject"}
        if decision.route is not None:
            fastest = min(v.predicted_ms for v in verdicts if v.route.state.available)
            assert verdict.predicted_ms == fastest
    else:
        assert decision.reason == "no-healthy-route"


def _close(value: float) -> object:
    import pytest

    return pytest.approx(value, rel=1e-12, abs=1e-18)
