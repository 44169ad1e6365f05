"""Latency and network estimates (gateway/routing/estimates.py): the decayed
quantile sketch seeded from a profile, and the round trip that ignores a stalled probe."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.routing.estimates import (
    CLIP_AFTER,
    MEAN_CLIP,
    RTT_WINDOW,
    LatencyEstimate,
    NetworkEstimate,
)


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


def test_the_weight_counts_the_samples_decayed_with_their_age() -> None:
    est = LatencyEstimate()
    assert est.weight(0.0) == 0.0
    for _ in range(4):
        est.observe(1.0, 0.0)
    assert est.weight(0.0) == 4.0
    assert est.weight(10.0) == pytest.approx(2.0)  # one half-life later
    est.observe(1.0, 20.0)
    assert est.weight(20.0) == pytest.approx(2.0)  # 4 x 1/4, and the new one
    seeded = LatencyEstimate()
    seeded.seed(1.0, 2.0)
    assert seeded.weight(100.0) == 20.0  # the prior decays from the first sample on


def test_a_prior_that_misjudges_the_route_gives_way_within_a_few_answers() -> None:
    # A profile that timed compute alone (0.01 ms) where answers take 1 ms with the
    # calls around it: the mean follows the answers, not the prior.
    est = LatencyEstimate()
    est.seed(0.01, 0.02)
    for i in range(5):
        est.observe(1.0, float(i))
    assert est.mean_ms > 0.8


def test_one_slow_answer_raises_a_settled_mean_by_at_most_its_clip() -> None:
    est = LatencyEstimate()
    for i in range(CLIP_AFTER + 20):
        est.observe(0.5, i * 0.01)
    settled = est.mean_ms
    est.observe(100.0, 1.0)  # a collection, a first run on a new connection
    assert est.mean_ms == pytest.approx(settled + 0.1 * (MEAN_CLIP - 1) * settled)
    assert est.p99_ms >= 0.5  # the tail still sees what came


def test_a_real_slowdown_is_still_followed() -> None:
    est = LatencyEstimate()
    for i in range(CLIP_AFTER + 20):
        est.observe(0.5, i * 0.01)
    for i in range(40):
        est.observe(5.0, 1.0 + i * 0.01)  # ten times slower from now on
    assert est.mean_ms > 4.5
