"""`switchyard serve --processes N` against one process, and what it bounds on a machine
with a core for each process.

For N = 1 and 2 in turn (rounds taking turns), the gateway serves the tiny model over
REST from one launched worker (one ONNX Runtime thread), and the bench's closed-loop load
generator (gateway.bench.rest, its own process) sends batch-1 requests on 16 keep-alive
connections. Measured per round: throughput, and each gateway process's CPU time per
request answered (user + system).

On this machine the processes share two cores with the worker and the load generator,
so a second process has no core of its own and its throughput says little. The bound for
a machine with the cores: the kernel spreads connections, not requests, over the
processes (SO_REUSEPORT), so a process's share of the work is its share of the gateway
CPU; each process tops out at one core, so N processes serve at most
1 / (the busiest process's CPU per request of the whole) requests a second, against one
process's 1 / (its CPU per request). Their ratio is the scaling a machine with the cores
would give, were nothing else (the worker, the clients) the bottleneck.

That bound still holds the contention of this machine: the two processes take turns at
the cores with each other, the worker and the load generator, which raises the CPU each
spends per request. So a third kind of round models the group without that: one process
alone on half the connections, the share each of two processes serves. The processes of
a group share nothing on a request's way (each has its own connections, event loop, calls
to the worker and coalescer), so with a core each, two such processes serve
2 / (its CPU per request) a second.

    python -m gateway.bench.processes --out BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.bench.harness import BenchError, Child, serve_command
from gateway.bench.report import publish
from gateway.bench.rest import fleet_yaml, infer_request_files, load_sample
from gateway.report.markdown import markdown_table

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120.0
BEGIN = "<!-- processes: written by `python -m gateway.bench.processes` -->"
END = "<!-- /processes -->"
TARGET = 1.6


@dataclass(frozen=True)
class Round:
    """One load on `processes` gateway processes."""

    processes: int
    connections: int
    throughput_per_s: float
    latency_p50_ms: float
    gateway_cpu_us: list[float]
    """Each gateway process's CPU time per request answered (by all of them)."""
    worker_cpu_us: float

    @property
    def busiest_share(self) -> float:
        total = sum(self.gateway_cpu_us)
        return max(self.gateway_cpu_us) / total if total else 1.0

    @property
    def bound_per_s(self) -> float:
        """Requests a second with a core for each process: the busiest process at one
        core's worth of CPU."""
        busiest = max(self.gateway_cpu_us)
        return 1e6 / busiest if busiest else 0.0


def half_of(connections: int) -> int:
    """The connections each of two processes serves: the model's one-process rounds."""
    return max(1, connections // 2)


@contextlib.contextmanager
def group(
    repository: Path, model: str, count: int, work: Path, load_reports: bool = True
) -> Iterator[tuple[dict[str, Any], dict[str, int]]]:
    """`switchyard serve --processes count` (`gateway.load_reports` as given): its ready
    file's description, and the pids of its gateway processes (gateway-I) and of its
    worker (worker)."""
    fleet = work / "fleet.yaml"
    text = fleet_yaml(repository, model, http=True)
    if not load_reports:
        text = text.replace("gateway:\n", "gateway:\n  load_reports: false\n", 1)
    fleet.write_text(text)
    ready = work / f"ready-{count}.json"
    ready.unlink(missing_ok=True)
    command = serve_command(fleet, ready, "--log-level", "WARNING")
    if count > 1:
        command += ["--processes", str(count)]
    env = {**os.environ, "SWITCHYARD_ADMIN_TOKEN": "bench"}
    with Child(f"serve-{count}", command, work, ROOT, env) as child:
        described = child.wait_ready_file(ready, STARTUP_TIMEOUT_S)
        if not described.get("http_port"):
            raise BenchError("the gateway's ready file names no REST port")
        if count > 1:
            members = described.get("processes", [])
            running = [int(m["pid"]) for m in members if m.get("pid")]
            pids = {f"gateway-{i}": pid for i, pid in enumerate(running)}
            if len(pids) != count:
                raise BenchError(f"the ready file names {len(pids)} of {count} processes")
        else:
            pids = {"gateway-0": child.process.pid}
        worker = described.get("pids", {}).get("cpu")
        if worker is not None:
            pids["worker"] = int(worker)
        yield described, pids


def measure(args: argparse.Namespace, work: Path) -> list[Round]:
    repository = args.repository.resolve()
    body_file, headers, path = infer_request_files(repository, args.model, args.variant, work)
    rounds: list[Round] = []
    full = args.concurrency
    order = [(2, full), (1, full), (1, half_of(full))] * args.rounds
    for index, (count, connections) in enumerate(order):
        with group(repository, args.model, count, work, args.load_reports) as (
            described,
            pids,
        ):
            address = f"127.0.0.1:{described['http_port']}"
            load_args = argparse.Namespace(**{**vars(args), "concurrency": connections})
            sample = load_sample(
                load_args, address, path, body_file, headers, pids, work, f"load-{index}"
            )
        cpu = sample.cpu_us_per_request
        rounds.append(
            Round(
                count,
                connections,
                sample.throughput_per_s,
                sample.latency_p50_ms,
                [cpu[f"gateway-{i}"] for i in range(count)],
                cpu.get("worker", float("nan")),
            )
        )
        print(json.dumps(rounds[-1].__dict__), flush=True)
    return rounds


def section(args: argparse.Namespace, rounds: Sequence[Round], took_s: float) -> str:
    rows = []
    for r in rounds:
        rows.append(
            [
                str(r.processes),
                str(r.connections),
                f"{r.throughput_per_s:,.0f}",
                f"{r.latency_p50_ms:.1f}",
                " / ".join(f"{us:,.0f}" for us in r.gateway_cpu_us),
                f"{sum(r.gateway_cpu_us):,.0f}",
                f"{r.busiest_share:.0%}",
                f"{r.bound_per_s:,.0f}",
            ]
        )
    full = args.concurrency
    one = [r for r in rounds if r.processes == 1 and r.connections == full]
    two = [r for r in rounds if r.processes == 2]
    halves = [r for r in rounds if r.processes == 1 and r.connections < full]
    one_cpu = statistics.median(r.gateway_cpu_us[0] for r in one)
    half_cpu = statistics.median(r.gateway_cpu_us[0] for r in halves)
    modeled = 2 * one_cpu / half_cpu if half_cpu else 0.0
    modeled_status = "met" if modeled >= TARGET else "NOT met"
    measured = statistics.median(r.throughput_per_s for r in two) / statistics.median(
        r.throughput_per_s for r in one
    )
    bound = statistics.median(r.bound_per_s for r in two) / statistics.median(
        r.bound_per_s for r in one
    )
    status = "met" if bound >= TARGET else "NOT met"
    command = "python -m gateway.bench.processes --out BENCHMARKS.md"
    return "\n".join(
        [
            "## Several gateway processes (`switchyard serve --processes N`)",
            "",
            f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC (run took {took_s:.0f} s); "
            f"Python {platform.python_version()}; {os.cpu_count()} CPUs, which the gateway "
            "processes, their launched worker (one ONNX Runtime thread) and the load "
            "generator share.",
            f"- Command: `{command}`.",
            f"- `{args.model}` ({args.variant}) over REST, batch 1 in the binary tensor "
            f"extension, {args.concurrency} keep-alive connections, closed loop, "
            f"{args.warmup_s:g} s warm-up, {args.duration_s:g} s window; load reports "
            f"{'on' if args.load_reports else 'off'}; rounds take turns "
            f"(2 processes on {full} connections, 1 on {full}, 1 on {half_of(full)}, and again). "
            "CPU per request: each gateway process's user + system time "
            "over the window, per request answered by all of them.",
            "- With a core for each process (the bound): the kernel spreads connections, not "
            "requests, over the processes, and each tops out at one core, so N processes "
            "serve at most 1 / (the busiest process's CPU per request) a second.",
            f"- Modeled: one process alone on {half_of(full)} connections, the share each of two "
            "serves (a group's processes share nothing on a request's way), so two with a core "
            "each serve 2 / (its CPU per request) a second, against one process's 1 / (its CPU "
            f"per request on {full}). The bound above still holds the two processes' contention "
            "for these cores with each other; the model leaves it out, and like the one-process "
            "rounds keeps the worker's and the load generator's.",
            "",
            markdown_table(
                (
                    "processes",
                    "connections",
                    "inferences/s here",
                    "p50 ms",
                    "CPU us per request, each process",
                    "gateway CPU us per request",
                    "busiest process's share",
                    "bound with a core each (/s)",
                ),
                rows,
            ),
            "",
            f"Two processes / one, measured here: {measured:.2f}x (no core to spare: not the "
            f"question). With a core for each process, by the bound: {bound:.2f}x (target "
            f">= {TARGET:g}x: {status}), were the worker and the clients not the bottleneck. "
            "Modeled, two processes with a core each, each as one process alone on half the "
            f"connections: 2 x {one_cpu:,.0f} / {half_cpu:,.0f} us = {modeled:.2f}x (target "
            f">= {TARGET:g}x: {modeled_status}), on the same condition.",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.bench.processes",
        description="serve --processes 2 against one process, and its bound with the cores",
    )
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--variant", default="ort-cpu-fp32")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--duration-s", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each count")
    parser.add_argument(
        "--no-load-reports",
        dest="load_reports",
        action="store_false",
        help="gateway.load_reports: false (a group's processes then see the worker as "
        "their own, and merge requests for it)",
    )
    parser.add_argument("--out", type=Path, default=None, help="BENCHMARKS.md to write")
    args = parser.parse_args(argv)
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="switchyard-processes-") as folder:
        rounds = measure(args, Path(folder))
    took_s = (datetime.now(UTC) - started).total_seconds()
    publish(section(args, rounds, took_s), args.out, BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
