"""The two-gateway bench's cost at the backends' busy time: each OK answer's backend at
its price when the request was due (the scenario's price events), times that worker's
mean execution time per inference between two readings of its statistics, shared by
its slots."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from gateway.bench.two_gateways import busy_cost_per_1m, busy_ms
from gateway.routing.figures import usd_per_busy_ms
from gateway.sim.scenario import parse_scenario

ROOT = Path(__file__).resolve().parents[3]

SCENARIO = """
scenario: busy
duration_s: 10
backends:
  - {name: cheap, price_usd_per_hour: 0.04, slots: 1, models: {m: {p50_ms: 8, p99_ms: 9}}}
  - {name: dear, price_usd_per_hour: 2.40, slots: 1, models: {m: {p50_ms: 1, p99_ms: 2}}}
traffic:
  - {model: m, rate_per_s: 10}
events:
  - {at_s: 5, set_price: {backend: cheap, usd_per_hour: 0.40}}
"""

HEADER = "send_s,scheduled_s,model,sla_class,sla_ms,latency_ms,status,backend,variant,cost_usd\n"


def rows(*rows: tuple[float, str, str]) -> str:
    return HEADER + "".join(
        f"{t:.3f},{t:.3f},m,,100,9.0,{status},{backend},fp32,0\n" for t, status, backend in rows
    )


def test_each_answer_costs_its_backends_price_when_it_was_due(tmp_path: Path) -> None:
    scenario = parse_scenario(SCENARIO, ROOT / "scenarios")
    records = tmp_path / "requests.csv"
    records.write_text(
        rows(
            (1.0, "OK", "cheap"),  # before the price change
            (6.0, "OK", "cheap"),  # after it: ten times dearer
            (2.0, "OK", "dear"),
            (3.0, "UNAVAILABLE", "cheap"),  # not answered OK: costs nothing, not counted
        )
    )
    prices = {"cheap": 0.04, "dear": 2.40}
    slots = {"cheap": 1, "dear": 2}
    busy = {"cheap": 8.0, "dear": 1.5}
    expected = (
        usd_per_busy_ms(0.04, 1) * 8.0
        + usd_per_busy_ms(0.40, 1) * 8.0
        + usd_per_busy_ms(2.40, 2) * 1.5
    ) / 3
    got = busy_cost_per_1m(records, scenario, prices, slots, busy)
    assert got == pytest.approx(expected * 1e6)


def test_no_ok_answer_is_nan(tmp_path: Path) -> None:
    scenario = parse_scenario(SCENARIO, ROOT / "scenarios")
    records = tmp_path / "requests.csv"
    records.write_text(rows((1.0, "UNAVAILABLE", "cheap")))
    cost = busy_cost_per_1m(records, scenario, {"cheap": 0.04}, {"cheap": 1}, {"cheap": 8.0})
    assert math.isnan(cost)


def test_busy_ms_is_the_mean_execution_time_between_readings() -> None:
    before = {"cheap": (10, 80_000_000), "idle": (3, 1_000_000)}
    after = {"cheap": (20, 160_000_000), "idle": (3, 1_000_000), "new": (2, 3_000_000)}
    # cheap: 80 ms over 10 inferences; idle ran nothing (no figure); new from zero.
    assert busy_ms(before, after) == {"cheap": 8.0, "new": 1.5}
