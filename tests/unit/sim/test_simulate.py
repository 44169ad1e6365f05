"""`switchyard simulate`: every shipped scenario's short form against its own
thresholds, the JSON shape, determinism under the seed, the lower bound, and
the simulator's mechanics on small inline scenarios. Speed is measured
(BENCHMARKS.md), never asserted."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from gateway.cli import main
from gateway.sim.arrivals import make_trace
from gateway.sim.scenario import Scenario, ScenarioError, load_scenario, parse_scenario
from gateway.sim.simulate import POLICIES, Report, simulate
from tests import ROOT

SCENARIOS = ROOT / "scenarios"
NAMES = (
    "steady",
    "price-spike",
    "backend-failure",
    "surge",
    "sla-mix",
    "drain",
    "spot-feed",
    "carbon-feed",
)


@functools.cache
def scenario(name: str) -> Scenario:
    return load_scenario(SCENARIOS / f"{name}.yaml")


@functools.cache
def short_report(name: str) -> Report:
    return simulate(scenario(name).shortened())


def test_every_shipped_scenario_is_tested() -> None:
    assert sorted(p.stem for p in SCENARIOS.glob("*.yaml")) == sorted(NAMES)
    for name in NAMES:
        assert scenario(name).scenario == name
        assert scenario(name).short is not None


def _cases() -> list[object]:
    cases: list[object] = []
    for name in NAMES:
        t = scenario(name).thresholds
        keys = ["attainment"]
        if t.max_cost_vs_lower_bound is not None:
            keys.append("cost_vs_bound")
        if t.min_saving_vs_fastest_only is not None:
            keys.append("saving_vs_fastest")
        if t.cheapest_only_must_miss:
            keys.append("cheapest_misses")
        for key in keys:
            cases.append(pytest.param(name, key, id=f"{name}-{key}"))
    return cases


@pytest.mark.parametrize(("name", "key"), _cases())
def test_scenario_meets_its_thresholds(name: str, key: str) -> None:
    report = short_report(name)
    checks = {c.key: c for c in report.checks}
    assert checks[key].met, f"{checks[key].name}: {checks[key].detail}"


@pytest.mark.parametrize("name", NAMES)
def test_lower_bound_is_below_every_policy_that_meets_the_sla(name: str) -> None:
    report = short_report(name)
    bound = report.bound.cost_usd_per_1m
    target = scenario(name).thresholds.attainment_min
    meeting = [
        policy
        for policy, result in report.results.items()
        if min(result.attainment.values()) >= target
    ]
    assert "fastest-only" in meeting
    for policy in meeting:
        # Costs are summed over drawn service times, the bound uses their means:
        # allow the sampling noise of a short run.
        assert bound <= report.results[policy].cost_usd_per_1m * 1.01, policy
    assert report.bound.relaxed_segments == 0


def test_json_shape_and_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(
        ["simulate", "--scenario", str(SCENARIOS / "price-spike.yaml"), "--json", "--short"]
    )
    out = json.loads(capsys.readouterr().out)
    assert status == 0
    assert set(out) == {
        "scenario",
        "requests",
        "wall_s",
        "lower_bound_cost_usd_per_1m",
        "infeasible_classes",
        "policies",
    }
    assert out["scenario"] == "price-spike"
    assert out["requests"] > 1000 and out["wall_s"] > 0
    assert out["infeasible_classes"] == []
    assert set(out["policies"]) == set(POLICIES)
    for result in out["policies"].values():
        assert set(result) == {"attainment", "cost_usd_per_1m", "p99_ms"}
        assert set(result["attainment"]) == {"gold", "silver", "default"}
        assert all(0.0 <= v <= 1.0 for v in result["attainment"].values())
        assert all(v > 0 for v in result["p99_ms"].values())


def test_missed_threshold_exits_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # sla-mix asking for 99% less cost than fastest-only: no router meets that.
    text = (SCENARIOS / "sla-mix.yaml").read_text()
    assert "max_cost_vs_lower_bound: 1.10\n" in text
    path = tmp_path / "sla-mix-impossible.yaml"
    path.write_text(
        text.replace(
            "max_cost_vs_lower_bound: 1.10\n",
            "max_cost_vs_lower_bound: 1.10\n  min_saving_vs_fastest_only: 0.99\n",
        )
    )
    status = main(["simulate", "--scenario", str(path), "--short"])
    out = capsys.readouterr().out
    assert "lower bound" in out and "switchyard" in out
    assert status == 1 and "FAIL  saving vs fastest-only >= 99%" in out
    assert main(["simulate", "--scenario", str(SCENARIOS / "sla-mix.yaml"), "--short"]) == 0


def test_runs_are_deterministic_under_the_seed() -> None:
    short = scenario("backend-failure").shortened()
    first, second = simulate(short).to_json(), simulate(short).to_json()
    first.pop("wall_s")
    second.pop("wall_s")
    assert first == second
    reseeded = simulate(short.model_copy(update={"seed": 2})).to_json()
    assert reseeded["policies"] != first["policies"]


# ---- mechanics, on small inline scenarios -------------------------------------------

BASE = """
scenario: inline
duration_s: 20
seed: 3
backends:
  - {name: slow, price_usd_per_hour: 0.04, slots: 1, models: {m: {p50_ms: 5, p99_ms: 8}}}
  - {name: fast, price_usd_per_hour: 1.00, slots: 2, models: {m: {p50_ms: 1, p99_ms: 2}}}
policies:
  default: {latency_ms: 50}
  classes: {tight: {latency_ms: 4}, impossible: {latency_ms: 0.5}}
"""


def inline(extra: str) -> Scenario:
    return parse_scenario(BASE + extra, SCENARIOS)


def test_infeasible_class_is_listed_and_left_out_of_attainment() -> None:
    report = simulate(
        inline("""
traffic:
  - {model: m, rate_per_s: 50}
  - {model: m, sla_class: tight, rate_per_s: 20}
  - {model: m, sla_class: impossible, rate_per_s: 10}
""")
    )
    assert report.bound.infeasible_classes == ["impossible"]
    for result in report.results.values():
        assert set(result.attainment) == {"default", "tight"}
        assert "impossible" in result.p99_ms
    ours = report.results["switchyard"]
    assert ours.attainment["tight"] >= 0.99  # tight fits only the fast backend
    assert report.bound.cost_usd_per_1m <= ours.cost_usd_per_1m


def test_killed_backend_fails_its_requests_over_to_the_next_route() -> None:
    report = simulate(
        inline("""
traffic:
  - {model: m, rate_per_s: 150}
events:
  - {at_s: 5, kill: slow}
  - {at_s: 10, restart: slow}
""")
    )
    ours = report.results["switchyard"]
    assert ours.retried > 0 and ours.failed == 0
    assert min(ours.attainment.values()) >= 0.99


def test_constant_arrivals_and_a_surge_shape_the_trace() -> None:
    trace = make_trace(
        inline("""
traffic:
  - {model: m, rate_per_s: 100, arrivals: constant}
events:
  - {at_s: 10, multiply_rate: {factor: 3, for_s: 5}}
""")
    )
    assert len(trace) == 100 * 15 + 300 * 5
    assert np.count_nonzero((trace.times >= 10) & (trace.times < 15)) == 1500
    assert np.all(np.diff(trace.times) >= 0)


def test_bursts_and_poisson_rates() -> None:
    trace = make_trace(
        inline("""
traffic:
  - {model: m, rate_per_s: 200, arrivals: poisson}
  - {model: m, rate_per_s: 100, arrivals: bursts, burst_every_s: 10, burst_for_s: 2, burst_factor: 5}
""")
    )
    poisson = np.count_nonzero(trace.streams == 0)
    assert abs(poisson - 4000) < 4 * 4000**0.5
    in_burst = trace.times[(trace.streams == 1) & (trace.times >= 5) & (trace.times < 7)]
    outside = trace.times[(trace.streams == 1) & (trace.times >= 0) & (trace.times < 5)]
    assert len(in_burst) / 2 > 3 * len(outside) / 5


def test_short_form_scales_time_and_rates() -> None:
    full = scenario("price-spike")
    short = full.shortened()
    assert full.short is not None
    assert short.duration_s == full.short.duration_s
    scale = full.short.duration_s / full.duration_s
    assert [e.at_s for e in short.events] == [e.at_s * scale for e in full.events]
    assert short.traffic[0].rate_per_s == full.traffic[0].rate_per_s * full.short.rate_scale


@pytest.mark.parametrize(
    "extra",
    [
        "traffic: [{model: m, rate_per_s: 1, colour: red}]",
        "traffic: [{model: nope, rate_per_s: 1}]",
        "traffic: [{model: m, sla_class: platinum, rate_per_s: 1}]",
        "traffic: [{model: m, rate_per_s: 1}]\nevents: [{at_s: 1, kill: slow, drain: fast}]",
        "traffic: [{model: m, rate_per_s: 1}]\nevents: [{at_s: 1, kill: nowhere}]",
        "traffic: [{model: m, arrivals: trace}]",
    ],
)
def test_invalid_scenarios_are_errors(extra: str) -> None:
    with pytest.raises(ScenarioError):
        inline(extra)
