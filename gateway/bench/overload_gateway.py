"""The gateway's overload section of BENCHMARKS.md: `switchyard serve` offered ten times
what its fleet can answer, and how it answers.

    python -m gateway.bench.overload_gateway [--model resnet] [--sla-ms 100]
        [--factor 10] [--duration-s 5] [--out BENCHMARKS.md]

The target: at `--factor` times the fleet's capacity, the requests within capacity are
answered OK at their SLA, the rest are shed (RESOURCE_EXHAUSTED) within 100 ms of
arrival, and readiness is answered within 100 ms throughout.

Starts `switchyard serve` on a fleet file written to a temporary folder: two launched
workers like the demo fleet's (1 and 2 inference threads) serving `--model` only, every
port 0 and read back from `--ready-file`, the probe port on, and the policy
`{latency_ms: SLA, on_infeasible: reject}` for the model. The workers stand for slower
hardware (`emulate_latency_ms` per row, default 20 ms; several values: one fleet each, one
after the other), so that ten times the fleet's capacity is a rate one sending process can
offer: the demo models run in well under a millisecond here, where the gateway itself is
the fleet's bottleneck and 10x its capacity is beyond any one Python client. Emulated
hardware gains nothing from batching, so each worker runs one request at a time
(`max_batch_rows: 1`, fp32 variants only: one route per worker), the gateway sends each
request on its own (`coalesce_in_flight: 0`), and each backend has one slot (`slots: 1`:
a worker runs one execution at a time per variant, its threads being ONNX Runtime's).

1. capacity: the sending process (below) in a closed loop at `--capacity-concurrency`,
   a shed call sent again after the wait its pushback trailer asks; the answers OK a
   second to the calls sent in `--capacity-s` after a second of warm-up;
2. the flood: a process of its own (`python -m gateway.bench.overload_gateway send`)
   sends ModelInfer calls evenly spaced at `--factor` times that rate for
   `--duration-s`, over `--channels` connections, recording each call's send time,
   answer time and status; meanwhile this process alternates ServerReady and
   grpc.health.v1 Check on the probe port and, separately, on the inference port
   (gateway.bench.overload's prober).

The report: the offered rate against capacity and the rate the sender achieved; the
answers OK (latency p50/p99, share within the SLA, a second); the shed calls' time to
answer (p50/p99/max, share within 100 ms) by reason; any other status; calls
unanswered when the sender gave up; readiness latency on both ports during the flood.
Times are the client's (time.monotonic, one clock for all processes): a call's time to
answer includes the sending process's own delays. The client, the gateway and the
workers share the machine's cores, so the flood's sending takes CPU from the fleet.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from gateway.bench.harness import BenchError, Child, serve_command
from gateway.bench.loadgen import cpu_seconds
from gateway.bench.overload import PUSHBACK_KEY, Probe, flood_request, latency_row, probe_until
from gateway.bench.report import publish
from gateway.report.markdown import markdown_table
from gateway.routing.percentiles import percentile

ROOT = Path(__file__).resolve().parents[2]
BEGIN = "<!-- overload_gateway: written by `python -m gateway.bench.overload_gateway` -->"
END = "<!-- /overload_gateway -->"
STARTUP_TIMEOUT_S = 120.0
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
CALL_TIMEOUT_S = 30.0
"""A flood call's deadline; the sender waits this long past its last send, then
counts what is still out as unanswered."""
SHED_TARGET_MS = 100.0
"""A shed call must be answered within this of its sending."""
READY_TARGET_MS = 100.0
"""Readiness must be answered within this throughout."""
PROBE_INTERVAL_S = 0.02
"""Between one probe's answer and the next probe, on each port: enough probes to time
(kubelet sends one every 10 s by default) without adding much load of their own."""
GOODPUT_TARGET = 0.8
"""Answers OK a second during the flood, over the measured capacity, at least."""


# ---- the sender (its own process) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sent:
    """What the sender saw, per call in sending order (times: time.monotonic)."""

    rate_per_s: float
    scheduled_s: float
    """When the first call was due; call i was due at scheduled_s + i / rate_per_s."""
    sent_s: list[float]
    answered_s: list[float | None]
    """None: no answer when the sender gave up."""
    codes: list[str]
    pushback_ms: list[int | None]
    """Each answer's `grpc-retry-pushback-ms` trailer (None: none)."""
    messages: dict[str, int]
    """`CODE: message` of the answers but OK -> how many."""
    pushback: int
    """RESOURCE_EXHAUSTED answers with a `grpc-retry-pushback-ms` trailer."""


class _Calls:
    """The calls of one run, recorded by index as they are sent and answered."""

    def __init__(self, target: str, payload: bytes, channels: int) -> None:
        self.payload = payload
        self.channels = [
            # Distinct options keep each channel on a connection of its own.
            grpc.aio.insecure_channel(target, options=[("switchyard.flood_channel", i)])
            for i in range(channels)
        ]
        self.stubs = [channel.unary_unary(INFER_METHOD) for channel in self.channels]
        self.sent: list[float] = []
        self.answered: list[float | None] = []
        self.codes: list[str] = []
        self.pushback_ms: list[int | None] = []
        self.messages: Counter[str] = Counter()
        self.pushback = 0

    async def ready(self) -> None:
        for channel in self.channels:
            await asyncio.wait_for(channel.channel_ready(), STARTUP_TIMEOUT_S)

    def send(self) -> Coroutine[Any, Any, float]:
        """Sends one call; returns its awaitable answer, recorded when it comes."""
        i = len(self.sent)
        call = self.stubs[i % len(self.stubs)](self.payload, timeout=CALL_TIMEOUT_S)
        self.sent.append(time.monotonic())
        self.answered.append(None)
        self.codes.append("UNANSWERED")
        self.pushback_ms.append(None)
        return self._answer(i, call)

    async def _answer(self, i: int, call: Any) -> float:
        """Records the answer; returns its pushback hint in seconds (0: none)."""
        hint_s = 0.0
        try:
            await call
            self.codes[i] = "OK"
        except grpc.aio.AioRpcError as exc:
            name = exc.code().name
            self.codes[i] = name
            self.messages[f"{name}: {exc.details()}"] += 1
            trailers = dict(exc.trailing_metadata() or ())
            if PUSHBACK_KEY in trailers:
                self.pushback += 1
                with contextlib.suppress(ValueError):
                    hint_ms = int(trailers[PUSHBACK_KEY])
                    self.pushback_ms[i] = hint_ms
                    hint_s = hint_ms / 1000
        self.answered[i] = time.monotonic()
        return hint_s

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    def result(self, rate_per_s: float, scheduled_s: float) -> Sent:
        return Sent(
            rate_per_s,
            scheduled_s,
            self.sent,
            self.answered,
            self.codes,
            self.pushback_ms,
            dict(self.messages),
            self.pushback,
        )


async def send_open_loop(
    target: str, payload: bytes, rate_per_s: float, duration_s: float, channels: int
) -> Sent:
    """Sends `rate_per_s` x `duration_s` calls evenly spaced (late ones at once), then
    waits up to a call's deadline for their answers."""
    calls = _Calls(target, payload, channels)
    try:
        await calls.ready()
        loop = asyncio.get_running_loop()
        tasks = []
        start = time.monotonic() + 0.1
        for i in range(max(1, round(rate_per_s * duration_s))):
            delay = start + i / rate_per_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(loop.create_task(calls.send()))
        _, pending = await asyncio.wait(tasks, timeout=CALL_TIMEOUT_S + 5.0)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    finally:
        await calls.close()
    return calls.result(rate_per_s, start)


async def send_closed_loop(
    target: str, payload: bytes, concurrency: int, duration_s: float, channels: int
) -> Sent:
    """Keeps `concurrency` calls in flight for `duration_s`, each sent again as soon as
    it is answered (a shed one after the wait its pushback trailer asks for, at most
    a second)."""
    calls = _Calls(target, payload, channels)
    try:
        await calls.ready()
        start = time.monotonic()
        end = start + duration_s

        async def stream() -> None:
            while time.monotonic() < end:
                hint_s = await calls.send()
                if hint_s > 0:  # shed: back off as the trailer asks, as clients should
                    await asyncio.sleep(min(hint_s, 1.0))

        await asyncio.gather(*(stream() for _ in range(concurrency)))
    finally:
        await calls.close()
    return calls.result(0.0, start)


def flood_payload(repository: Path, model: str, sla_ms: float | None = None) -> bytes:
    """The serialized ModelInferRequest every call sends (one sample row), with an
    `sla_ms` parameter when given."""
    request = flood_request(repository, model)
    if sla_ms is not None:
        request.parameters["sla_ms"].double_param = sla_ms
    return bytes(request.SerializeToString())


def send_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.bench.overload_gateway send")
    parser.add_argument("--target", required=True, help="HOST:PORT of a v2 gRPC server")
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="resnet", help="a model of one FP32 input")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--rate", type=float, help="open loop: calls a second, evenly spaced")
    how.add_argument("--concurrency", type=int, help="closed loop: calls kept in flight")
    parser.add_argument("--duration-s", type=float, required=True)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument(
        "--sla-ms", type=float, default=None, help="the calls' `sla_ms` parameter (default none)"
    )
    parser.add_argument("--out", type=Path, required=True, help="where the JSON record goes")
    args = parser.parse_args(argv)
    payload = flood_payload(args.repository, args.model, args.sla_ms)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    if args.rate is not None:
        run = send_open_loop(args.target, payload, args.rate, args.duration_s, args.channels)
    else:
        run = send_closed_loop(
            args.target, payload, args.concurrency, args.duration_s, args.channels
        )
    args.out.write_text(json.dumps(asdict(asyncio.run(run))))
    return 0


# ---- the run --------------------------------------------------------------------------


def fleet_yaml(repository: Path, model: str, sla_ms: float, emulate_latency_ms: float) -> str:
    """Two launched workers like the demo fleet's, serving `model`, each adding
    `emulate_latency_ms` per row (so their capacity is what the delay says, whatever
    the batching); every port 0."""
    launch = (
        f"models: [{model}], precisions: [fp32], max_batch_rows: 1, "
        f"emulate_latency_ms: {emulate_latency_ms:g}"
    )
    return (
        f"repository: {json.dumps(str(repository))}\n"
        "gateway:\n"
        "  listen: 127.0.0.1:0\n"
        "  metrics: 127.0.0.1:0\n"
        "  http: 127.0.0.1:0\n"
        "  admin: 127.0.0.1:0\n"
        "  probes: 127.0.0.1:0\n"
        "  coalesce_in_flight: 0\n"
        "backends:\n"
        "  - name: small-cpu\n"
        "    address: 127.0.0.1:0\n"
        "    hardware_class: cpu-x86-64-v4-1c\n"
        "    price_usd_per_hour: 0.04\n"
        "    slots: 1\n"
        f"    launch: {{threads: 1, {launch}}}\n"
        "  - name: big-cpu\n"
        "    address: 127.0.0.1:0\n"
        "    hardware_class: cpu-x86-64-v4-2c\n"
        "    price_usd_per_hour: 0.08\n"
        "    slots: 1\n"
        f"    launch: {{threads: 2, {launch}}}\n"
        "policies:\n"
        "  default: {latency_ms: 100, percentile: 99, objective: cost, on_infeasible: fastest}\n"
        "  models:\n"
        f"    {model}: {{latency_ms: {sla_ms:g}, on_infeasible: reject}}\n"
    )


@dataclass(frozen=True, slots=True)
class Capacity:
    concurrency: int
    throughput_per_s: float
    errors: int
    latency_p50_ms: float
    latency_p99_ms: float


CAPACITY_WARMUP_S = 1.0


def sender_command(args: argparse.Namespace, target: str, out: Path, *how: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gateway.bench.overload_gateway",
        "send",
        "--target",
        target,
        "--repository",
        str(args.repository),
        "--model",
        args.model,
        "--channels",
        str(args.channels),
        "--out",
        str(out),
        *how,
    ]


def measure_capacity(args: argparse.Namespace, target: str, work: Path) -> Capacity:
    """Answers OK a second (the goodput at the model's SLA) in a closed loop at
    `--capacity-concurrency` whose shed calls wait as their pushback trailer asks: the
    calls sent in `--capacity-s` after a second of warm-up."""
    record = work / "capacity.json"
    how = ["--concurrency", str(args.capacity_concurrency)]
    how += ["--duration-s", f"{CAPACITY_WARMUP_S + args.capacity_s:g}"]
    with Child("capacity", sender_command(args, target, record, *how), work, ROOT) as child:
        status, _ = child.wait(STARTUP_TIMEOUT_S + args.capacity_s + CALL_TIMEOUT_S)
        if status != 0:
            raise child.failure("the capacity measurement failed")
    sent = Sent(**json.loads(record.read_text()))
    begin = sent.scheduled_s + CAPACITY_WARMUP_S
    end = begin + args.capacity_s
    ok_ms, errors = [], 0
    for s, a, code in zip(sent.sent_s, sent.answered_s, sent.codes, strict=True):
        # Calls sent in the window: a burst sent as the gateway starts, admitted before
        # any route's service time is known, stays in the warm-up.
        if a is None or not begin <= s < end:
            continue
        if code == "OK":
            ok_ms.append((a - s) * 1000)
        else:
            errors += 1
    return Capacity(
        args.capacity_concurrency,
        len(ok_ms) / args.capacity_s,
        errors,
        percentile(ok_ms, 50),
        percentile(ok_ms, 99),
    )


async def flood(
    args: argparse.Namespace,
    target: str,
    probes_target: str,
    rate: float,
    work: Path,
    servers: dict[str, int],
) -> tuple[Sent, list[Probe], list[Probe], dict[str, float]]:
    """The sender's process at `rate`, with both ports probed while it runs; the CPU
    seconds the sender and each of `servers` (name -> pid) spent meanwhile."""
    stop = asyncio.Event()
    on_probes = asyncio.create_task(probe_until(probes_target, stop, PROBE_INTERVAL_S))
    on_inference = asyncio.create_task(probe_until(target, stop, PROBE_INTERVAL_S))
    record = work / "sent.json"
    how = ["--rate", f"{rate:.3f}", "--duration-s", f"{args.duration_s:g}"]
    command = sender_command(args, target, record, *how)
    before = {name: cpu_seconds(pid) for name, pid in servers.items()}
    try:
        with Child("sender", command, work, ROOT) as child:
            timeout_s = STARTUP_TIMEOUT_S + args.duration_s + CALL_TIMEOUT_S
            status, sender_cpu_s = await asyncio.to_thread(child.wait, timeout_s)
            if status != 0:
                raise child.failure("the sender failed")
    finally:
        stop.set()
        probes = await on_probes
        inference = await on_inference
    cpu_s = {name: cpu_seconds(pid) - before[name] for name, pid in servers.items()}
    cpu_s["sender"] = sender_cpu_s
    return Sent(**json.loads(record.read_text())), probes, inference, cpu_s


@dataclass(frozen=True, slots=True)
class Run:
    emulate_latency_ms: float
    capacity: Capacity
    sent: Sent
    probe_port: list[Probe]
    inference_port: list[Probe]
    cpu_s: dict[str, float]
    """Process (`sender`, `gateway`, each worker by backend name) -> CPU seconds
    (user + system, all threads) spent during the flood."""


async def one_fleet(args: argparse.Namespace, emulate_latency_ms: float) -> Run:
    """Starts the gateway on the fleet whose workers add `emulate_latency_ms` per row,
    measures its capacity, then floods it."""
    with tempfile.TemporaryDirectory(prefix="switchyard-overload-gateway-") as tmp:
        work = Path(tmp)
        fleet = work / "fleet.yaml"
        repository = args.repository.resolve()
        fleet.write_text(fleet_yaml(repository, args.model, args.sla_ms, emulate_latency_ms))
        ready = work / "ready.json"
        with Child("gateway", serve_command(fleet, ready), work, ROOT) as gateway:
            described = gateway.wait_ready_file(ready, STARTUP_TIMEOUT_S)
            target = str(described["address"])
            if not described.get("probes_port"):
                raise BenchError("the gateway's ready file names no probes port")
            probes_target = f"127.0.0.1:{described['probes_port']}"
            capacity = await asyncio.to_thread(measure_capacity, args, target, work)
            if capacity.throughput_per_s <= 0:
                raise BenchError(f"the fleet answered nothing OK: {capacity}")
            rate = args.rate or capacity.throughput_per_s * args.factor
            servers = {"gateway": gateway.process.pid}
            servers.update((name, int(pid)) for name, pid in described.get("pids", {}).items())
            sent, probe_port, inference_port, cpu_s = await flood(
                args, target, probes_target, rate, work, servers
            )
            if gateway.exited() is not None:
                raise gateway.failure("the gateway ended under the flood")
    return Run(emulate_latency_ms, capacity, sent, probe_port, inference_port, cpu_s)


async def bench(args: argparse.Namespace) -> list[Run]:
    return [await one_fleet(args, delay) for delay in args.emulate_latency_ms]


# ---- the report -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Figures:
    """What the section reports, from one run."""

    calls: int
    offered_per_s: float
    achieved_per_s: float
    send_lag_p99_ms: float
    window_s: float
    """From the first call sent to the last one answered."""
    ok_ms: list[float]
    shed_ms: list[float]
    shed_reasons: dict[str, int]
    other: dict[str, int]
    unanswered: int


def _shed_reason(message: str) -> str:
    if "meets p" in message:
        return "SLA infeasible (policy reject)"
    if "queue limit" in message:
        return "gateway queue full"
    if "queue full" in message:
        return "worker queue full"
    return "other"


def figures(sent: Sent) -> Figures:
    n = len(sent.sent_s)
    ok_ms: list[float] = []
    shed_ms: list[float] = []
    other: Counter[str] = Counter()
    for s, a, code in zip(sent.sent_s, sent.answered_s, sent.codes, strict=True):
        if a is None:
            continue
        if code == "OK":
            ok_ms.append((a - s) * 1000)
        elif code == "RESOURCE_EXHAUSTED":
            shed_ms.append((a - s) * 1000)
        else:
            other[code] += 1
    reasons: Counter[str] = Counter()
    for message, count in sent.messages.items():
        if message.startswith("RESOURCE_EXHAUSTED"):
            reasons[_shed_reason(message)] += count
    lag_ms = (  # open loop only: a closed loop has no schedule
        [(s - (sent.scheduled_s + i / sent.rate_per_s)) * 1000 for i, s in enumerate(sent.sent_s)]
        if sent.rate_per_s > 0
        else []
    )
    answered = [a for a in sent.answered_s if a is not None]
    first, last = sent.sent_s[0], sent.sent_s[-1]
    return Figures(
        calls=n,
        offered_per_s=sent.rate_per_s,
        achieved_per_s=(n - 1) / (last - first) if n > 1 and last > first else math.nan,
        send_lag_p99_ms=percentile(lag_ms, 99),
        window_s=max(answered, default=last) - first,
        ok_ms=ok_ms,
        shed_ms=shed_ms,
        shed_reasons=dict(reasons),
        other=dict(other),
        unanswered=sum(1 for a in sent.answered_s if a is None),
    )


def _during(run: Run, probes: Sequence[Probe], kind: str) -> list[Probe]:
    sent = run.sent
    answered = [a for a in sent.answered_s if a is not None]
    first, last = sent.sent_s[0], max(answered, default=sent.sent_s[-1])
    return [p for p in probes if p.kind == kind and first <= p.sent_s <= last]


def _ms(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{percentile(values, 50):,.1f} / {percentile(values, 99):,.1f} / {max(values):,.1f}"


@dataclass(frozen=True, slots=True)
class Verdicts:
    """One run's figures against the targets."""

    ok_rate_per_s: float
    ok_p99_ms: float
    within_sla: float
    """Share of the answers OK within the SLA."""
    shed_p99_ms: float
    shed_max_ms: float
    within_shed: float
    """Share of the shed calls answered within SHED_TARGET_MS."""
    probe_port_ms: list[float]
    """Readiness latencies on the probe port during the flood (both kinds)."""
    probe_port_failed: int
    inference_port_ms: list[float]
    goodput_met: bool
    sla_met: bool
    shed_met: bool
    ready_met: bool
    clean_met: bool


def verdicts(run: Run, sla_ms: float) -> Verdicts:
    f = figures(run.sent)
    cap = run.capacity.throughput_per_s
    ok_rate = len(f.ok_ms) / f.window_s if f.window_s > 0 else math.nan
    probe_port = [p for kind in ("ready", "health") for p in _during(run, run.probe_port, kind)]
    inference = [p for kind in ("ready", "health") for p in _during(run, run.inference_port, kind)]
    probe_ms = [p.latency_ms for p in probe_port]
    failed = sum(1 for p in probe_port if p.code != "OK")
    ok_p99 = percentile(f.ok_ms, 99)
    shed_p99 = percentile(f.shed_ms, 99)
    return Verdicts(
        ok_rate_per_s=ok_rate,
        ok_p99_ms=ok_p99,
        within_sla=sum(1 for v in f.ok_ms if v <= sla_ms) / len(f.ok_ms) if f.ok_ms else 0.0,
        shed_p99_ms=shed_p99,
        shed_max_ms=max(f.shed_ms, default=math.nan),
        within_shed=(
            sum(1 for v in f.shed_ms if v <= SHED_TARGET_MS) / len(f.shed_ms) if f.shed_ms else 0.0
        ),
        probe_port_ms=probe_ms,
        probe_port_failed=failed,
        inference_port_ms=[p.latency_ms for p in inference],
        goodput_met=ok_rate >= GOODPUT_TARGET * cap,
        sla_met=ok_p99 <= sla_ms,
        shed_met=shed_p99 <= SHED_TARGET_MS,
        ready_met=bool(probe_ms) and max(probe_ms) <= READY_TARGET_MS and failed == 0,
        clean_met=not f.other and f.unanswered == 0,
    )


def _p99_max(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{percentile(values, 99):,.0f} / {max(values):,.0f}"


def _run_details(args: argparse.Namespace, run: Run) -> list[str]:
    f = figures(run.sent)
    v = verdicts(run, args.sla_ms)
    cap = run.capacity
    answers = [
        ["OK", f"{len(f.ok_ms):,}", _ms(f.ok_ms), f"{v.within_sla:.1%} within the SLA"],
        *(
            [f"RESOURCE_EXHAUSTED: {reason}", f"{count:,}", "", ""]
            for reason, count in sorted(f.shed_reasons.items())
        ),
        [
            "RESOURCE_EXHAUSTED, all",
            f"{len(f.shed_ms):,}",
            _ms(f.shed_ms),
            f"{v.within_shed:.1%} within {SHED_TARGET_MS:g} ms; {run.sent.pushback:,} with a "
            "pushback trailer",
        ],
        *([code, f"{count:,}", "", ""] for code, count in sorted(f.other.items())),
        ["unanswered", f"{f.unanswered:,}", "", ""],
    ]
    probe_rows = [
        latency_row(f"{label}, {port}", _during(run, probes, kind))
        for port, probes in (("probe port", run.probe_port), ("inference port", run.inference_port))
        for kind, label in (("ready", "ServerReady"), ("health", "health Check"))
    ]
    cpu = ", ".join(f"{name} {s * 1e6 / f.calls:,.0f}" for name, s in run.cpu_s.items())
    return [
        f"### Workers adding {run.emulate_latency_ms:g} ms per row",
        "",
        f"- Capacity: {cap.throughput_per_s:,.0f} answers OK/s (p50 "
        f"{cap.latency_p50_ms:.1f} ms, p99 {cap.latency_p99_ms:.1f} ms; {cap.errors:,} calls "
        "shed meanwhile).",
        f"- Flood: {f.calls:,} calls at {f.offered_per_s:,.0f}/s "
        f"({f.offered_per_s / cap.throughput_per_s:.1f}x capacity), sent at "
        f"{f.achieved_per_s:,.0f}/s (p99 lag behind schedule {f.send_lag_p99_ms:.1f} ms); the "
        f"last answered {f.window_s:.1f} s after the first was sent; answers OK "
        f"{v.ok_rate_per_s:,.0f}/s over that time.",
        f"- CPU time during the flood per call sent (microseconds, user + system): {cpu}.",
        "",
        markdown_table(
            ["answers", "calls", "ms p50 / p99 / max", ""], answers, (False, True, True, False)
        ),
        "",
        markdown_table(
            ["probe during the flood", "probes", "p50 ms", "p99 ms", "max ms", "> 1 s", "failed"],
            probe_rows,
        ),
        "",
    ]


def section(args: argparse.Namespace, runs: Sequence[Run], took_s: float) -> str:
    def mark(met: bool) -> str:
        return "" if met else " (missed)"

    summary = []
    for run in runs:
        f = figures(run.sent)
        v = verdicts(run, args.sla_ms)
        cap = run.capacity.throughput_per_s
        summary.append(
            [
                f"{run.emulate_latency_ms:g}",
                f"{cap:,.0f}",
                f"{f.offered_per_s:,.0f} ({f.offered_per_s / cap:.1f}x), "
                f"sent {f.achieved_per_s:,.0f}",
                f"{v.ok_rate_per_s / cap:.2f}{mark(v.goodput_met)}",
                f"{v.ok_p99_ms:,.0f}{mark(v.sla_met)}, {v.within_sla:.1%}",
                f"{v.shed_p99_ms:,.0f}{mark(v.shed_met)} / {v.shed_max_ms:,.0f}, "
                f"{v.within_shed:.1%}",
                _p99_max(v.probe_port_ms) + mark(v.ready_met),
                _p99_max(v.inference_port_ms),
                f"{sum(f.other.values())}, {f.unanswered}{mark(v.clean_met)}",
            ]
        )
    delays = " ".join(f"{run.emulate_latency_ms:g}" for run in runs)
    command = (
        f"python -m gateway.bench.overload_gateway --model {args.model} --sla-ms "
        f"{args.sla_ms:g} --emulate-latency-ms {delays} "
        + (f"--rate {args.rate:g}" if args.rate else f"--factor {args.factor:g}")
        + f" --duration-s {args.duration_s:g} --channels {args.channels} "
        f"--capacity-concurrency {args.capacity_concurrency} --capacity-s {args.capacity_s:g}"
    )
    lines = [
        "## Gateway under overload",
        "",
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC (run took {took_s:.0f} s); Python "
        f"{platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs shared with "
        "whatever else runs (load average over the last minute at the end: "
        f"{os.getloadavg()[0]:.1f}): the sending process, the gateway and both workers share "
        "them.",
        f"- Command: `{command}` (`make bench` runs it).",
        f"- Target: at {args.factor:g}x the fleet's capacity, the requests within capacity "
        f"answered OK at their SLA, the rest shed within {SHED_TARGET_MS:g} ms of arrival; "
        f"readiness answered within {READY_TARGET_MS:g} ms throughout.",
        "- The fleet: `switchyard serve` with two launched workers as in the demo fleet (1 "
        f"and 2 inference threads, default queue limits) serving `{args.model}` (fp32) only, "
        f"its policy `{{latency_ms: {args.sla_ms:g}, on_infeasible: reject}}`, the probe port "
        "on. The workers stand for slower hardware, adding a delay per row (one row per "
        "fleet below), so that 10x their capacity is a rate one sending process can offer "
        "here: the demo models run in under a millisecond, and unslowed the gateway itself "
        "is the fleet's bottleneck. Emulated hardware gains nothing from batching: "
        "`max_batch_rows: 1`, `coalesce_in_flight: 0`, `slots: 1`.",
        f"- Capacity: closed loop at concurrency {args.capacity_concurrency}, a shed call "
        "sent again after the wait its pushback trailer asks: the answers OK a second to the "
        f"calls sent in {args.capacity_s:g} s after 1 s of warm-up. Flood: ModelInfer calls evenly "
        f"spaced at {args.factor:g}x that for {args.duration_s:g} s over {args.channels} "
        "connections from a process of their own, each call's send time, answer time and "
        f"status recorded; ServerReady and health Check alternating on each port meanwhile, "
        f"{PROBE_INTERVAL_S * 1000:g} ms apart. Times in ms are the sender's, send to answer "
        "(the sending process's own delays included); nearest-rank percentiles.",
        "",
        markdown_table(
            [
                "ms per row",
                "capacity OK/s",
                "offered /s",
                "OK/s during flood / capacity",
                f"OK p99 ms, within SLA {args.sla_ms:g} ms",
                f"shed p99 / max ms, within {SHED_TARGET_MS:g} ms",
                "probe port p99 / max ms",
                "inference port p99 / max ms",
                "other statuses, unanswered",
            ],
            summary,
        ),
        "",
        "(missed): a target not met in that run.",
        "",
    ]
    for run in runs:
        lines += _run_details(args, run)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["send"]:
        return send_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m gateway.bench.overload_gateway", description=__doc__
    )
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="resnet", help="a model of one FP32 input")
    parser.add_argument("--sla-ms", type=float, default=100.0, help="the model's latency SLA")
    parser.add_argument(
        "--emulate-latency-ms",
        type=float,
        nargs="+",
        default=[20.0],
        help="service time the workers add per row (slower hardware), which sets the "
        "capacity; several: one fleet each, one after the other",
    )
    parser.add_argument("--factor", type=float, default=10.0, help="offered rate / capacity")
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="offered calls a second (default: --factor x capacity)",
    )
    parser.add_argument("--duration-s", type=float, default=5.0, help="how long the flood is")
    parser.add_argument("--channels", type=int, default=8, help="the flood's connections")
    parser.add_argument("--capacity-concurrency", type=int, default=32)
    parser.add_argument("--capacity-s", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=None, help="BENCHMARKS.md to update")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        runs = asyncio.run(bench(args))
    except BenchError as exc:
        print(f"gateway overload bench: {exc}", file=sys.stderr)
        return 1
    body = section(args, runs, time.monotonic() - started)
    publish(body, args.out, BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
