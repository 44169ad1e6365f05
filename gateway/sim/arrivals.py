"""A scenario's arrivals, generated up front for the whole run (seeded numpy RNG):
Poisson, constant, bursts or a trace file per stream, with the scenario's surges;
every policy of a run replays the same trace.

Imports numpy and the scenario format; no grpc, no clock.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gateway.sim.scenario import MultiplyRateEvent, Scenario, ScenarioError, Traffic

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def _rate_pieces(
    scenario: Scenario, stream: Traffic, end_s: float
) -> tuple[list[float], list[float]]:
    """Breakpoints and the stream's rate on each piece between them."""
    start = stream.start_s
    stop = min(end_s, stream.end_s if stream.end_s is not None else end_s)
    cuts = {start, stop}
    surges = []
    for event in scenario.events:
        if not isinstance(event, MultiplyRateEvent):
            continue
        surge = event.multiply_rate
        if surge.model is not None and surge.model != stream.model:
            continue
        if surge.sla_class is not None and surge.sla_class != stream.sla_class:
            continue
        surges.append((event.at_s, event.at_s + surge.for_s, surge.factor))
        cuts.update((event.at_s, event.at_s + surge.for_s))
    bursts = []
    if stream.arrivals == "bursts":
        at = stream.burst_every_s / 2
        while at < stop:
            bursts.append((at, at + stream.burst_for_s))
            cuts.update((at, at + stream.burst_for_s))
            at += stream.burst_every_s
    points = sorted(c for c in cuts if start <= c <= stop)
    rates = []
    for a, b in itertools.pairwise(points):
        mid = (a + b) / 2
        rate = stream.rate_per_s
        for s0, s1, factor in surges:
            if s0 <= mid < s1:
                rate *= factor
        for b0, b1 in bursts:
            if b0 <= mid < b1:
                rate *= stream.burst_factor
        rates.append(rate)
    return points, rates


def stream_arrivals(
    scenario: Scenario, stream: Traffic, rng: np.random.Generator, end_s: float
) -> FloatArray:
    """Arrival times (seconds, sorted) of one stream."""
    if stream.arrivals == "trace":
        assert stream.trace_file is not None
        try:
            times = np.atleast_1d(np.loadtxt(stream.trace_file, dtype=np.float64, ndmin=1))
        except (OSError, ValueError) as exc:
            raise ScenarioError(f"trace {stream.trace_file}: {exc}") from exc
        stop = min(end_s, stream.end_s if stream.end_s is not None else end_s)
        times = np.sort(times[(times >= stream.start_s) & (times < stop)])
        return times
    points, rates = _rate_pieces(scenario, stream, end_s)
    if len(points) < 2:
        return np.empty(0)
    widths = np.diff(np.asarray(points))
    cumulative = np.concatenate(([0.0], np.cumsum(widths * np.asarray(rates))))
    total = float(cumulative[-1])
    if total <= 0:
        return np.empty(0)
    if stream.arrivals == "constant":
        unit = np.arange(0.5, total, 1.0)
    else:
        # A Poisson process is uniform given its count; in cumulative-rate space.
        unit = np.sort(rng.uniform(0.0, total, rng.poisson(total)))
    out: FloatArray = np.interp(unit, cumulative, np.asarray(points))
    return out


@dataclass(frozen=True, slots=True)
class Trace:
    """Every arrival of a run, in time order: its time and its stream's index."""

    times: FloatArray
    streams: IntArray

    def __len__(self) -> int:
        return len(self.times)


def make_trace(scenario: Scenario) -> Trace:
    rng = np.random.default_rng([scenario.seed, 0])
    parts = [stream_arrivals(scenario, s, rng, scenario.duration_s) for s in scenario.traffic]
    if not parts:
        return Trace(np.empty(0), np.empty(0, dtype=np.int64))
    times = np.concatenate(parts)
    streams = np.concatenate([np.full(len(p), k, dtype=np.int64) for k, p in enumerate(parts)])
    order = np.argsort(times, kind="stable")
    return Trace(times[order], streams[order])
