"""`switchyard load` against a real gateway and real backend workers (the
scenarios' live fleet, `scenarios/fleets/three-tier.yaml`): the short forms of
price-spike, drain and backend-failure: each scenario's error limit and share checks
pass, each class's SLA verdict is the truth about its attainment, plus what every load
test must show: every request sent
was answered (successes + clean errors = sent), and the report was written."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import ADMIN_TOKEN, ROOT, SWITCHYARD, RunningGateway, start_serve, stop

STARVED_LAG_MS = 10.0
"""The load generator's p99 lateness against its own schedule (the report's `lag_p99_ms`)
past which a run's SLA attainment is the machine's, not the router's (quiet runs: 1.5-7 ms;
half the report's own MAX_LAG_P99_MS, past which it says the generator did not keep up)."""


@pytest.fixture(scope="module")
def three_tier(
    repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    workdir = tmp_path_factory.mktemp("three-tier")
    config = yaml.safe_load((ROOT / "scenarios" / "fleets" / "three-tier.yaml").read_text())
    config["repository"] = str(repository)
    config["gateway"].pop("admin_token_file")
    config["gateway"].update(
        {
            "listen": "127.0.0.1:0",
            "metrics": "127.0.0.1:0",
            "http": "127.0.0.1:0",
            "admin": "127.0.0.1:0",
            "probe_interval_s": 0.2,
        }
    )
    fleet = workdir / "fleet.yaml"
    fleet.write_text(yaml.safe_dump(config))
    gateway = start_serve(fleet, workdir)
    yield gateway
    stop(gateway)


def run_load(gateway: RunningGateway, scenario: str, report: Path, *extra: str) -> dict[str, Any]:
    process = subprocess.run(
        [
            *SWITCHYARD,
            "load",
            "--target",
            gateway.address,
            "--admin",
            str(gateway.info["admin"]),
            "--scenario",
            str(ROOT / "scenarios" / f"{scenario}.yaml"),
            "--short",
            "--json",
            "--quiet",
            "--report",
            str(report),
            *extra,
        ],
        cwd=ROOT,
        env={**os.environ, "SWITCHYARD_ADMIN_TOKEN": ADMIN_TOKEN},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert process.returncode in (0, 1), process.stdout + process.stderr
    result: dict[str, Any] = json.loads(process.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("scenario", ["price-spike", "drain", "backend-failure"])
def test_short_form_live_run_and_its_checks(
    three_tier: RunningGateway, scenario: str, tmp_path: Path
) -> None:
    out = run_load(three_tier, scenario, tmp_path)
    summary = out["summary"]
    # Every check but the SLA verdicts and price-spike's share of big-cpu during its spike
    # must pass as the scenario states it. That share is a measurement on this machine:
    # the GPU stand-in's 1.5 ms run is measured at 3-4 ms under the run's load (five
    # processes on two cores), so big-cpu at ten times its price costs about what the
    # GPU does per inference, and the rule (cheapest feasible) splits silver between
    # them (1.5-19% of the spike's answers on big-cpu over a dozen runs, 0-3.1% on the
    # machine the 5% was set on). Its verdict is held to the truth of the answers.
    measured = [
        c
        for c in out["checks"]
        if scenario == "price-spike" and c["name"].startswith("big-cpu share") and "<=" in c["name"]
    ]
    failed = [
        c
        for c in out["checks"]
        if not c["passed"] and " meets " not in c["name"] and c not in measured
    ]
    assert not failed, f"{scenario}: {failed}\nsummary: {summary}\n{three_tier.log()[-3000:]}"
    records = list(csv.DictReader((tmp_path / "requests.csv").open()))
    for check in measured:
        window, limit = check["name"].removeprefix("big-cpu share ").split(" s <= ")
        start_s, end_s = (float(edge) for edge in window.split("-"))
        inside = [
            r for r in records if r["status"] == "OK" and start_s <= float(r["send_s"]) < end_s
        ]
        share = sum(r["backend"] == "big-cpu" for r in inside) / len(inside)
        print(f"{scenario}: {check['name']}: {share:.1%}")
        said = float(check["detail"].rstrip("%"))
        assert abs(said - share * 100) < 0.1, check
        assert check["passed"] == (said <= float(limit.rstrip("%"))), check
    # Each class is held to its own SLA (p99 <= its latency), and the verdict says so
    # truthfully: met exactly when the class's percentile of requests was within it.
    sla_checks = [c for c in out["checks"] if " meets " in c["name"]]
    assert {c["name"].split(" meets ")[0] for c in sla_checks} == set(summary["attainment"])
    for check in sla_checks:
        klass = check["name"].split(" meets ")[0]
        needed = summary["sla"][klass]["percentile"] / 100
        assert check["passed"] == (summary["attainment"][klass] >= needed), check

    # Whether a 12-second run meets a p99 SLA is a measurement, not a test result
    # (BENCHMARKS' full runs are the measurement). Gold's 10 ms is at the edge of what
    # this machine allows the live fleet: the GPU tier's 1.5 ms run answers in about
    # 4 ms at its worker and 6-8 ms through the gateway with the machine idle (each hop
    # wakes an idle process), so gold's attainment swings with the machine (42-88%).
    # What the router decides is the test: gold goes to the GPU tier, the fastest, but
    # for the moments the GPU's queue makes a CPU tier the faster. Routed by price
    # alone, gold would get next to no GPU answers, as the default class (100 ms) gets
    # few. How many of gold's answers the GPU gives is itself a measure of the machine
    # (the busier it is, the longer the GPU's queue reads): 85-95% of them in runs
    # alone, 87-94% beside two busy processes, 75% in the slowest runs (gold's
    # attainment 6-10%), on a 2-core AMD Zen 3 virtual machine. So the test holds gold
    # to a majority of its answers on the GPU.
    def gpu_share(klass: str) -> float:
        rows = [r for r in records if r["sla_class"] == klass and r["status"] == "OK"]
        assert rows, f"{scenario}: no {klass} answers"
        on_gpu: int = sum(r["backend"] == "gpu" for r in rows)
        return on_gpu / len(rows)

    attainment = summary["attainment"]
    gold, default = gpu_share("gold"), gpu_share("default")
    print(
        f"{scenario}: gold {attainment['gold']:.2%} within its SLA, {gold:.1%} of its "
        f"answers from the GPU tier (default {default:.1%}); silver {attainment['silver']:.2%} "
        f"and default {attainment['default']:.2%} within theirs"
    )
    assert gold > 0.5, f"{scenario}: gold left the GPU tier ({gold:.1%} of its answers)"
    # The wider classes: in the slowest runs (every answer some 7 ms later than in a
    # quiet one, all run long) silver (30 ms) kept 63-71% within its SLA, against
    # 95-100% otherwise, and the default class (100 ms) 98.7-100%. Silver is held to a
    # majority within its SLA, the default class to within 15 points of its percentile:
    # unless the machine could not even keep the load generator on its schedule. Then
    # no class's attainment says anything of the routing (a whole-suite run's drain had
    # the GPU stand-in's 1.5 ms run answered in 27 ms at p50, silver 47% and default 76%
    # within their SLAs, with the generator's sends 18 ms late at p99, where quiet runs
    # send 1.5-7 ms late at p99), and the test says so instead.
    lag_p99_ms = summary["lag_p99_ms"]  # the report's own figure (gateway.loadtest.report)
    if lag_p99_ms > STARVED_LAG_MS:
        print(
            f"{scenario}: attainment not held: the load generator sent {lag_p99_ms:.1f} ms "
            f"behind its schedule at p99 (over {STARVED_LAG_MS:g} ms: the machine was starved)"
        )
    else:
        print(f"{scenario}: the load generator's sends {lag_p99_ms:.1f} ms late at p99")
        assert attainment["silver"] > 0.5, f"{scenario}: silver {attainment['silver']:.2%}"
        needed = summary["sla"]["default"]["percentile"] / 100
        assert attainment["default"] >= needed - 0.15, (
            f"{scenario}: default {attainment['default']:.2%}"
        )
    # No accepted request lost: every request sent got an answer or a clean error.
    assert summary["requests"] > 500
    assert summary["lost"] == 0
    assert summary["ok"] + sum(summary["errors"].values()) == summary["requests"]
    names = [c["name"] for c in out["checks"]]
    if scenario != "price-spike":  # planned drain and kill -9: not one failed request
        assert summary["errors"] == {}, summary["errors"]
    # The routing moved as the scenario says (its `shares` checks passed above).
    assert any("share" in n for n in names), names
    assert [e["ok"] for e in out["events"]] == [True, True], out["events"]
    for name in ("report.json", "report.md", "report.png", "requests.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = (tmp_path / "requests.csv").read_text().splitlines()
    assert len(rows) == summary["requests"] + 1
