"""The modelled backends of a scenario: each route's service time, a lognormal fitted
to the scenario's p50 and p99 at batch 1.

Pure arithmetic over the scenario (scipy for the normal quantile); no grpc, no clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.sim.scenario import Scenario

Z99 = 2.3263478740408408
"""The standard normal's 99th percentile: p99 = p50 x exp(sigma x Z99)."""


def lognormal(p50_ms: float, p99_ms: float) -> tuple[float, float]:
    """(mu, sigma) of the lognormal with this median and 99th percentile."""
    return math.log(p50_ms), max(math.log(p99_ms / p50_ms), 0.0) / Z99


def normal_quantile(percentile: float) -> float:
    """The standard normal's quantile."""
    from scipy.stats import norm

    return float(norm.ppf(percentile / 100.0))


@dataclass(frozen=True, slots=True)
class RouteModel:
    """One modelled route: its backend's index and its service-time distribution."""

    backend: int
    model: str
    variant: str
    default: bool
    mu: float
    sigma: float
    p50_ms: float
    p99_ms: float

    @property
    def mean_ms(self) -> float:
        return math.exp(self.mu + self.sigma**2 / 2)

    def quantile_ms(self, percentile: float) -> float:
        if percentile == 50.0:
            return self.p50_ms
        if percentile == 99.0:
            return self.p99_ms
        return math.exp(self.mu + self.sigma * normal_quantile(percentile))


def route_models(scenario: Scenario) -> list[RouteModel]:
    """Every route of the scenario, in configuration order."""
    out = []
    for index, backend in enumerate(scenario.backends):
        for model in backend.models:
            for n, entry in enumerate(backend.variants(model)):
                mu, sigma = lognormal(entry.p50_ms, entry.p99_ms)
                out.append(
                    RouteModel(
                        index, model, entry.variant, n == 0, mu, sigma, entry.p50_ms, entry.p99_ms
                    )
                )
    return out
