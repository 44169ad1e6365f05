"""Live latency estimates per route: an EWMA of the service time and a decayed
quantile sketch, seeded from the compile-time profile.

A sample is a route's observed service time: the latency of an attempt that found
a free slot, less the network round trip, or, for one that waited, the time from when
it took its slot to its answer (never its latency, which holds the queue), so the
estimate describes the time a request holds a slot and the router adds the wait for
the load it sees. The sketch keeps counts in logarithmic buckets (relative error under
5%); every count decays with a half-life, so old behaviour fades and a route
that got slower shows it within a few seconds of traffic. Quantiles are
recomputed every few samples, or on the first sample after a second (a route
that only gets probes follows each one), and read as plain attributes, because
the router reads them for every route of every request.

Pure: time comes in as `now_s`. Imports no grpc, no protobuf, no clock, no asyncio
and no randomness (the rule of gateway/routing).
"""

from __future__ import annotations

import math
from collections import deque

GAMMA = 1.08
_LOG_GAMMA = math.log(GAMMA)
MIN_MS = 0.01
BUCKETS = 240  # 0.01 ms .. about 1,000 s
HALF_LIFE_S = 10.0
EWMA_WEIGHT = 0.1
"""The newest sample's weight in the mean once the mean rests on enough samples; before
that a sample weighs 1/(samples + 2), the prior (or a first sample) counting as one, so
a prior that misjudges the route (a profile times compute alone, not the calls around
it) gives way within a few answers instead of a few dozen."""
MEAN_CLIP = 4.0
"""Once the mean rests on CLIP_AFTER samples, a sample moves it as if it were at most
this many times the mean: one slow answer (a garbage collection, a runtime's first run, a
new connection) then raises the mean by at most 30%, where it could double or triple
it and make a cheap route look dear for dozens of answers; a real slowdown still lifts the
mean by 30% a sample."""
CLIP_AFTER = 10
REFRESH_EVERY = 8
"""Samples between quantile refreshes..."""
REFRESH_AFTER_S = 1.0
"""...or seconds, whichever comes first: a route that gets only probes (one every
few seconds) must not keep quantiles that its decayed samples no longer support."""
PRIOR_WEIGHT = 20.0
"""How many samples a profile's figures count for when seeding the sketch."""


def _bucket(ms: float) -> int:
    if ms <= MIN_MS:
        return 0
    return min(BUCKETS - 1, int(math.log(ms / MIN_MS) / _LOG_GAMMA) + 1)


def _bucket_ms(index: int) -> float:
    """A bucket's representative value (its upper edge: estimates err slow)."""
    return float(MIN_MS * GAMMA**index)


class LatencyEstimate:
    """One route's service-time estimate, in milliseconds."""

    __slots__ = (
        "_counts",
        "_decayed_s",
        "_extra",
        "_refreshed_s",
        "_since_refresh",
        "_total",
        "last_sample_s",
        "mean_ms",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "samples",
        "seeded",
    )

    def __init__(self, default_ms: float = 1.0) -> None:
        self.mean_ms = default_ms
        self.p50_ms = default_ms
        self.p95_ms = default_ms
        self.p99_ms = default_ms
        self.samples = 0
        """Samples observed (not counting the prior)."""
        self.last_sample_s: float | None = None
        self.seeded = False
        """True once a profile or a sample informs it (else the figures are a guess)."""
        self._counts = [0.0] * BUCKETS
        self._total = 0.0
        self._since_refresh = 0
        self._refreshed_s = -math.inf
        self._decayed_s: float | None = None
        self._extra: dict[float, float] = {}

    def seed(self, p50_ms: float, p99_ms: float) -> None:
        """Starts from a profile: a prior worth PRIOR_WEIGHT samples, spread so
        its median and 99th percentile match the profile's."""
        p99_ms = max(p99_ms, p50_ms)
        self._counts = [0.0] * BUCKETS
        self._counts[_bucket(p50_ms)] += PRIOR_WEIGHT * 0.9
        self._counts[_bucket((p50_ms + p99_ms) / 2)] += PRIOR_WEIGHT * 0.085
        self._counts[_bucket(p99_ms)] += PRIOR_WEIGHT * 0.015
        self._total = PRIOR_WEIGHT
        self.mean_ms = p50_ms * 0.9 + (p50_ms + p99_ms) / 2 * 0.085 + p99_ms * 0.015
        self.seeded = True
        self._refresh()

    def observe(self, service_ms: float, now_s: float) -> None:
        service_ms = max(service_ms, MIN_MS)
        self._decay(now_s)
        if self.samples == 0 and not self.seeded:
            self.mean_ms = service_ms
        elif self.samples < CLIP_AFTER:
            weight = max(EWMA_WEIGHT, 1.0 / (self.samples + 2))
            self.mean_ms += weight * (service_ms - self.mean_ms)
        else:
            clipped = min(service_ms, MEAN_CLIP * self.mean_ms)
            self.mean_ms += EWMA_WEIGHT * (clipped - self.mean_ms)
        self._counts[_bucket(service_ms)] += 1.0
        self._total += 1.0
        self.samples += 1
        self.last_sample_s = now_s
        self._since_refresh += 1
        if (
            not self.seeded
            or self._since_refresh >= REFRESH_EVERY
            or now_s - self._refreshed_s >= REFRESH_AFTER_S
        ):
            self.seeded = True
            self._refresh()
            self._refreshed_s = now_s

    def weight(self, now_s: float) -> float:
        """How many samples the estimate rests on at `now_s` (the profile's prior
        included), each decayed with its age: a percentile p is told apart from one
        outlier only past 1 / (1 - p) of them (100 for p99)."""
        if self._decayed_s is None or now_s <= self._decayed_s:
            return self._total
        return float(self._total * 0.5 ** ((now_s - self._decayed_s) / HALF_LIFE_S))

    def quantile_ms(self, percentile: float) -> float:
        """The service time at `percentile` (0..100)."""
        if percentile == 99.0:
            return self.p99_ms
        if percentile == 50.0:
            return self.p50_ms
        if percentile == 95.0:
            return self.p95_ms
        value = self._extra.get(percentile)
        if value is None:
            value = self._extra[percentile] = self._quantile(percentile)
        return value

    def _decay(self, now_s: float) -> None:
        if self._decayed_s is None:
            self._decayed_s = now_s
            return
        elapsed = now_s - self._decayed_s
        if elapsed < 1.0:
            return
        factor = 0.5 ** (elapsed / HALF_LIFE_S)
        self._counts = [c * factor for c in self._counts]
        self._total *= factor
        self._decayed_s = now_s

    def _refresh(self) -> None:
        self._since_refresh = 0
        self.p50_ms, self.p95_ms, self.p99_ms = self._quantiles(50.0, 95.0, 99.0)
        self._extra = {}

    def _quantile(self, percentile: float) -> float:
        return self._quantiles(percentile)[0]

    def _quantiles(self, *percentiles: float) -> list[float]:
        """The service times at `percentiles` (ascending), in one pass over the sketch."""
        if self._total <= 0:
            return [self.mean_ms] * len(percentiles)
        ranks = [self._total * p / 100.0 for p in percentiles]
        found: list[float] = []
        running = 0.0
        for index, count in enumerate(self._counts):
            if count > 0:
                running += count
                while running >= ranks[len(found)]:
                    found.append(_bucket_ms(index))
                    if len(found) == len(ranks):
                        return found
        return found + [self.mean_ms] * (len(ranks) - len(found))


def service_sample(latency_ms: float, rtt_ms: float) -> float:
    """A route's service time from the latency of an attempt that found a free slot
    (so no queue wait is in it): less the network round trip, but never below a
    quarter of the latency (a noisy round-trip estimate must not make a route look
    free)."""
    latency_ms = max(latency_ms, MIN_MS)
    return max(latency_ms - rtt_ms, latency_ms * 0.25)


RTT_WINDOW = 8
"""Health probes whose round trips the network estimate takes the least of."""


class NetworkEstimate:
    """Round-trip time to a backend, in milliseconds: the least round trip of its
    cheapest call over the last RTT_WINDOW health probes. A stall (the gateway's
    process paused, a busy core) only ever adds to a round trip, and one stalled
    probe in an average would lift the estimate for many probes after it, and with
    it shrink every service sample taken meanwhile (latency less round trip); a
    lasting rise shows once it fills the window."""

    __slots__ = ("_recent", "rtt_ms")

    def __init__(self, rtt_ms: float = 0.2) -> None:
        self.rtt_ms = rtt_ms
        self._recent: deque[float] = deque(maxlen=RTT_WINDOW)

    def observe(self, rtt_ms: float) -> None:
        self._recent.append(rtt_ms)
        self.rtt_ms = min(self._recent)
