"""The SLA policy a request is held to, as the router reads it: a value of its own, so the
fleet file's reader (gateway.config) and the admin CLI need not import the router.

Pure, as the rest of gateway/routing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Policy:
    """The SLA policy that applies to a request (resolved from the fleet's policies)."""

    latency_ms: float = 100.0
    percentile: float = 99.0
    objective: str = "cost"
    on_infeasible: str = "fastest"
    max_cost_usd_per_1m: float | None = None
    retries: int = 2
    """Further attempts on the next-best routes after a failed one (deadline allowing)."""
    hedge: bool = False
    """Send a second attempt to the next route when the first runs past its predicted p95."""
    name: str = "default"
    """The class name for metrics: the request's `sla_class`, `custom` for its own
    `sla_ms`, else `default`."""
    overhead_ms: float = 0.0
    """What the SLA counts outside the gateway's calls to backends (the gateway's
    `request_overhead_ms`): routes must meet `latency_ms` less this."""

    @property
    def budget_ms(self) -> float:
        """The latency a route's prediction must meet: the SLA less the overhead."""
        return self.latency_ms - self.overhead_ms
