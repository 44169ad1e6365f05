"""`python -m gateway.bench.faults`: runs the fault suite (tests/e2e/test_faults.py,
real `switchyard serve` processes and real faults under traffic) with pytest, and
writes what its cases measured as BENCHMARKS.md's "Fault suite" section: the worst
latency while a worker was SIGSTOPped against its route's predicted p99 plus one probe
interval, requests lost in each case, ejections in the deadline storm, the overload
burst's answers by status.

Runs pytest as a child process (the suite's figures come back as JSON through
$FAULTS_REPORT_JSON); imports nothing of the gateway but the section writer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.bench.report import write_section

BEGIN = "<!-- faults: written by `python -m gateway.bench.faults` -->"
END = "<!-- /faults -->"
ROOT = Path(__file__).resolve().parents[2]
SUITE = "tests/e2e/test_faults.py"


def _statuses(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{code} {n:,}" for code, n in sorted(counts.items(), key=lambda c: -c[1]))


def _lost(case: Mapping[str, Any]) -> int:
    """Requests sent and not answered with a clean status: the suite fails on any, so
    a section is only written with 0 here."""
    answered: int = sum(case["statuses"].values())
    return int(case["requests"]) - answered


def section(figures: Mapping[str, Any], took_s: float, passed: bool) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    stop, kill = figures.get("sigstop"), figures.get("kill_9")
    part, jump = figures.get("partition"), figures.get("latency_jump")
    storm, burst = figures.get("deadline_storm"), figures.get("overload_burst")
    lines = [
        "## Fault suite",
        "",
        f"- Date: {now} (run took {took_s:.0f} s); Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs shared with whatever else runs.",
        f"- Command: `python -m gateway.bench.faults` (pytest {SUITE} -s); suite "
        f"{'passed' if passed else 'FAILED'}.",
        "- `switchyard serve` on two launched digits workers (probes every 200 ms, 1 s "
        "timeout, restart_after_failed_probes 3), and on a launched worker beside a remote "
        "one behind a TCP proxy; open-loop traffic of 40 requests/s (grpc.aio, 30 s deadline) "
        "through each fault. Lost: requests without exactly one clean answer. UNAVAILABLE "
        "is clean only while no backend was ready (the answer says so).",
        "",
        "| case | requests | answers | lost | measured |",
        "| --- | ---: | --- | ---: | --- |",
    ]
    if kill:
        lines.append(
            f"| kill -9 of the worker taking traffic (stopped a moment first, so requests are "
            f"in flight there) | {kill['requests']} | "
            f"{_statuses(kill['statuses'])} | {_lost(kill)} | {kill['retried_on_b']} "
            "requests in flight there retried on the other; worst latency "
            f"{kill['worst_latency_ms']} ms; restarted and taking traffic again |"
        )
    if stop:
        lines.append(
            f"| SIGSTOP of the worker taking traffic | {stop['requests']} | "
            f"{_statuses(stop['statuses'])} | {_lost(stop)} | worst latency while stopped "
            f"{stop['worst_latency_during_stop_ms']} ms (of {stop['requests_during_stop']}) "
            f"against predicted p99 {stop['predicted_p99_ms']} ms + probe interval "
            f"{stop['probe_interval_ms']:.0f} ms = {stop['target_ms']} ms; replaced by a new "
            f"process after {stop['replaced_after_s']} s |"
        )
    if part:
        lines.append(
            f"| partition of the remote backend (blackhole, then heal) | {part['requests']} | "
            f"{_statuses(part['statuses'])} | {_lost(part)} | worst latency "
            f"{part['worst_latency_during_partition_ms']} ms; remote seen "
            f"{', '.join(part['remote_status_seen'])}; {part['retried_on_local']} held "
            f"requests retried on local; ready {part['ready_after_heal_s']} s after the heal |"
        )
    if jump:
        before, after = jump["remote_predicted_p99_ms"]
        slow_ms = jump["remote_emulated_ms"]
        lines.append(
            f"| tenfold latency jump of the remote backend | {jump['requests']} | "
            f"{_statuses(jump['statuses'])} | {_lost(jump)} | emulated service "
            f"{slow_ms[0]:g} -> {slow_ms[1]:g} ms, its predicted p99 {before} -> {after} ms "
            f"against digits' SLA {jump['sla_ms']:g} ms; traffic moved to local |"
        )
    if storm:
        lines.append(
            f"| deadline storm (60 at 0.5 ms, then 40 plain) | 100 | storm: "
            f"{_statuses(storm['storm'])}; plain: OK {storm['plain_ok']} | 0 | "
            f"backends ejected: {storm['ejections']:g} |"
        )
    if burst:
        lines.append(
            f"| overload burst (3,000 at once) | {burst['requests']:,} | "
            f"{_statuses(burst['statuses'])} | 0 | {burst['readiness_checks']} ServerReady + "
            f"health checks during it, all ready/SERVING, slowest "
            f"{burst['slowest_readiness_check_ms']} ms |"
        )
    notes = []
    if stop:
        notes.append(
            "- SIGSTOP: the requests sent to the stopped worker before its probes failed "
            "waited for the attempt timeout (their route's predicted p99 plus "
            "`attempt_timeout_slack_s`, set here to the probe interval), then were answered "
            "by the other worker. No request waited for its deadline."
        )
    if burst:
        notes.append(
            "- Overload burst: the gateway merges waiting requests into batched calls "
            "(coalescing), so most of the burst fits the queues; the rest is shed at once "
            "with RESOURCE_EXHAUSTED naming the limit. The readiness checks on the inference "
            "port waited behind the burst on the gateway's event loop (slowest above), each "
            "answered ready; `gateway.probes` answers them from threads of their own."
        )
    if part:
        notes.append(
            "- Partition: requests answered by the remote backend only after the heal "
            "(held less than the attempt timeout) count as latency samples of its route, "
            "which can keep its estimate past the SLA, and traffic away from it, for a "
            "while after it is ready again (the suite drains local to see it serve)."
        )
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.bench.faults", description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="BENCHMARKS.md to update")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        report = Path(work) / "faults.json"
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", SUITE, "-q", "-s", "-p", "no:cacheprovider"],
            cwd=ROOT,
            env={**os.environ, "FAULTS_REPORT_JSON": str(report)},
            check=False,
        )
        figures = json.loads(report.read_text()) if report.exists() else {}
    if not figures:
        print("fault bench: the suite measured nothing", file=sys.stderr)
        return 1
    body = section(figures, time.perf_counter() - started, proc.returncode == 0)
    print(body)
    if args.out is not None and proc.returncode == 0:
        write_section(args.out, body, BEGIN, END)
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
