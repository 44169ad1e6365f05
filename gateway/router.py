"""The router: chooses a route for one request. A pure function of (request,
routes, policy, now): no I/O, no clock, no randomness of its own.

This is the seam the SLA router fills: today it prefers the least-loaded route
(in-flight per slot) and, among equally loaded ones, the cheapest; it returns
every candidate in preference order so the backend pool can retry on the next.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.fleet import Route


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What routing knows about a request."""

    model: str
    batch_size: int = 1
    sla_ms: float | None = None
    sla_class: str | None = None
    priority: int = 0


@dataclass(frozen=True, slots=True)
class Policy:
    """The SLA policy that applies to a request (resolved from the fleet's policies)."""

    latency_ms: float = 100.0
    percentile: float = 99.0
    objective: str = "cost"
    on_infeasible: str = "fastest"
    max_cost_usd_per_1m: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The router's choice: routes in preference order (first is chosen), and why."""

    routes: tuple[Route, ...]
    reason: str

    @property
    def route(self) -> Route | None:
        return self.routes[0] if self.routes else None


def choose(
    request: RouteRequest, routes: Sequence[Route], policy: Policy, now_s: float
) -> Decision:
    """Orders the healthy routes for `request`; empty when none can serve it."""
    if not routes:
        return Decision((), "no-healthy-route")
    ordered = sorted(
        routes,
        key=lambda r: (r.in_flight / max(1, r.slots), r.price_usd_per_hour, r.backend),
    )
    return Decision(tuple(ordered), "least-loaded")
