"""Scenario events: one YAML key names each event's action (a discriminated union),
a file naming none or two is refused with the rule, and every consumer sees an
event through the one `apply` that calls its target's method."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import PoliciesSettings
from gateway.sim.scenario import (
    DrainEvent,
    MultiplyRate,
    ScenarioError,
    SetPriceEvent,
    UndrainEvent,
    action_of,
    parse_scenario,
)

HEAD = """
scenario: t
duration_s: 60
backends:
  - {name: a, hardware_class: cpu, price_usd_per_hour: 0.1, models: {m: {p50_ms: 1, p99_ms: 2}}}
traffic:
  - {model: m, rate_per_s: 10}
"""


def events(yaml: str) -> list[object]:
    return list(parse_scenario(HEAD + yaml, Path(".")).events)


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def set_price(self, backend: str, usd_per_hour: float) -> str:
        self.calls.append(("set_price", backend, usd_per_hour))
        return "priced"

    def kill(self, backend: str) -> str:
        self.calls.append(("kill", backend))
        return "killed"

    def restart(self, backend: str) -> str:
        self.calls.append(("restart", backend))
        return "restarted"

    def drain(self, backend: str, drained: bool) -> str:
        self.calls.append(("drain", backend, drained))
        return "drained"

    def set_policy(self, policies: PoliciesSettings) -> str:
        self.calls.append(("set_policy", policies.default.latency_ms))
        return "policies"

    def multiply_rate(self, surge: MultiplyRate) -> str:
        self.calls.append(("multiply_rate", surge.factor, surge.for_s))
        return "surge"


def test_each_action_is_its_own_event_type_applied_through_its_target() -> None:
    parsed = events("""
events:
  - {at_s: 1, set_price: {backend: a, usd_per_hour: 2.5}}
  - {at_s: 2, kill: a}
  - {at_s: 3, restart: a}
  - {at_s: 4, drain: a}
  - {at_s: 5, undrain: a}
  - {at_s: 6, multiply_rate: {factor: 3, for_s: 5}}
  - {at_s: 7, set_policy: {default: {latency_ms: 42}}}
""")
    assert isinstance(parsed[0], SetPriceEvent) and isinstance(parsed[3], DrainEvent)
    assert isinstance(parsed[4], UndrainEvent)
    assert [action_of(e) for e in parsed] == [  # type: ignore[arg-type]
        "set_price",
        "kill",
        "restart",
        "drain",
        "undrain",
        "multiply_rate",
        "set_policy",
    ]
    target = Recorder()
    labels = [e.apply(target) for e in parsed]  # type: ignore[attr-defined]
    assert labels == ["priced", "killed", "restarted", "drained", "drained", "surge", "policies"]
    assert target.calls == [
        ("set_price", "a", 2.5),
        ("kill", "a"),
        ("restart", "a"),
        ("drain", "a", True),
        ("drain", "a", False),
        ("multiply_rate", 3.0, 5.0),
        ("set_policy", 42.0),
    ]


@pytest.mark.parametrize(
    "event",
    [
        "{at_s: 1}",
        "{at_s: 1, kill: a, drain: a}",
        "{at_s: 1, explode: a}",
    ],
)
def test_an_event_with_no_action_or_two_is_refused_with_the_rule(event: str) -> None:
    with pytest.raises(ScenarioError, match="exactly one of set_price, kill, restart"):
        events(f"events:\n  - {event}\n")


def test_an_event_on_an_unknown_backend_is_refused() -> None:
    with pytest.raises(ScenarioError, match="unknown backend 'b'"):
        events("events:\n  - {at_s: 1, kill: b}\n")


def test_the_short_form_scales_event_times_and_surge_lengths() -> None:
    scenario = parse_scenario(
        HEAD
        + """
short: {duration_s: 6, rate_scale: 0.5}
events:
  - {at_s: 10, multiply_rate: {factor: 3, for_s: 20}}
  - {at_s: 30, kill: a}
""",
        Path("."),
    ).shortened()
    surge, kill = scenario.events
    assert (surge.at_s, surge.multiply_rate.for_s) == (1.0, 2.0)  # type: ignore[union-attr]
    assert kill.at_s == 3.0
