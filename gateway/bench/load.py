"""The load generator's own benchmark: how much open-loop load one `switchyard load`
process sends on schedule, whether it agrees with Triton's perf_analyzer, and the
price-spike scenario played live against the three-tier fleet with a baseline.

    python -m gateway.bench.load [--out BENCHMARKS.md]

1. Capacity: constant open-loop rates against one digits worker; asked vs sent
   rate, lag p99, kept_up, and the generator's CPU seconds per 1,000 requests (the
   child's rusage from os.wait4, less the CPU of a run that sends almost nothing).
2. Agreement with perf_analyzer through the gateway (one launched digits worker):
   the same constant request rate from both tools; then perf_analyzer closed loop at
   a concurrency and `switchyard load` open loop (Poisson) at the throughput that
   perf_analyzer measured.
3. price-spike live (60 s) against the three-tier emulated fleet, next to the
   fastest-only baseline on the same arrivals: cost per 1M and attainment per class.

Writes its section of BENCHMARKS.md (between markers) and leaves the rest. Every
tool runs as a child process; this module imports neither `protos` nor tritonclient.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from gateway.bench import harness
from gateway.bench.__main__ import machine_note
from gateway.bench.harness import (
    BenchError,
    Child,
    PerfAnalyzerRow,
    serve_command,
    switchyard_command,
)
from gateway.bench.report import publish
from gateway.loadtest.report import sla_met
from gateway.report.markdown import markdown_table
from gateway.routing.policy import PolicyBook
from gateway.routing.router import RouteRequest
from gateway.sim.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[2]
BEGIN = "<!-- load: written by `python -m gateway.bench.load` -->"
END = "<!-- /load -->"
TOKEN_ENV = "SWITCHYARD_ADMIN_TOKEN"
MODEL = "digits"
STARTUP_TIMEOUT_S = 90.0
CAPACITY_TARGET_PER_S = 2000.0
"""One generator process must send at least this rate on schedule."""
SAVING_TARGET = 0.40
"""price-spike: switchyard's cost per 1M at least this far below fastest-only's."""
PRICE_SPIKE = ROOT / "scenarios" / "price-spike.yaml"
THREE_TIER = ROOT / "scenarios" / "fleets" / "three-tier.yaml"


WORKER_CPU = 0
GENERATOR_CPU = 1


# ---- running `switchyard load` ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadRun:
    """One `switchyard load --json` child: its JSON and its own CPU time."""

    result: dict[str, Any]
    cpu_s: float
    """User + system seconds of the child (os.wait4 rusage), startup included."""
    wall_s: float

    @property
    def summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = self.result["summary"]
        return summary

    @property
    def baselines(self) -> list[dict[str, Any]]:
        baselines: list[dict[str, Any]] = self.result["baselines"]
        return baselines


def scenario_yaml(name: str, rate_per_s: float, duration_s: float, arrivals: str) -> str:
    """A one-stream digits scenario: a modelled backend (the schema needs one; with
    no events and no baseline it is only a name) and one traffic stream."""
    return yaml.safe_dump(
        {
            "scenario": name,
            "duration_s": duration_s,
            "seed": 1,
            "backends": [
                {
                    "name": "w",
                    "price_usd_per_hour": 0.04,
                    "models": {MODEL: {"p50_ms": 0.2, "p99_ms": 0.5}},
                }
            ],
            "traffic": [{"model": MODEL, "rate_per_s": rate_per_s, "arrivals": arrivals}],
        },
        sort_keys=False,
    )


def run_load(
    target: str,
    admin: str,
    scenario: Path,
    work: Path,
    env: dict[str, str],
    timeout_s: float,
    extra: Sequence[str] = (),
) -> LoadRun:
    """Runs `switchyard load --json --quiet` as a child and reaps it with os.wait4 for
    its rusage. `admin` is always given: against a plain worker it is the worker's own
    address (no admin API there, so the generator runs without one) and the run never
    reaches a gateway that may be listening on the demo fleet's admin port."""
    name = scenario.stem
    command = [
        *switchyard_command(),
        "load",
        "--target",
        target,
        "--admin",
        admin,
        "--scenario",
        str(scenario),
        "--json",
        "--quiet",
        *extra,
    ]
    started = time.monotonic()
    with Child(f"load-{name}", command, work, ROOT, env) as child:
        status, cpu_s = child.wait(timeout_s)
    wall_s = time.monotonic() - started
    lines = [
        line
        for line in child.stdout_path.read_text(errors="replace").splitlines()
        if line.startswith("{")
    ]
    if status not in (0, 1) or not lines:
        raise BenchError(f"switchyard load ({name}) exit status {status}: {child.stderr_tail(5)}")
    return LoadRun(json.loads(lines[-1]), cpu_s, wall_s)


def throughput_per_s(summary: dict[str, Any]) -> float:
    """OK answers over the sending window (as perf_analyzer counts completed calls)."""
    duration = float(summary["duration_s"])
    return float(summary["ok"]) / duration if duration > 0 else math.nan


def sla_targets(scenario: Path, classes: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Each class's SLA in `scenario`: (percentile, latency ms); `default` is the
    requests that name no class."""
    book = PolicyBook(load_scenario(scenario).policies)
    out = {}
    for klass in classes:
        policy = book.resolve(RouteRequest("", sla_class=None if klass == "default" else klass))
        out[klass] = (policy.percentile, policy.latency_ms)
    return out


def latency(summary: dict[str, Any], label: str, klass: str = "default") -> float:
    value = summary["latency_ms"].get(klass, {}).get(label)
    return math.nan if value is None else float(value)


# ---- the servers --------------------------------------------------------------------


@contextlib.contextmanager
def digits_worker(repository: Path, work: Path, cpus: Sequence[int] = ()) -> Iterator[str]:
    command = [
        *switchyard_command(),
        "backend",
        "--repository",
        str(repository),
        "--listen",
        "127.0.0.1:0",
        "--models",
        MODEL,
    ]
    if cpus:
        command += ["--cpus", *map(str, cpus)]
    with Child("worker", command, work, ROOT) as child:
        yield child.wait_listening(STARTUP_TIMEOUT_S)


@contextlib.contextmanager
def gateway(fleet: dict[str, Any], name: str, work: Path) -> Iterator[Any]:
    """`switchyard serve` on `fleet` (ports 0; the admin token from this process's
    environment, which main() sets); yields its ready file's description."""
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(fleet, sort_keys=False))
    ready = work / f"{name}-ready.json"
    ready.unlink(missing_ok=True)
    command = serve_command(path, ready)
    with Child(name, command, work, ROOT) as child:
        yield child.wait_ready_file(ready, STARTUP_TIMEOUT_S)


def one_worker_fleet(repository: Path) -> dict[str, Any]:
    return {
        "repository": str(repository),
        "gateway": {
            "listen": "127.0.0.1:0",
            "metrics": "127.0.0.1:0",
            "http": "127.0.0.1:0",
            "admin": "127.0.0.1:0",
        },
        "backends": [
            {
                "name": "w",
                "address": "127.0.0.1:0",
                "hardware_class": "cpu-x86-64-v4-2c",
                "price_usd_per_hour": 0.04,
                "launch": {"threads": 1, "models": [MODEL]},
            }
        ],
    }


def three_tier_fleet(repository: Path) -> dict[str, Any]:
    """scenarios/fleets/three-tier.yaml with an absolute repository, ports 0 and the
    token from the environment instead of a file."""
    fleet: dict[str, Any] = yaml.safe_load(THREE_TIER.read_text())
    fleet["repository"] = str(repository)
    fleet["gateway"].update(
        {
            "listen": "127.0.0.1:0",
            "metrics": "127.0.0.1:0",
            "http": "127.0.0.1:0",
            "admin": "127.0.0.1:0",
        }
    )
    fleet["gateway"].pop("admin_token_file", None)
    return fleet


# ---- the three parts ---------------------------------------------------------------


@dataclass(slots=True)
class Findings:
    capacity: list[tuple[float, LoadRun]] = field(default_factory=list)
    startup_cpu_s: float = math.nan
    rate_pairs: list[tuple[float, PerfAnalyzerRow, LoadRun]] = field(default_factory=list)
    concurrency_pairs: list[tuple[int, PerfAnalyzerRow, LoadRun]] = field(default_factory=list)
    price_spike: LoadRun | None = None
    notes: list[str] = field(default_factory=list)


def measure_capacity(
    args: argparse.Namespace, work: Path, env: dict[str, str], found: Findings, log: Any
) -> None:
    # The generator on its own core budget: the worker on CPU 0, the generator on CPU 1.
    pinned = ["--cpus", str(GENERATOR_CPU)]
    with digits_worker(args.repository, work, (WORKER_CPU,)) as address:
        log(f"capacity: worker {address} on CPU {WORKER_CPU}, generator on {GENERATOR_CPU}")
        idle = work / "startup.yaml"
        idle.write_text(scenario_yaml("startup", 10.0, 0.5, "constant"))
        found.startup_cpu_s = run_load(address, address, idle, work, env, 60, pinned).cpu_s
        log(f"  startup alone: {found.startup_cpu_s:.2f} CPU s")
        for rate in args.rates:
            path = work / f"capacity-{rate:g}.yaml"
            path.write_text(scenario_yaml(f"capacity-{rate:g}", rate, args.level_s, "constant"))
            done = run_load(address, address, path, work, env, args.level_s + 60, pinned)
            found.capacity.append((rate, done))
            s = done.summary
            log(
                f"  {rate:g}/s: sent {s['sent_rate_per_s']:,.1f}/s, lag p99 "
                f"{s['lag_p99_ms']:.1f} ms, kept_up {s['kept_up']}, {done.cpu_s:.2f} CPU s"
            )


def measure_agreement(
    args: argparse.Namespace,
    work: Path,
    env: dict[str, str],
    pa_binary: Path,
    found: Findings,
    log: Any,
) -> None:
    with gateway(one_worker_fleet(args.repository), "gateway", work) as ready:
        address, admin = str(ready["address"]), str(ready["admin"])
        log(f"agreement: gateway at {address} (admin {admin})")
        # A short warm-up, so that neither tool meets a cold connection or worker first.
        warm = work / "warmup.yaml"
        warm.write_text(scenario_yaml("warmup", 200.0, 2.0, "constant"))
        run_load(address, admin, warm, work, env, 60)
        pa_timeout = args.pa_trials * args.pa_interval_ms / 1000.0 + 60

        def pair(
            label: str, pa_load: list[str], name: str, rate: float | None, arrivals: str
        ) -> tuple[PerfAnalyzerRow, LoadRun]:
            """perf_analyzer with `pa_load`, then `switchyard load` at `rate` (None: the
            throughput perf_analyzer measured) with `arrivals`."""
            [row] = harness.perf_analyzer_rows(
                pa_binary,
                address,
                MODEL,
                pa_load,
                args.pa_interval_ms,
                work / f"pa-{label}.csv",
                pa_timeout,
                args.pa_trials,
            )
            rate = round(row.throughput_per_s, 1) if rate is None else rate
            path = work / f"{name}.yaml"
            path.write_text(scenario_yaml(name, rate, args.level_s, arrivals))
            done = run_load(address, admin, path, work, env, args.level_s + 60)
            log(
                f"  {label}: perf_analyzer {row.throughput_per_s:,.1f}/s p50 "
                f"{row.latency_p50_ms:.3f} p99 {row.latency_p99_ms:.3f} ms; switchyard load "
                f"({arrivals}) {throughput_per_s(done.summary):,.1f}/s p50 "
                f"{latency(done.summary, 'p50'):.3f} p99 {latency(done.summary, 'p99'):.3f} ms"
            )
            return row, done

        for rate in args.pa_rates:
            row, done = pair(
                f"rate-{rate:g}",
                ["--request-rate-range", f"{rate:g}:{rate:g}"],
                f"rate-{rate:g}",
                rate,
                "constant",
            )
            found.rate_pairs.append((rate, row, done))
        for c in args.pa_concurrency:
            row, done = pair(
                f"c{c}", ["--concurrency-range", f"{c}:{c}"], f"poisson-c{c}", None, "poisson"
            )
            found.concurrency_pairs.append((c, row, done))


def measure_price_spike(
    args: argparse.Namespace, work: Path, env: dict[str, str], found: Findings, log: Any
) -> None:
    with gateway(three_tier_fleet(args.repository), "three-tier", work) as ready:
        address, admin = str(ready["address"]), str(ready["admin"])
        log(f"price-spike: three-tier gateway at {address}; 2 x 60 s")
        found.price_spike = run_load(
            address,
            admin,
            PRICE_SPIKE,
            work,
            env,
            2 * (60 + 35) + 120,
            ["--baseline", "fastest-only", "--report", str(work / "price-spike")],
        )
        s, b = found.price_spike.summary, found.price_spike.baselines[0]
        log(
            f"  cost per 1M: switchyard {s['cost_usd_per_1m']:.3f}, fastest-only "
            f"{b['cost_usd_per_1m']:.3f} USD; attainment {s['attainment']} vs {b['attainment']}"
        )


# ---- the section --------------------------------------------------------------------


def _f(value: float, digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def capacity_markdown(found: Findings, args: argparse.Namespace) -> list[str]:
    if not found.capacity:
        return ["Not measured (see notes)."]
    rows = []
    for rate, done in found.capacity:
        s = done.summary
        requests = int(s["requests"])
        net = done.cpu_s - found.startup_cpu_s
        rows.append(
            (
                f"{rate:,.0f}",
                _f(s["asked_rate_per_s"]),
                _f(s["sent_rate_per_s"]),
                _f(s["lag_p99_ms"], 2),
                "yes" if s["kept_up"] else "**no**",
                f"{int(s['ok']):,} / {requests:,}",
                _f(latency(s, "p50"), 2),
                _f(latency(s, "p99"), 1),
                _f(done.cpu_s, 2),
                _f(net / requests * 1000.0 if requests else math.nan, 3),
                _f(net / float(s["duration_s"]), 2),
            )
        )
    lines = [
        markdown_table(
            (
                "rate (req/s)",
                "asked (req/s)",
                "sent (req/s)",
                "lag p99 (ms)",
                "kept up",
                "OK / sent",
                "p50 (ms)",
                "p99 (ms)",
                "generator CPU (s)",
                "CPU s per 1,000 req",
                "generator cores",
            ),
            rows,
            (True,) * 11,
        ),
        "",
    ]
    failed = [rate for rate, done in found.capacity if not done.summary["kept_up"]]
    target_ok = all(
        done.summary["kept_up"] for rate, done in found.capacity if rate <= CAPACITY_TARGET_PER_S
    )
    if failed:
        first = next(done for rate, done in found.capacity if rate == failed[0])
        net_cores = (first.cpu_s - found.startup_cpu_s) / float(first.summary["duration_s"])
        later = [rate for rate, done in found.capacity if rate > failed[0] and rate not in failed]
        lines.append(
            f"The generator did not keep up (its own check: lag p99 <= 20 ms and sent >= 97% "
            f"of asked) first at {failed[0]:,.0f} req/s"
            + (f" (also at {', '.join(f'{r:,.0f}' for r in failed[1:])})" if failed[1:] else "")
            + (f"; {', '.join(f'{r:,.0f}' for r in later)} kept up in this run" if later else "")
            + f". There its own CPU was {net_cores:.2f} of a core, and the worker's answers "
            f"took p50 {latency(first.summary, 'p50'):,.1f} ms, p99 "
            f"{latency(first.summary, 'p99'):,.1f} ms: the generator, the worker and the "
            "machine's other work share the 2 cores."
        )
    else:
        lines.append(
            "The generator kept up at every level (none of them hit its limit: lag p99 "
            "<= 20 ms and sent >= 97% of asked)."
        )
    lines.append(
        f"Target: one process sustains >= {CAPACITY_TARGET_PER_S:,.0f} req/s: "
        + ("met." if target_ok else "**NOT met**.")
    )
    lines += [
        "",
        f"The worker runs pinned to CPU {WORKER_CPU} and the generator to CPU {GENERATOR_CPU} "
        "(`--cpus`), each on its own core budget; other work on the machine still shares "
        "them. "
        f"Generator CPU is the `switchyard load` child's user + system time from `os.wait4` "
        f"(whole run, startup included). Per 1,000 requests and cores: net of "
        f"{found.startup_cpu_s:.2f} CPU s that a run sending 5 requests took (imports, "
        "channel setup, report), over the requests sent and the sending window. "
        "OK, p50 and p99 are the worker's answers as the generator saw them.",
    ]
    return lines


THROUGHPUT_COLUMNS = ("PA infer/s", "load infer/s", "load / PA")
LATENCY_COLUMNS = (
    "PA p50 (ms)",
    "load p50 (ms)",
    "load / PA",
    "PA p99 (ms)",
    "load p99 (ms)",
    "load / PA",
)


def _versus(
    pa: PerfAnalyzerRow, summary: dict[str, Any]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """perf_analyzer's figures beside `switchyard load`'s: the THROUGHPUT_COLUMNS and
    LATENCY_COLUMNS cells of one row."""
    tp = throughput_per_s(summary)
    p50, p99 = latency(summary, "p50"), latency(summary, "p99")
    throughput = (
        _f(pa.throughput_per_s),
        _f(tp),
        _f(tp / pa.throughput_per_s, 3),
    )
    latencies = (
        _f(pa.latency_p50_ms, 3),
        _f(p50, 3),
        _f(p50 / pa.latency_p50_ms, 2),
        _f(pa.latency_p99_ms, 3),
        _f(p99, 3),
        _f(p99 / pa.latency_p99_ms, 2),
    )
    return throughput, latencies


def agreement_markdown(found: Findings, args: argparse.Namespace) -> list[str]:
    lines: list[str] = []
    if found.rate_pairs:
        rows = []
        for rate, pa, done in found.rate_pairs:
            throughput, latencies = _versus(pa, done.summary)
            rows.append((f"{rate:g}", *throughput, *latencies))
        header = ("rate (req/s)", *THROUGHPUT_COLUMNS, *LATENCY_COLUMNS)
        lines += [
            "(a) The same constant request rate from both tools (perf_analyzer "
            "`--request-rate-range R:R`, its default constant spacing; `switchyard load` "
            "with `arrivals: constant`):",
            "",
            markdown_table(header, rows, (True,) * len(header)),
            "",
        ]
    if found.concurrency_pairs:
        pairs: list[tuple[str, ...]] = []
        for c, pa, done in found.concurrency_pairs:
            throughput, latencies = _versus(pa, done.summary)
            little = _f(c / pa.throughput_per_s * 1000.0, 3)
            pairs.append((str(c), *throughput, little, *latencies))
        columns = ("concurrency", *THROUGHPUT_COLUMNS, "C / X (ms)", *LATENCY_COLUMNS)
        lines += [
            "(b) perf_analyzer closed loop (`--concurrency-range C:C`), then `switchyard load` "
            "open loop with Poisson arrivals at the throughput perf_analyzer measured:",
            "",
            markdown_table(columns, pairs, (True,) * len(columns)),
            "",
            "At the same throughput, closed-loop and open-loop latencies differ by design: "
            "closed loop, each of the C callers waits for its answer before sending again, so "
            "the gateway never holds more than C requests and the mean latency is C / X "
            "(Little's law, column `C / X`) whatever the server does; open loop, Poisson "
            "arrivals come in bursts that queue behind each other, and nothing slows the "
            "sender when the server falls behind, so the tail grows with the load. The "
            "ratios above are how far apart the two came on this run, not an error in "
            "either tool.",
            "",
        ]
    if lines:
        lines.append(
            f"perf_analyzer: `-i grpc --measurement-interval {args.pa_interval_ms} "
            f"--stability-percentage 50 --max-trials {args.pa_trials}` (the figures of its "
            f"last, stable window); `switchyard load`: {args.level_s:g} s per level, every "
            "request of the run. Both send batch 1 to the gateway (perf_analyzer random "
            "data, `switchyard load` zeros; digits' compute does not depend on them)."
        )
    return lines or ["Not measured (see notes)."]


def price_spike_markdown(found: Findings) -> list[str]:
    done = found.price_spike
    if done is None:
        return ["Not measured (see notes)."]
    s = done.summary
    b = done.baselines[0] if done.baselines else None
    if b is None:
        return ["The fastest-only baseline did not run (see notes)."]
    classes = sorted(set(s["attainment"]) | set(b["attainment"]))
    targets = sla_targets(PRICE_SPIKE, classes)

    def meets(run: dict[str, Any], klass: str) -> bool:
        return sla_met(run["attainment"].get(klass, math.nan), targets[klass][0])

    rows = []
    for klass in classes:
        mine, theirs = s["attainment"].get(klass, math.nan), b["attainment"].get(klass, math.nan)
        percentile, latency_ms = targets[klass]
        rows.append(
            (
                klass,
                f"p{percentile:g} <= {latency_ms:g} ms",
                f"{mine:.2%}" + ("" if meets(s, klass) else " (missed)"),
                f"{theirs:.2%}" + ("" if meets(b, klass) else " (missed)"),
                f"{(mine - theirs) * 100:+.2f} pt",
                _f(latency(s, "p99", klass), 2),
                _f(latency(b, "p99", klass), 2),
            )
        )
    saving = 1.0 - float(s["cost_usd_per_1m"]) / float(b["cost_usd_per_1m"])

    # Equal or better SLA attainment: every class's SLA that fastest-only meets, the
    # router meets too. (Per request, the router spends part of what a percentile SLA
    # allows on cheaper, slower routes; the table shows by how much.)
    missed = [k for k in classes if meets(b, k) and not meets(s, k)]
    lower = [
        k for k in classes if not s["attainment"].get(k, 0.0) >= b["attainment"].get(k, math.inf)
    ]
    met = saving >= SAVING_TARGET and not missed
    failed_checks = [c for c in done.result["checks"] if not c["passed"]]
    lines = [
        markdown_table(
            ("", "switchyard", "fastest-only", "switchyard - fastest-only"),
            [
                (
                    "cost per 1M (USD)",
                    _f(float(s["cost_usd_per_1m"]), 3),
                    _f(float(b["cost_usd_per_1m"]), 3),
                    f"{-saving:+.1%}",
                ),
                (
                    "requests / OK / errors",
                    f"{s['requests']:,} / {s['ok']:,} / {sum(s['errors'].values()):,}",
                    f"{b['requests']:,} / {b['ok']:,} / {sum(b['errors'].values()):,}",
                    "",
                ),
                (
                    "generator kept up",
                    "yes" if s["kept_up"] else "no",
                    "yes" if b["kept_up"] else "no",
                    "",
                ),
            ],
            (False, True, True, True),
        ),
        "",
        markdown_table(
            (
                "class",
                "SLA",
                "attainment, switchyard",
                "attainment, fastest-only",
                "difference",
                "p99 switchyard (ms)",
                "p99 fastest-only (ms)",
            ),
            rows,
            (False, False, True, True, True, True, True),
        ),
        "",
        f"Saving: {saving:.1%} below fastest-only (target >= {SAVING_TARGET:.0%} at equal "
        "or better SLA attainment: every class's SLA that fastest-only meets, met too), "
        + (
            "every class's SLA met as under fastest-only"
            if not missed
            else f"SLA **missed** in {', '.join(missed)}, which fastest-only meets"
        )
        + ": "
        + ("met." if met else "**NOT met**.")
        + (
            " Per request, attainment is lower in "
            + ", ".join(
                f"{k} ({(s['attainment'][k] - b['attainment'][k]) * 100:+.2f} pt)" for k in lower
            )
            + ": the router uses part of what each percentile SLA allows on the cheaper, "
            "slower tiers, where fastest-only sends everything to the fastest and leaves "
            "the SLA mostly unused."
            if lower
            else " Per request, attainment is equal or better in every class too."
        )
        + " The scenario's own live checks: "
        + (
            "all passed."
            if not failed_checks
            else "failed: " + "; ".join(f"{c['name']} ({c['detail']})" for c in failed_checks) + "."
        ),
        "",
        "Shares (switchyard): "
        + ", ".join(f"{route} {share:.1%}" for route, share in s["shares"].items())
        + "; fastest-only: "
        + ", ".join(f"{route} {share:.1%}" for route, share in b["shares"].items())
        + ".",
    ]
    return lines


def section(
    found: Findings, args: argparse.Namespace, started: datetime, elapsed_s: float, load: str
) -> str:
    argv = shlex.join(["python", "-m", "gateway.bench.load", *sys.argv[1:]])
    lines = [
        "## Load generator (`switchyard load`)",
        "",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC (run took {elapsed_s:.0f} s).",
        f"- Command: `{argv}` (part of `make bench`).",
        f"- Machine: {machine_note()}; shared: the generator, perf_analyzer, the gateway "
        f"and its workers all run on these cores, next to whatever else runs (load average "
        f"{load} at the start).",
        "",
        "### Generator capacity",
        "",
        f"One digits worker (`switchyard backend --models {MODEL}`), one `switchyard load` "
        f"process per level, constant open-loop arrivals for {args.level_s:g} s each.",
        "",
        *capacity_markdown(found, args),
        "",
        "### Agreement with Triton perf_analyzer",
        "",
        "Through the gateway (`switchyard serve`, one launched digits worker, 1 thread); "
        "PA is perf_analyzer, load is `switchyard load`, one after the other on the same "
        "gateway.",
        "",
        *agreement_markdown(found, args),
        "",
        "### price-spike, live",
        "",
        "`switchyard load --scenario scenarios/price-spike.yaml --baseline fastest-only` "
        "(60 s; live rates x0.6, 150 req/s) against `switchyard serve` on "
        "scenarios/fleets/three-tier.yaml (three local digits workers, emulated 8 / 8 / "
        "1.5 ms, 0.04 / 0.08 / 2.40 USD/h; ports 0); then the same arrivals with the "
        "gateway's routing set to fastest-only (admin SetRouting).",
        "",
        *price_spike_markdown(found),
    ]
    if found.notes:
        lines += ["", "Notes:", "", *(f"- {note}" for note in found.notes)]
    return "\n".join(lines) + "\n"


# ---- command line -------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.bench.load", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=None, help="BENCHMARKS.md to update")
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument(
        "--rates", type=float, nargs="+", default=[500, 1000, 2000, 3000, 4000], help="capacity"
    )
    parser.add_argument("--level-s", type=float, default=8.0, help="seconds per load level")
    parser.add_argument("--pa-rates", type=float, nargs="+", default=[200, 800])
    parser.add_argument("--pa-concurrency", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--pa-interval-ms", type=int, default=5000)
    parser.add_argument("--pa-trials", type=int, default=4, help="perf_analyzer --max-trials")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("capacity", "agreement", "price-spike"),
        default=["capacity", "agreement", "price-spike"],
    )
    harness.add_perf_analyzer_arguments(parser, ROOT)
    parser.add_argument(
        "--log-dir", type=Path, default=None, help="keep logs, scenarios and CSVs here"
    )
    return parser.parse_args(argv)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.repository = args.repository.resolve()
    console = Console(log_path=False)
    signal.signal(signal.SIGTERM, _terminate)
    started = datetime.now(UTC)
    t0 = time.monotonic()
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    # One token for this run's gateways and generators, through the environment.
    os.environ[TOKEN_ENV] = secrets.token_hex(16)
    env = dict(os.environ)
    found = Findings()
    with contextlib.ExitStack() as stack:
        if args.log_dir is not None:
            work = args.log_dir.resolve()
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sy-load-")))
        if "capacity" in args.parts:
            try:
                measure_capacity(args, work, env, found, console.log)
            except BenchError as exc:
                found.notes.append(f"capacity: {exc}")
        if "agreement" in args.parts:
            try:
                pa = harness.ensure_perf_analyzer(
                    args.perf_analyzer_dir, args.perf_analyzer_build, console.log
                )
                measure_agreement(args, work, env, pa, found, console.log)
            except (BenchError, subprocess.TimeoutExpired) as exc:
                found.notes.append(f"perf_analyzer agreement: {exc}")
        if "price-spike" in args.parts:
            try:
                measure_price_spike(args, work, env, found, console.log)
            except BenchError as exc:
                found.notes.append(f"price-spike: {exc}")
    for note in found.notes:
        console.print(f"[red]{note}[/]")
    body = section(found, args, started, time.monotonic() - t0, load)
    publish(body, args.out, BEGIN, END)
    return 1 if found.notes else 0


if __name__ == "__main__":
    raise SystemExit(main())
