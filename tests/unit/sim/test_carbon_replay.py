"""Carbon in scenarios: `set_carbon` events, recorded Electricity Maps feeds replayed
as them, and `simulate` moving a carbon-objective class when intensity changes (the
shipped scenarios/carbon-feed.yaml), checked by share thresholds per class."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gateway.loadtest.load import backend_share
from gateway.loadtest.records import Records, Stream
from gateway.sim.scenario import (
    ScenarioError,
    SetCarbonEvent,
    action_of,
    load_scenario,
    parse_scenario,
)
from gateway.sim.simulate import simulate
from tests import ROOT
from tests.unit.sim.test_scenario_events import Recorder

HEAD = """
scenario: t
duration_s: 60
backends:
  - {name: a, price_usd_per_hour: 0.1, power_w: 20, models: {m: {p50_ms: 1, p99_ms: 2}}}
  - {name: b, price_usd_per_hour: 0.1, models: {m: {p50_ms: 1, p99_ms: 2}}}
policies: {classes: {green: {latency_ms: 50, objective: carbon}}}
traffic:
  - {model: m, sla_class: green, rate_per_s: 10}
"""


class CarbonRecorder(Recorder):
    def set_carbon(self, backend: str, g_per_kwh: float) -> str:
        self.calls.append(("set_carbon", backend, g_per_kwh))
        return "carbon"


def test_a_set_carbon_event_is_applied_through_its_target() -> None:
    scenario = parse_scenario(
        HEAD + "events: [{at_s: 5, set_carbon: {backend: a, g_per_kwh: 42}}]", Path(".")
    )
    (event,) = scenario.events
    assert isinstance(event, SetCarbonEvent) and action_of(event) == "set_carbon"
    target = CarbonRecorder()
    assert event.apply(target) == "carbon"
    assert target.calls == [("set_carbon", "a", 42.0)]
    assert scenario.shortened() == scenario  # no short form: as it is


@pytest.mark.parametrize(
    ("events", "words"),
    [
        ("[{at_s: 5, set_carbon: {backend: b, g_per_kwh: 42}}]", "no power_w"),
        ("[{at_s: 5, set_carbon: {backend: c, g_per_kwh: 42}}]", "unknown backend"),
        ("[{at_s: 5, set_carbon: {backend: a, g_per_kwh: -1}}]", "greater than or equal"),
        ("[{at_s: 5, set_carbon: {backend: a}}]", "g_per_kwh"),
    ],
)
def test_bad_set_carbon_events_are_refused_saying_why(events: str, words: str) -> None:
    with pytest.raises(ScenarioError, match=words):
        parse_scenario(HEAD + f"events: {events}", Path("."))


def test_a_share_check_names_a_class_with_traffic() -> None:
    with pytest.raises(ScenarioError, match="no traffic of class 'gold'"):
        parse_scenario(
            HEAD + "thresholds: {shares: [{backend: a, sla_class: gold, from_s: 1, to_s: 2, "
            "max_share: 0.5}]}",
            Path("."),
        )


def feed(kind_extra: str = "") -> str:
    return f"""
feeds:
  - kind: electricity-maps
    file: carbon.json
    start: 2024-05-01T12:00:00Z
    speedup: 60
    selectors: [{{backends: [a], zone: DE}}{kind_extra}]
"""


def reading(zone: str, g: float, time: str | None) -> dict[str, object]:
    entry: dict[str, object] = {"zone": zone, "carbonIntensity": g}
    if time is not None:
        entry["datetime"] = time
    return entry


def carbon_events(scenario_text: str, folder: Path) -> list[tuple[float, str, float]]:
    scenario = parse_scenario(scenario_text, folder)
    return [
        (e.at_s, e.set_carbon.backend, e.set_carbon.g_per_kwh)
        for e in scenario.events
        if isinstance(e, SetCarbonEvent)
    ]


def test_recorded_latest_answers_become_carbon_events(tmp_path: Path) -> None:
    # A list of /v3/carbon-intensity/latest answers, out of order, two zones.
    answers = [
        reading("DE", 300, "2024-05-01T12:10:00Z"),
        reading("FR", 50, "2024-05-01T11:00:00Z"),
        reading("DE", 400, "2024-05-01T11:30:00Z"),
        reading("DE", 400, "2024-05-01T12:20:00Z"),  # no change
        reading("DE", 200, "2024-05-01T12:30:00Z"),
        reading("DE", 999, "2024-05-01T13:30:00Z"),  # past the run (60 s x 60)
    ]
    (tmp_path / "carbon.json").write_text(json.dumps(answers))
    assert carbon_events(HEAD + feed(), tmp_path) == [
        (0.0, "a", 400.0),
        (10.0, "a", 300.0),
        (20.0, "a", 400.0),
        (30.0, "a", 200.0),
    ]


def test_a_recorded_history_answer_becomes_carbon_events(tmp_path: Path) -> None:
    history = {
        "zone": "DE",
        "history": [
            {"carbonIntensity": 120, "datetime": "2024-05-01T12:30:00.000Z"},
            {"carbonIntensity": 80, "datetime": "2024-05-01T12:45:00.000Z"},
        ],
    }
    (tmp_path / "carbon.json").write_text(json.dumps(history))
    # Nothing in force at the start: a has no event until its zone has a reading.
    assert carbon_events(HEAD + feed(), tmp_path) == [(30.0, "a", 120.0), (45.0, "a", 80.0)]


@pytest.mark.parametrize(
    ("content", "extra", "words"),
    [
        (json.dumps([reading("DE", 100, None)]), "", "has no datetime"),
        (json.dumps({"zone": "DE", "history": 3}), "", "history missing or not a list"),
        ("not json", "", "not valid JSON"),
        (
            json.dumps([reading("DE", 100, "2024-05-01T12:00:00Z")]),
            ", {backends: [b], zone: DE}",
            "covers b, which has no power_w",
        ),
        (None, "", "cannot read recorded feed"),
    ],
)
def test_bad_recorded_carbon_feeds_are_refused_saying_why(
    tmp_path: Path, content: str | None, extra: str, words: str
) -> None:
    if content is not None:
        (tmp_path / "carbon.json").write_text(content)
    with pytest.raises(ScenarioError, match=words):
        parse_scenario(HEAD + feed(extra), tmp_path)


def test_the_shipped_carbon_feed_scenario_replays_its_history() -> None:
    scenario = load_scenario(ROOT / "scenarios" / "carbon-feed.yaml")
    assert sorted(
        (e.at_s, e.set_carbon.backend, e.set_carbon.g_per_kwh)
        for e in scenario.events
        if isinstance(e, SetCarbonEvent)
    ) == [
        (0.0, "big-cpu", 58.0),
        (0.0, "small-cpu", 320.0),
        (20.0, "big-cpu", 64.0),
        (20.0, "small-cpu", 35.0),
        (40.0, "big-cpu", 61.0),
        (40.0, "small-cpu", 290.0),
        (60.0, "big-cpu", 57.0),
        (60.0, "small-cpu", 310.0),
    ]


def green_on_small_cpu(report_checks: list[object]) -> list[tuple[bool, str]]:
    return [(c.met, c.detail) for c in report_checks if c.key == "shares"]  # type: ignore[attr-defined]


def test_simulate_moves_the_carbon_class_while_its_zone_is_cleaner() -> None:
    scenario = load_scenario(ROOT / "scenarios" / "carbon-feed.yaml").shortened()
    report = simulate(scenario)
    shares = [c for c in report.checks if c.key == "shares"]
    assert len(shares) == 3 and all(c.met for c in shares), shares
    assert report.passed, [c for c in report.checks if not c.met]
    # Without the feed's carbon changes, green never leaves big-cpu: the middle check,
    # which the feed makes pass, fails.
    still = scenario.model_copy(
        update={"events": [e for e in scenario.events if not isinstance(e, SetCarbonEvent)]}
    )
    unmoved = [c for c in simulate(still).checks if c.key == "shares"]
    assert [c.met for c in unmoved] == [True, False, True]
    assert unmoved[1].detail.startswith("0.0%")


def test_a_live_share_check_counts_only_its_class() -> None:
    records = Records(
        streams=[Stream("m", "green", 50.0, 99.0), Stream("m", "default", 100.0, 99.0)],
        routes=["small-cpu/v", "big-cpu/v"],
        statuses=["OK"],
        send_s=np.array([1.0, 1.0, 1.0, 1.0]),
        scheduled_s=np.array([1.0, 1.0, 1.0, 1.0]),
        stream=np.array([0, 0, 1, 1]),
        latency_ms=np.array([1.0, 1.0, 1.0, 1.0]),
        status=np.array([0, 0, 0, 0]),
        route=np.array([0, 0, 1, 1]),
        cost_usd=np.zeros(4),
        answered=np.ones(4, dtype=np.bool_),
    )
    assert backend_share(records, "small-cpu", 0, 2) == 0.5
    assert backend_share(records, "small-cpu", 0, 2, "green") == 1.0
    assert backend_share(records, "small-cpu", 0, 2, "default") == 0.0
    assert backend_share(records, "small-cpu", 0, 2, "gold") is None
