"""Recorded price feeds in scenarios: turned into set_price events on the scenario's
timeline (for `simulate` and `load` alike), scaled by the short form."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.sim.scenario import ScenarioError, load_scenario, parse_scenario
from tests import ROOT

SCENARIO = """
scenario: replay
duration_s: 60
backends:
  - {name: a, hardware_class: cpu, price_usd_per_hour: 0.1, models: {m: {p50_ms: 1, p99_ms: 2}}}
  - {name: b, hardware_class: cpu, price_usd_per_hour: 0.2, models: {m: {p50_ms: 1, p99_ms: 2}}}
traffic: [{model: m, rate_per_s: 10}]
events: [{at_s: 30, drain: b}]
feeds:
  - kind: schedule
    file: prices.csv
    start: 2024-05-01T12:00:00Z
    speedup: 10
    selectors: [{backends: [a]}, {backends: [b], key: big, multiplier: 2}]
short: {duration_s: 6}
"""

CSV = """time,backend,usd_per_hour
2024-05-01T11:00:00Z,a,0.5
2024-05-01T12:01:00Z,a,0.7
2024-05-01T12:02:00Z,big,0.3
2024-05-01T12:02:00Z,a,0.7
2024-05-01T12:20:00Z,a,9.0
"""


def test_a_recorded_schedule_becomes_price_events(tmp_path: Path) -> None:
    (tmp_path / "prices.csv").write_text(CSV)
    scenario = parse_scenario(SCENARIO, tmp_path)
    prices = sorted(
        (e.at_s, e.set_price.backend, e.set_price.usd_per_hour)
        for e in scenario.events
        if hasattr(e, "set_price")
    )
    # In force at the start; a's repeat at 12:02 is no change; b only once it has a
    # row; 12:20 is past the run (60 s x 10).
    assert prices == [(0.0, "a", 0.5), (6.0, "a", 0.7), (12.0, "b", 0.6)]
    assert [e.at_s for e in scenario.events if hasattr(e, "drain")] == [30.0]
    short = scenario.shortened()
    assert sorted(e.at_s for e in short.events) == pytest.approx([0.0, 0.6, 1.2, 3.0])


def test_the_shipped_spot_feed_scenario_replays_its_spike() -> None:
    scenario = load_scenario(ROOT / "scenarios" / "spot-feed.yaml")
    assert [(e.at_s, e.set_price.usd_per_hour) for e in scenario.events] == [  # type: ignore[union-attr]
        (0.0, 0.08),
        (8.0, 0.084),
        (20.0, 0.80),
        (40.0, 0.08),
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("file: prices.csv", "file: gone.csv"), "cannot read recorded feed"),
        (("{backends: [a]}, ", "{backends: [c]}, "), "selector 0 covers no backend"),
        (("kind: schedule", "kind: electricity-maps"), "selector 0: needs zone"),
        (("{backends: [a]}, ", "{backends: [a], sku_id: X}, "), "sku_id is not for schedule feeds"),
    ],
)
def test_bad_replays_are_scenario_errors(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    (tmp_path / "prices.csv").write_text(CSV)
    with pytest.raises(ScenarioError, match=message):
        parse_scenario(SCENARIO.replace(*change), tmp_path)


def test_a_malformed_recording_says_why(tmp_path: Path) -> None:
    (tmp_path / "prices.csv").write_text("time,backend\n1,a\n")
    with pytest.raises(ScenarioError, match="missing usd_per_hour"):
        parse_scenario(SCENARIO, tmp_path)
