"""The policy book (gateway/routing/policy.py): which policy a request gets, and the
gateway's request overhead taken off every SLA."""

from __future__ import annotations

import pytest

from backends.protocol.errors import InvalidInput
from gateway.config import PoliciesSettings, PolicySettings
from gateway.routing.policy import PolicyBook
from gateway.routing.router import RouteRequest, choose, explain
from tests.unit.routing.builders import route


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
