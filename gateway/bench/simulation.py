"""The simulation section of BENCHMARKS.md: every shipped scenario's full form under
`switchyard simulate`, over several seeds (arrivals and service times drawn again):
the router's cost against the offline lower bound and against fastest-only, its worst
class's attainment, and how fast the simulator runs.

`python -m gateway.bench.simulation [--seeds 1 2 3 4] [--out BENCHMARKS.md]` writes its
section (between markers) and leaves the rest. Each row is what
`switchyard simulate --scenario scenarios/NAME.yaml --seed N --json` prints.

Imports the simulator and the report formatting: no grpc, no generated protobuf.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from gateway.bench.report import publish
from gateway.report.markdown import markdown_table
from gateway.sim.scenario import load_scenario
from gateway.sim.simulate import POLICIES, Report, simulate

ROOT = Path(__file__).resolve().parents[2]
BEGIN = "<!-- simulation: written by `python -m gateway.bench.simulation` -->"
END = "<!-- /simulation -->"
SCENARIOS = ("steady", "price-spike", "backend-failure", "surge", "sla-mix", "drain")


def row(name: str, seed: int, report: Report) -> list[str]:
    ours = report.results["switchyard"]
    bound = report.bound.cost_usd_per_1m
    fastest = report.results["fastest-only"].cost_usd_per_1m
    worst = min(ours.attainment.items(), key=lambda kv: kv[1], default=("-", float("nan")))
    rate = report.requests * len(report.results) / report.wall_s if report.wall_s > 0 else 0.0
    checks = (
        "pass" if report.passed else "FAIL: " + ", ".join(c.key for c in report.checks if not c.met)
    )
    return [
        name,
        str(seed),
        f"{report.requests:,}",
        f"{ours.cost_usd_per_1m:.4f}",
        f"{ours.cost_usd_per_1m / bound:.3f}x" if bound else "-",
        f"{1.0 - ours.cost_usd_per_1m / fastest:.1%}" if fastest else "-",
        f"{worst[0]} {worst[1]:.2%}",
        f"{rate:,.0f}",
        checks,
    ]


def section(seeds: Sequence[int], scenarios: Sequence[str]) -> str:
    started = time.perf_counter()
    rows = []
    for name in scenarios:
        scenario = load_scenario(ROOT / "scenarios" / f"{name}.yaml")
        for seed in seeds:
            report = simulate(scenario.model_copy(update={"seed": seed}))
            rows.append(row(name, seed, report))
    took_s = time.perf_counter() - started
    seed_args = " ".join(str(s) for s in seeds)
    lines = [
        "## Simulation",
        "",
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC (run took {took_s:.0f} s); Python "
        f"{platform.python_version()}, one process, the machine shared with whatever else runs.",
        f"- Command: `python -m gateway.bench.simulation --seeds {seed_args}` (part of "
        "`make bench`); each row is `switchyard simulate --scenario scenarios/NAME.yaml "
        "--seed N --json`.",
        f"- Each run: the scenario's full form, the router and the {len(POLICIES) - 1} "
        "baselines over the same trace, and the offline lower bound (see "
        "docs/design-notes.md). Cost: USD per 1M inferences answered; against the bound and "
        "the saving against fastest-only; the worst class's SLA attainment (share of its "
        "requests within its SLA latency); simulated requests/s = requests x "
        f"{len(POLICIES)} runs / wall time (trace, bound and runs included); the scenario's "
        "own thresholds.",
        "",
        markdown_table(
            [
                "scenario",
                "seed",
                "requests",
                "$/1M",
                "vs bound",
                "saving vs fastest-only",
                "worst class",
                "simulated req/s",
                "thresholds",
            ],
            rows,
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.bench.simulation", description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    parser.add_argument("--out", type=Path, default=None, help="BENCHMARKS.md to update")
    args = parser.parse_args(argv)
    body = section(args.seeds, args.scenarios)
    publish(body, args.out, BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
