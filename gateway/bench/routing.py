"""Routing decision cost: how long `choose` takes per request with 10, 100 and
1,000 routes (target: <= 50 us with 100), next to the simple baselines, in one
process, all on the same seeded routes.

`python -m gateway.bench.routing [--out BENCHMARKS.md]` writes its section of
BENCHMARKS.md (between markers) and leaves the rest.

Imports the routing core and the report formatting only: no grpc, no protobuf.
"""

from __future__ import annotations

import argparse
import platform
import random
import time
from datetime import UTC, datetime
from pathlib import Path

from gateway.bench.report import publish
from gateway.report.markdown import markdown_table
from gateway.routing.fleet import BackendState, Route
from gateway.routing.percentiles import percentile
from gateway.routing.router import (
    Chooser,
    RoundRobin,
    RouteRequest,
    cheapest_only,
    choose,
    least_loaded,
)
from gateway.routing.sla import Policy

ROOT = Path(__file__).resolve().parents[2]
BEGIN = "<!-- routing: written by `python -m gateway.bench.routing` -->"
END = "<!-- /routing -->"


def seeded_routes(count: int, seed: int = 1) -> list[Route]:
    """`count` available routes of one model: mixed prices, slots, loads (requests in
    service and waiting, of three classes) and estimates."""
    rng = random.Random(seed)
    routes = []
    for i in range(count):
        state = BackendState(
            f"b{i}", "127.0.0.1:1", "cpu", rng.uniform(0.01, 3.0), slots=rng.choice([1, 2, 4, 8])
        )
        state.healthy = True
        state.refresh()
        route = Route(state, "m", "v", True)
        p50 = rng.uniform(0.3, 20.0)
        route.estimate.seed(p50, p50 * rng.uniform(1.1, 3.0))
        # Requests in flight sent over the last 20 ms in three classes (10, 25 and
        # 250 ms): those beyond the slots wait, in deadline order.
        for _ in range(rng.randint(0, 12)):
            sent_s = -rng.uniform(0.0, 0.02)
            budget_ms = rng.choice([10.0, 25.0, 250.0])
            state.admit(route, route.estimate.mean_ms, sent_s + budget_ms / 1000, sent_s, budget_ms)
        routes.append(route)
    return routes


def per_call_us(chooser: Chooser, routes: list[Route], calls: int) -> float:
    """Median of 5 timed loops of `calls` decisions, microseconds per decision."""
    request = RouteRequest("m")
    policy = Policy(latency_ms=25.0)
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            chooser(request, routes, policy, 0.0)
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return percentile(samples, 50.0)


def run(args: argparse.Namespace) -> int:
    choosers: list[tuple[str, Chooser]] = [
        ("switchyard (choose)", choose),
        ("least-loaded", least_loaded),
        ("cheapest-only", cheapest_only),
        ("round-robin", RoundRobin()),
    ]
    sizes = (10, 100, 1000)
    rows = []
    for name, chooser in choosers:
        cells = []
        for size in sizes:
            routes = seeded_routes(size)
            calls = max(200, 200_000 // size)
            cells.append(per_call_us(chooser, routes, calls))
        rows.append((name, cells))
    hundred = rows[0][1][1]
    lines = [
        "## Routing decision cost",
        "",
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; Python {platform.python_version()}, "
        "one process, the machine shared with whatever else runs.",
        "- Command: `python -m gateway.bench.routing` (part of `make bench`).",
        "- Each cell: microseconds per decision, median of 5 loops, seeded routes of one "
        "model (mixed prices, slots, estimates; 0-12 requests in flight on each, of three "
        "classes (10, 25 and 250 ms), in service and waiting; all available), SLA 25 ms. "
        "About 3 routes in 4 have every slot busy, so their predicted wait is worked out "
        "from the backend's deadline queue.",
        "",
        markdown_table(
            ("chooser", *(f"{n} routes" for n in sizes)),
            [(name, *(f"{c:.1f}" for c in cells)) for name, cells in rows],
        ),
    ]
    status = "met" if hundred <= 50.0 else "NOT met"
    lines += ["", f"Target: <= 50 us per decision with 100 routes: {hundred:.1f} us, {status}.", ""]
    body = "\n".join(lines)
    publish(body, args.out, BEGIN, END)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="BENCHMARKS.md to update")
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
