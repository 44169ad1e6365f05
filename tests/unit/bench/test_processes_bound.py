"""The processes bench's bound: with a core for each gateway process, the busiest one
(the largest share of the gateway CPU, as the kernel spread the connections) caps the
group at one core's worth of its CPU per request."""

from __future__ import annotations

import argparse

import pytest

from gateway.bench.processes import Round, section

ARGS = argparse.Namespace(
    model="digits",
    variant="ort-cpu-fp32",
    concurrency=16,
    warmup_s=2.0,
    duration_s=8.0,
    load_reports=True,
)
"""A bench run's options, as the section reads them."""


def test_the_busiest_process_bounds_the_group() -> None:
    one = Round(1, 16, 1000.0, 8.0, [600.0], 900.0)
    even = Round(2, 16, 1000.0, 8.0, [310.0, 310.0], 900.0)
    uneven = Round(2, 16, 1000.0, 8.0, [400.0, 220.0], 900.0)
    assert one.busiest_share == 1.0 and one.bound_per_s == pytest.approx(1e6 / 600)
    assert even.busiest_share == pytest.approx(0.5)
    # Split evenly, two processes give about twice one's bound (less their own overhead).
    assert even.bound_per_s / one.bound_per_s == pytest.approx(600 / 310)
    # Ten connections of sixteen on one process: it caps the group sooner.
    assert uneven.bound_per_s / one.bound_per_s == pytest.approx(1.5)


def test_the_section_judges_the_target_by_the_bound() -> None:
    rounds = [
        Round(2, 16, 900.0, 9.0, [320.0, 300.0], 800.0),
        Round(1, 16, 1000.0, 8.0, [600.0], 800.0),
        Round(1, 8, 700.0, 6.0, [800.0], 900.0),
    ]
    text = section(ARGS, rounds, 30.0)
    assert "measured here: 0.90x" in text
    assert "by the bound: 1.88x (target >= 1.6x: met)" in text
    assert "320 / 300" in text
    # One process alone on 8 connections spends 800 us a request: two such processes,
    # a core each, serve 2 x 1e6 / 800 a second against one's 1e6 / 600 on all 16.
    assert "2 x 600 / 800 us = 1.50x (target >= 1.6x: NOT met)" in text


def test_the_model_halves_the_connections_and_judges_the_target() -> None:
    rounds = [
        Round(2, 16, 900.0, 9.0, [500.0, 480.0], 800.0),
        Round(1, 16, 1000.0, 8.0, [600.0], 800.0),
        Round(1, 8, 700.0, 6.0, [650.0], 900.0),
        Round(1, 8, 700.0, 6.0, [690.0], 900.0),
    ]
    text = section(ARGS, rounds, 30.0)
    assert "| 1 | 8 |" in text
    # The median of the half rounds (670 us).
    assert "2 x 600 / 670 us = 1.79x (target >= 1.6x: met)" in text
