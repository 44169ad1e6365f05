"""The routing rule's formulas, in one place: a request's predicted latency on a route,
and what its busy time costs there (in USD, or in grams of CO2 for the carbon
objective). The router's choice, `explain`, the simulator's feasibility and its lower
bound, and each backend's rates per busy millisecond all call these.

Pure arithmetic: imports nothing.
"""

from __future__ import annotations

MS_PER_HOUR = 3_600_000.0


def predicted_ms(rtt_ms: float, service_ms: float, factor: float, wait_ms: float = 0.0) -> float:
    """Predicted latency: the network round trip, the service time at the percentile
    times the batch's factor (see `router.batch_factor`), and the queue wait."""
    return rtt_ms + service_ms * factor + wait_ms


def per_request(rate_per_busy_ms: float, mean_ms: float, factor: float) -> float:
    """What a request's busy time (mean service time times the batch's factor) costs at
    a backend's rate per busy millisecond: USD, or grams of CO2."""
    return rate_per_busy_ms * mean_ms * factor


def usd_per_busy_ms(price_usd_per_hour: float, slots: int) -> float:
    """The price of one millisecond of one of a backend's `slots`."""
    return price_usd_per_hour / MS_PER_HOUR / max(1, slots)


def g_co2_per_busy_ms(power_w: float, g_per_kwh: float, slots: int) -> float:
    """The emissions of one millisecond of one of a backend's `slots` (W x ms = J / 1000;
    1 kWh = 3.6e6 J)."""
    return power_w / 1000.0 / 3.6e6 * g_per_kwh / max(1, slots)
