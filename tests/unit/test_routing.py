"""The router seam, the policy book and the fleet state: pure logic, no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.errors import InvalidInput
from backends.tensors import TensorSpec
from gateway.config import PoliciesSettings, PolicySettings
from gateway.fleet import BackendState, FleetState, ModelInfo, Route
from gateway.policy import PolicyBook
from gateway.router import RouteRequest, choose


def route(name: str, price: float, in_flight: int = 0, slots: int = 1) -> Route:
    return Route(name, "m", "v", "127.0.0.1:1", "cpu", price, in_flight, slots)


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        ([route("a", 0.2), route("b", 0.1)], ["b", "a"]),
        ([route("a", 0.1, in_flight=2), route("b", 0.2)], ["b", "a"]),
        ([route("a", 0.1, in_flight=2, slots=4), route("b", 0.2, in_flight=1)], ["a", "b"]),
        ([route("b", 0.1), route("a", 0.1)], ["a", "b"]),
    ],
)
def test_choose_orders_by_load_then_price(routes: list[Route], expected: list[str]) -> None:
    decision = choose(
        RouteRequest("m"), routes, PolicyBook(PoliciesSettings()).resolve(RouteRequest("m")), 0.0
    )
    assert [r.backend for r in decision.routes] == expected
    assert decision.route is not None and decision.route.backend == expected[0]


def test_no_routes_is_an_empty_decision() -> None:
    decision = choose(
        RouteRequest("m"), [], PolicyBook(PoliciesSettings()).resolve(RouteRequest("m")), 0.0
    )
    assert decision.route is None and decision.reason == "no-healthy-route"


@given(
    st.lists(
        st.tuples(st.floats(0, 10), st.integers(0, 50), st.integers(1, 8)), min_size=1, max_size=20
    )
)
def test_choose_returns_every_route_once_and_is_pure(specs: list[tuple[float, int, int]]) -> None:
    routes = [route(f"b{i}", p, f, s) for i, (p, f, s) in enumerate(specs)]
    policy = PolicyBook(PoliciesSettings()).resolve(RouteRequest("m"))
    first = choose(RouteRequest("m"), routes, policy, 1.0)
    assert sorted(r.backend for r in first.routes) == sorted(r.backend for r in routes)
    assert choose(RouteRequest("m"), list(reversed(routes)), policy, 1.0) == first
    loads = [r.in_flight / r.slots for r in first.routes]
    assert loads == sorted(loads)


def test_policy_resolution_order() -> None:
    book = PolicyBook(
        PoliciesSettings(
            default=PolicySettings(
                latency_ms=100, percentile=99, objective="cost", on_infeasible="fastest"
            ),
            classes={"gold": PolicySettings(latency_ms=10, on_infeasible="reject")},
            models={"digits": PolicySettings(latency_ms=20)},
        )
    )
    assert book.resolve(RouteRequest("cnn")).latency_ms == 100
    assert book.resolve(RouteRequest("digits")).latency_ms == 20
    gold = book.resolve(RouteRequest("digits", sla_class="gold"))
    assert (gold.latency_ms, gold.on_infeasible, gold.objective) == (10, "reject", "cost")
    assert book.resolve(RouteRequest("digits", sla_class="gold", sla_ms=3)).latency_ms == 3
    with pytest.raises(InvalidInput, match="unknown sla_class 'tin' \\(classes: gold\\)"):
        book.resolve(RouteRequest("digits", sla_class="tin"))


INFO = ModelInfo(
    "m", ("1",), "onnxruntime_onnx", (TensorSpec("x", "FP32", (-1, 2)),), (), 8, "ort-cpu-fp32"
)


def test_fleet_routes_follow_health_and_models() -> None:
    fleet = FleetState(
        [BackendState("a", "127.0.0.1:1", "cpu", 0.1), BackendState("b", "127.0.0.1:2", "cpu", 0.2)]
    )
    assert fleet.routes("m") == [] and not fleet.any_ready()
    fleet.record_probe("a", 1.0, {"m": INFO})
    fleet.record_probe("b", 1.0, {})
    assert [r.backend for r in fleet.routes("m")] == ["a"]
    assert fleet.model_ready("m") and fleet.known_models() == ["m"]
    fleet.acquire("a")
    assert fleet.routes("m")[0].in_flight == 1
    fleet.release("a")
    fleet.record_failure("a", 2.0, "connection refused")
    assert fleet.routes("m") == [] and not fleet.model_ready("m")
    # Metadata survives for the API while no backend is healthy.
    assert fleet.model_info("m") == INFO
    assert fleet.backends["a"].consecutive_failures == 1
