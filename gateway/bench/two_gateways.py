"""Two gateways against one: the price-spike scenario's live fleet played through one
gateway, then through two sharing their control state over a private redis-server,
the load split between them; cost per 1M and SLA attainment per class side by side.

Target: two gateways cost within 5% of one gateway's per 1M inferences, at equal SLA
attainment per class (each class's share of requests answered within its SLA).

    python -m gateway.bench.two_gateways [--scenario FILE] [--full] [--rate-scale F]
        [--out BENCHMARKS.md]

The fleet is the scenario's `live.fleet` (as `make demo` plays it: three local workers
standing for the modelled small CPU, big CPU and GPU). The workers are started here, as
the fleet's `launch` says but in plaintext (a gateway's launched workers take only its
own mTLS), and both gateways are given their addresses. Both keep their control state
in one redis-server of their own (RedisServer, on a Unix socket), so the scenario's
prices and policies, set through the first gateway's admin API, are in force on both.
Then `switchyard load` plays the scenario (its short form unless --full) twice with the
same seed: against the first gateway alone, then against both, each taking every other
request (`--target` twice). The second gateway starts only after the first run: even
idle, its latency probes name it to the workers, so the first gateway would see its
workers shared with another gateway (and ask them to refuse what they would answer late)
in the run that stands for one gateway alone.

Cost per 1M is given twice. As the gateways say it: each answer's `switchyard_cost_usd`,
the price times the route's estimated mean service time, so a gateway whose estimates
hold waits behind the other gateway's requests says its answers cost more. And at the
backends' busy time: each OK answer's backend at the price it had when the request was
sent (the scenario's price events), times that worker's mean execution time per
inference over the run, as its statistics API (ModelStatistics, as Triton's) counts
it, shared by its slots. The target is judged on the second: what the backends spent.

Writes its section of BENCHMARKS.md (between markers) with --out. Runs the gateways,
workers and load generator as processes; reads the workers' statistics over gRPC.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import platform
import secrets
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.bench.harness import BenchError, Child, serve_command, switchyard_command
from gateway.bench.load import LoadRun, run_load
from gateway.bench.report import publish
from gateway.config import load_fleet
from gateway.control.redis_server import RedisServer
from gateway.control.supervisor import worker_command
from gateway.report.markdown import markdown_table
from gateway.routing.figures import usd_per_busy_ms
from gateway.serving.transport import REFUSED_LATE
from gateway.sim.scenario import Scenario, SetPriceEvent, load_scenario
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
BEGIN = "<!-- two-gateways: written by `python -m gateway.bench.two_gateways` -->"
END = "<!-- /two-gateways -->"
START_TIMEOUT_S = 120.0
LOAD_TIMEOUT_S = 300.0
TARGET_COST_RATIO = 1.05


def fleet_file(fleet_path: Path, state_url: str, workers: dict[str, str], path: Path) -> Path:
    """The live fleet file for one of the gateways, written at `path`: every port picked
    by the system, the shared store, the admin token from the environment, and the
    backends at the running workers' addresses (name -> address), not launched."""
    raw = yaml.safe_load(fleet_path.read_text())
    repository = raw.get("repository")
    if repository is not None:
        raw["repository"] = str((fleet_path.parent / repository).resolve())
    gateway = raw.setdefault("gateway", {})
    for key in ("listen", "metrics", "admin"):
        gateway[key] = "127.0.0.1:0"
    gateway["http"] = None
    gateway.pop("admin_token_file", None)
    gateway["state"] = state_url
    for backend in raw["backends"]:
        backend.pop("launch", None)
        backend["address"] = workers[backend["name"]]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def summary(run: LoadRun) -> dict[str, Any]:
    out: dict[str, Any] = run.result["summary"]
    return out


def worker_counts(addresses: dict[str, str]) -> dict[str, tuple[int, int]]:
    """Per worker (name -> address): (inferences, execution ns) so far, from its
    statistics API, over all its models."""
    out = {}
    for name, address in addresses.items():
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stats = stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=10.0)
        count = sum(m.inference_count for m in stats.model_stats)
        ns = sum(m.inference_stats.compute_infer.ns for m in stats.model_stats)
        out[name] = (count, ns)
    return out


def gateway_counts(metrics_ports: Sequence[int]) -> tuple[float, float]:
    """Late refusals and retries so far, summed over the gateways whose /metrics are on
    `metrics_ports` (127.0.0.1)."""
    refused = retries = 0.0
    for port in metrics_ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "switchyard_backend_attempts_total":
                    if sample.labels.get("outcome") == REFUSED_LATE:
                        refused += sample.value
                elif sample.name == "switchyard_decisions_total":
                    if sample.labels.get("reason") == "retry":
                        retries += sample.value
    return refused, retries


def busy_ms(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> dict[str, float]:
    """Per worker: its mean execution time per inference (ms) between two readings."""
    out = {}
    for name, (count, ns) in after.items():
        count0, ns0 = before.get(name, (0, 0))
        if count > count0:
            out[name] = (ns - ns0) / (count - count0) / 1e6
    return out


def busy_cost_per_1m(
    records: Path,
    scenario: Scenario,
    prices: dict[str, float],
    slots: dict[str, int],
    busy: dict[str, float],
) -> float:
    """USD per 1M OK answers at the backends' busy time: each answer's backend at its
    price when the request was due (`prices` as the fleet starts, then the scenario's
    price events), times that backend's mean execution time (`busy`, ms) shared by its
    `slots`. NaN when no answer was OK."""
    changes = sorted(
        (e.at_s, e.set_price.backend, e.set_price.usd_per_hour)
        for e in scenario.events
        if isinstance(e, SetPriceEvent)
    )
    total, ok = 0.0, 0
    with records.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["status"] != "OK" or row["backend"] not in busy:
                continue
            backend, at_s = row["backend"], float(row["scheduled_s"])
            price = prices[backend]
            for change_s, name, usd_per_hour in changes:
                if change_s > at_s:
                    break
                if name == backend:
                    price = usd_per_hour
            total += usd_per_busy_ms(price, slots[backend]) * busy[backend]
            ok += 1
    return total / ok * 1e6 if ok else math.nan


def rows(one_run: Measured, two_run: Measured) -> list[list[str]]:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.2%}"

    one, two = summary(one_run.run), summary(two_run.run)
    out = []
    for label, cost_one, cost_two in (
        (
            "cost per 1M at the backends' busy time (USD)",
            one_run.busy_cost_usd_per_1m,
            two_run.busy_cost_usd_per_1m,
        ),
        (
            "cost per 1M where the traffic went, at one gateway's busy times (USD)",
            one_run.routed_cost_usd_per_1m,
            two_run.routed_cost_usd_per_1m,
        ),
        ("cost per 1M as the gateways say (USD)", one["cost_usd_per_1m"], two["cost_usd_per_1m"]),
    ):
        out.append(
            [
                label,
                f"{cost_one:.4f}",
                f"{cost_two:.4f}",
                f"{cost_two / cost_one:.3f}x" if cost_one else "-",
            ]
        )
    for backend in sorted(one_run.busy_ms):
        share_one = one["shares"]
        share_two = two["shares"]
        a = sum(v for k, v in share_one.items() if k.split("/")[0] == backend)
        b = sum(v for k, v in share_two.items() if k.split("/")[0] == backend)
        out.append(
            [f"share of answers: {backend}", f"{a:.1%}", f"{b:.1%}", f"{(b - a) * 100:+.1f} pt"]
        )
    for backend in sorted(one_run.busy_ms):
        a_ms, b_ms = one_run.busy_ms[backend], two_run.busy_ms.get(backend)
        out.append(
            [
                f"mean execution per inference: {backend} (ms)",
                f"{a_ms:.3f}",
                "-" if b_ms is None else f"{b_ms:.3f}",
                "-" if b_ms is None else f"{b_ms / a_ms:.3f}x",
            ]
        )
    for name in sorted(set(one["attainment"]) | set(two["attainment"])):
        a, b = one["attainment"].get(name), two["attainment"].get(name)
        diff = f"{(b - a) * 100:+.2f} pt" if a is not None and b is not None else "-"
        sla = one["sla"].get(name) or two["sla"].get(name)
        target = f" (p{sla['percentile']:g} <= {sla['latency_ms']:g} ms)" if sla else ""
        out.append([f"{name}{target}: SLA met", pct(a), pct(b), diff])
    for key, label in (("answered", "answered"), ("ok", "OK")):
        out.append([label, f"{one[key]:,}", f"{two[key]:,}", ""])
    out.append(
        [
            "attempts refused late by a worker, as asked",
            f"{one_run.refused_late:,.0f}",
            f"{two_run.refused_late:,.0f}",
            "",
        ]
    )
    out.append(["retries", f"{one_run.retries:,.0f}", f"{two_run.retries:,.0f}", ""])

    def errors(s: dict[str, Any]) -> str:
        return ", ".join(f"{code} {n:,}" for code, n in sorted(s["errors"].items())) or "none"

    out.append(["errors", errors(one), errors(two), ""])
    out.append(
        [
            "sent / asked per s",
            f"{one['sent_rate_per_s']:.1f} / {one['asked_rate_per_s']:.1f}",
            f"{two['sent_rate_per_s']:.1f} / {two['asked_rate_per_s']:.1f}",
            "",
        ]
    )
    return out


class Gateways:
    """The store, the workers and the gateways of `two_gateways`: the first gateway runs
    from the start, the second once `start_second` is called."""

    def __init__(
        self,
        fleet_path: Path,
        work: Path,
        env: dict[str, str],
        store: RedisServer,
        stack: contextlib.ExitStack,
        addresses: dict[str, str],
    ) -> None:
        self.fleet_path, self.work, self.env = fleet_path, work, env
        self.store, self.stack, self.addresses = store, stack, addresses
        self.first = self._start("first")

    def start_second(self) -> dict[str, Any]:
        return self._start("second")

    def _start(self, name: str) -> dict[str, Any]:
        """Starts gateway `name`; its ready file's contents once it routes to every worker."""
        config = fleet_file(
            self.fleet_path, self.store.url, self.addresses, self.work / f"{name}.yaml"
        )
        ready_file = self.work / f"{name}.json"
        command = serve_command(config, ready_file)
        gateway = self.stack.enter_context(Child(name, command, self.work, ROOT, self.env))
        info: dict[str, Any] = gateway.wait_ready_file(ready_file, START_TIMEOUT_S)
        routes_ready(info["admin"], list(self.addresses), self.env, START_TIMEOUT_S)
        return info


@contextlib.contextmanager
def two_gateways(fleet_path: Path, work: Path, env: dict[str, str]) -> Iterator[Gateways]:
    """A redis-server, the fleet's workers (plaintext, started here as the fleet's
    `launch` says) and the first gateway on them over that store, ready to route to every
    worker; the second gateway when asked (`Gateways.start_second`)."""
    executable = RedisServer.find()
    if executable is None:
        raise BenchError("redis-server not found (apt-get install redis-server)")
    fleet = load_fleet(fleet_path)
    store = RedisServer(work, executable)
    store.start()
    try:
        with contextlib.ExitStack() as stack:
            workers = {}
            for backend in fleet.backends:
                if backend.launch is None:
                    raise BenchError(f"{fleet_path}: backend {backend.name} is not launched")
                command = worker_command(backend, fleet.repository, "127.0.0.1:0")
                child = stack.enter_context(Child(backend.name, command, work, ROOT, env))
                workers[backend.name] = child
            addresses = {
                name: child.wait_listening(START_TIMEOUT_S) for name, child in workers.items()
            }
            yield Gateways(fleet_path, work, env, store, stack, addresses)
    finally:
        store.stop()


def routes_ready(admin: str, backends: list[str], env: dict[str, str], timeout_s: float) -> None:
    """Waits until every route of `backends` is ready at the gateway whose admin API is
    at `admin` (`switchyard admin routes --json`)."""
    command = [*switchyard_command(), "admin", "--target", admin, "--json", "routes"]
    deadline = time.monotonic() + timeout_s
    waiting = backends
    while time.monotonic() < deadline:
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        with contextlib.suppress(ValueError):
            routes = json.loads(done.stdout).get("routes", [])
            ready = {r["backend"] for r in routes if r["status"] == "ready"}
            waiting = [b for b in backends if b not in ready]
            if not waiting:
                return
        time.sleep(0.5)
    raise BenchError(f"routes to {', '.join(waiting)} not ready at {admin}")


@dataclass(frozen=True)
class Measured:
    """One load run and its cost per 1M at the backends' busy time."""

    run: LoadRun
    busy_cost_usd_per_1m: float
    busy_ms: dict[str, float]
    """Each worker's mean execution time per inference over the run."""
    records: Path
    """The run's per-request records (the load report's requests.csv)."""
    refused_late: float = 0.0
    """Attempts the workers refused as the gateways asked (`REFUSED_LATE`), both gateways."""
    retries: float = 0.0
    """Retries the gateways sent (`switchyard_decisions_total{reason="retry"}`)."""
    routed_cost_usd_per_1m: float = math.nan
    """Cost per 1M at the one-gateway run's busy times: where this run's traffic went,
    priced alike in both runs (the machine's contention, which slows the workers more
    with two gateway processes on its cores, left out)."""


def measure(
    scenario_path: Path, full: bool, work: Path, rate_scale: float = 1.0
) -> tuple[Measured, Measured]:
    scenario = load_scenario(scenario_path)
    fleet_path = scenario.live.fleet
    if fleet_path is None:
        raise BenchError(f"{scenario_path}: the scenario names no live fleet (live.fleet)")
    fleet = load_fleet(fleet_path)
    prices = {b.name: b.price_usd_per_hour for b in fleet.backends}
    # A backend's slots as the fleet says, else as its worker runs (its threads).
    slots = {
        b.name: b.slots or (b.launch.threads if b.launch is not None else 1) for b in fleet.backends
    }
    played = scenario if full else scenario.shortened()
    env = {**os.environ, "SWITCHYARD_ADMIN_TOKEN": secrets.token_urlsafe(24)}
    out = []
    with two_gateways(fleet_path, work, env) as gateways:
        addresses, first = gateways.addresses, gateways.first
        extra = ([] if full else ["--short"]) + ["--rate-scale", f"{rate_scale:g}"]
        target, admin = first["address"], first["admin"]
        for name in ("one", "two"):
            more = []
            ports = [first["metrics_port"]]
            if name == "two":
                second = gateways.start_second()
                more = ["--target", second["address"]]
                ports.append(second["metrics_port"])
            report = work / f"report-{name}"
            refused_before, retries_before = gateway_counts(ports)
            before = worker_counts(addresses)
            run = run_load(
                target,
                admin,
                scenario_path,
                work,
                env,
                LOAD_TIMEOUT_S,
                [*more, *extra, "--report", str(report)],
            )
            busy = busy_ms(before, worker_counts(addresses))
            records = report / "requests.csv"
            cost = busy_cost_per_1m(records, played, prices, slots, busy)
            refused, retries = gateway_counts(ports)
            out.append(
                Measured(
                    run,
                    cost,
                    busy,
                    records,
                    refused - refused_before,
                    retries - retries_before,
                )
            )
    one, two = out
    routed = busy_cost_per_1m(two.records, played, prices, slots, one.busy_ms)
    return (
        replace(one, routed_cost_usd_per_1m=one.busy_cost_usd_per_1m),
        replace(two, routed_cost_usd_per_1m=routed),
    )


def section(
    scenario_path: Path,
    full: bool,
    one: Measured,
    two: Measured,
    took_s: float,
    rate_scale: float = 1.0,
) -> str:
    a, b = summary(one.run), summary(two.run)
    cost_one, cost_two = one.busy_cost_usd_per_1m, two.busy_cost_usd_per_1m
    ratio = cost_two / cost_one if cost_one else float("inf")
    said = b["cost_usd_per_1m"] / a["cost_usd_per_1m"] if a["cost_usd_per_1m"] else float("inf")
    worst = max(
        (abs(b["attainment"][k] - v) for k, v in a["attainment"].items() if k in b["attainment"]),
        default=0.0,
    )
    status = "met" if ratio <= TARGET_COST_RATIO else "NOT met"
    routed = two.routed_cost_usd_per_1m / one.routed_cost_usd_per_1m
    form = "full" if full else "short"
    command = "python -m gateway.bench.two_gateways" + (" --full" if full else "")
    if rate_scale != 1.0:
        command += f" --rate-scale {rate_scale:g}"
    scaled = (
        ""
        if rate_scale == 1.0
        else f", every rate times {rate_scale:g} (beyond the scenario's live rate scale)"
    )
    return "\n".join(
        [
            "## Two gateways against one (price-spike, live)",
            "",
            f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC (run took {took_s:.0f} s); "
            f"Python {platform.python_version()}; {os.cpu_count()} CPUs shared by the two "
            "gateways, the three workers, redis-server and the load generator (and whatever "
            "else runs on the machine).",
            f"- Command: `{command} --out BENCHMARKS.md`.",
            f"- {scenario_path.name}, its {form} form{scaled}, on its live fleet (as `make demo` "
            "plays it); the same arrivals (same seed) through one gateway, then through two "
            "sharing their control state over a private redis-server, the load generator sending "
            "every other request to each. Workers answer with load reports (on by default). "
            "SLA met: each class's share of requests answered OK within its SLA latency.",
            "- Cost at the backends' busy time: each OK answer's backend at its price when "
            "the request was due, times that worker's mean execution time per inference over "
            "the run (its statistics API), shared by its slots. As the gateways say: the sum "
            "of their `switchyard_cost_usd`, the price times each route's estimated mean "
            "service time, which grows where a gateway's samples hold waits behind the other "
            "gateway's requests.",
            "",
            markdown_table(("", "one gateway", "two gateways", "two vs one"), rows(one, two)),
            "",
            f"Target: two gateways' cost per 1M within 5% of one gateway's at the backends' "
            f"busy time: {ratio:.3f}x, {status} (as the gateways say: {said:.3f}x); the "
            f"largest gap in SLA attainment between them over the classes: "
            f"{worst * 100:.2f} points. Where the traffic went, priced at the one-gateway "
            f"run's busy times: {routed:.3f}x. `switchyard simulate --scenario "
            f"{scenario_path.name} --gateways 2 4` models the same question "
            "(docs/operations.md).",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.bench.two_gateways", description=__doc__
    )
    parser.add_argument("--scenario", type=Path, default=ROOT / "scenarios" / "price-spike.yaml")
    parser.add_argument("--full", action="store_true", help="the scenario's full form")
    parser.add_argument("--out", type=Path, default=None, help="BENCHMARKS.md to update")
    parser.add_argument(
        "--rate-scale",
        type=float,
        default=1.0,
        help="multiply every rate (a machine too small for the scenario's load runs it lighter)",
    )
    parser.add_argument(
        "--logs",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep the gateways' and load runs' logs and fleet files here",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            if args.logs is not None:
                args.logs.mkdir(parents=True, exist_ok=True)
                folder = args.logs
            else:
                folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="two-gw-")))
            one, two = measure(args.scenario, args.full, folder, args.rate_scale)
    except BenchError as exc:
        print(f"two-gateways bench: {exc}")
        return 1
    publish(
        section(args.scenario, args.full, one, two, time.monotonic() - started, args.rate_scale),
        args.out,
        BEGIN,
        END,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
