"""The overload section of BENCHMARKS.md: how fast a backend worker says it is ready
while a flood of inference requests arrives at once, and how the flood is answered.

    python -m gateway.bench.overload [--model resnet] [--requests 3000] [--out BENCHMARKS.md]

Starts one backend worker (`python -m backends.worker.server`, its defaults but the
model served) and waits for it to serve. Then, each round: a flood process opens its
connections, builds its requests and sends them all at once (`--requests` ModelInfer
calls on `--channels` connections, one sample row each), while this process asks
ServerReady and grpc.health.v1's Check, one after the other, each timed from send
to answer (5 s deadline), until the flood is answered. The probes sent while the
flood was in flight give readiness latency under overload (p50, p99, max and how
many took over 1 s, a Kubernetes probe's default timeout); the flood's answers are
counted by status code, with how many shed calls carried a `grpc-retry-pushback-ms`
trailer. Runs before the flood give the quiet latency.

`python -m gateway.bench.overload flood --target HOST:PORT ...` is the flood process
alone, printing one JSON line. Clocks: `time.monotonic` in both processes (one
system-wide clock), so probes are matched to the flood by time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.bench.harness import BenchError, Child
from gateway.bench.report import publish
from gateway.report.markdown import markdown_table
from gateway.routing.percentiles import percentile
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
BEGIN = "<!-- overload: written by `python -m gateway.bench.overload` -->"
END = "<!-- /overload -->"
STARTUP_TIMEOUT_S = 90.0
PROBE_TIMEOUT_S = 5.0
"""A probe's deadline: one that takes longer counts as failed (DEADLINE_EXCEEDED)."""
FLOOD_TIMEOUT_S = 120.0
"""A flood call's deadline, and the longest a round waits for the flood to end."""
KUBERNETES_PROBE_TIMEOUT_S = 1.0
"""A Kubernetes probe's default timeoutSeconds."""
PUSHBACK_KEY = "grpc-retry-pushback-ms"


@dataclass(frozen=True, slots=True)
class FloodResult:
    """What the flood process saw: its answers by status code, when it fired and
    ended (time.monotonic), and the pushback trailers on shed calls."""

    requests: int
    codes: dict[str, int]
    messages: dict[str, int]
    """`CODE: message` of the answers but OK -> how many."""
    pushback: int
    """Answers RESOURCE_EXHAUSTED with a `grpc-retry-pushback-ms` trailer."""
    pushback_ms_max: int
    fired_s: float
    done_s: float


@dataclass(frozen=True, slots=True)
class Probe:
    kind: str
    """`ready` (ServerReady) or `health` (grpc.health.v1 Check)."""
    sent_s: float
    latency_ms: float
    code: str


@dataclass(slots=True)
class Round:
    flood: FloodResult
    probes: list[Probe] = field(default_factory=list)

    def during(self, kind: str) -> list[Probe]:
        """The probes of `kind` sent while the flood was in flight."""
        return [
            p
            for p in self.probes
            if p.kind == kind and self.flood.fired_s <= p.sent_s <= self.flood.done_s
        ]


def flood_request(repository: Path, model: str) -> pb.ModelInferRequest:
    """One row of the model's first sample input (a model of one input)."""
    samples = repository / model / "samples" / "inputs.npz"
    with np.load(samples) as data:
        name = data.files[0]
        row = np.ascontiguousarray(data[name][:1], dtype=np.float32)
    request = pb.ModelInferRequest(model_name=model, id="flood")
    tensor = request.inputs.add(name=name, datatype="FP32")
    tensor.shape.extend(row.shape)
    request.raw_input_contents.append(row.tobytes())
    return request


async def flood(
    target: str, request: pb.ModelInferRequest, requests: int, channels: int
) -> FloodResult:
    """Sends `requests` copies of `request` at once over `channels` connections."""
    opened = [
        # Distinct options keep each channel on a connection of its own.
        grpc.aio.insecure_channel(target, options=[("switchyard.flood_channel", i)])
        for i in range(channels)
    ]
    try:
        for channel in opened:
            await asyncio.wait_for(channel.channel_ready(), STARTUP_TIMEOUT_S)
        stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in opened]
        codes: Counter[str] = Counter()
        messages: Counter[str] = Counter()
        pushback: list[int] = []

        async def one(i: int) -> None:
            call = stubs[i % channels].ModelInfer(request, timeout=FLOOD_TIMEOUT_S)
            try:
                await call
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                name = exc.code().name
                codes[name] += 1
                messages[f"{name}: {exc.details()}"] += 1
                trailers = dict(exc.trailing_metadata() or ())
                if PUSHBACK_KEY in trailers:
                    pushback.append(int(trailers[PUSHBACK_KEY]))

        fired = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(requests)))
        done = time.monotonic()
    finally:
        for channel in opened:
            await channel.close()
    return FloodResult(
        requests, dict(codes), dict(messages), len(pushback), max(pushback, default=0), fired, done
    )


async def probe_until(target: str, stop: asyncio.Event, interval_s: float = 0.005) -> list[Probe]:
    """ServerReady and health Check, one after the other (`interval_s` apart), until
    `stop` is set."""
    probes: list[Probe] = []
    async with grpc.aio.insecure_channel(target) as channel:
        inference = pb_grpc.GRPCInferenceServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        kinds = ("ready", "health")
        n = 0
        while not stop.is_set():
            kind = kinds[n % 2]
            n += 1
            sent = time.monotonic()
            code = "OK"
            try:
                if kind == "ready":
                    reply = await inference.ServerReady(
                        pb.ServerReadyRequest(), timeout=PROBE_TIMEOUT_S
                    )
                    code = "OK" if reply.ready else "NOT_READY"
                else:
                    check = await health.Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=PROBE_TIMEOUT_S
                    )
                    serving = check.status == health_pb2.HealthCheckResponse.SERVING
                    code = "OK" if serving else "NOT_SERVING"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            probes.append(Probe(kind, sent, (time.monotonic() - sent) * 1000, code))
            await asyncio.sleep(interval_s)  # a probe every few ms: the flood gets the CPU
    return probes


async def one_round(args: argparse.Namespace, target: str, work: Path, n: int) -> Round:
    """Probes while a flood process runs; the probes before it give the quiet latency."""
    stop = asyncio.Event()
    prober = asyncio.create_task(probe_until(target, stop))
    command = [
        sys.executable,
        "-m",
        "gateway.bench.overload",
        "flood",
        "--target",
        target,
        "--repository",
        str(args.repository),
        "--model",
        args.model,
        "--requests",
        str(args.requests),
        "--channels",
        str(args.channels),
    ]
    with Child(f"flood{n}", command, work, ROOT) as child:
        deadline = time.monotonic() + FLOOD_TIMEOUT_S + STARTUP_TIMEOUT_S
        while child.exited() is None:
            if time.monotonic() > deadline:
                raise child.failure("the flood did not end")
            await asyncio.sleep(0.05)
        stop.set()
        probes = await prober
        if child.exited() != 0:
            raise child.failure("the flood failed")
        result = FloodResult(**json.loads(child.stdout_path.read_text().splitlines()[-1]))
    return Round(result, probes)


def latency_row(label: str, probes: Sequence[Probe]) -> list[str]:
    ms = [p.latency_ms for p in probes]
    failed = Counter(p.code for p in probes if p.code != "OK")
    slow = sum(1 for v in ms if v > KUBERNETES_PROBE_TIMEOUT_S * 1000)
    return [
        label,
        str(len(ms)),
        f"{percentile(ms, 50):.1f}",
        f"{percentile(ms, 99):.1f}",
        f"{max(ms, default=float('nan')):.1f}",
        str(slow),
        ", ".join(f"{code} {count}" for code, count in sorted(failed.items())) or "-",
    ]


def section(args: argparse.Namespace, rounds: Sequence[Round], took_s: float) -> str:
    quiet = [p for r in rounds for p in r.probes if p.sent_s < r.flood.fired_s]
    latency_rows = [
        latency_row("ServerReady, quiet", [p for p in quiet if p.kind == "ready"]),
        latency_row("ServerReady, flooded", [p for r in rounds for p in r.during("ready")]),
        latency_row("health Check, quiet", [p for p in quiet if p.kind == "health"]),
        latency_row("health Check, flooded", [p for r in rounds for p in r.during("health")]),
    ]
    flood_rows = []
    for i, r in enumerate(rounds, 1):
        f = r.flood
        flood_rows.append(
            [
                str(i),
                f"{f.requests:,}",
                ", ".join(f"{code} {count}" for code, count in sorted(f.codes.items())),
                f"{f.done_s - f.fired_s:.2f}",
                f"{f.pushback} (max {f.pushback_ms_max} ms)" if f.pushback else "0",
            ]
        )
    messages: Counter[str] = Counter()
    for r in rounds:
        messages.update(r.flood.messages)
    lines = [
        "## Readiness under overload",
        "",
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC (run took {took_s:.0f} s); Python "
        f"{platform.python_version()}, {platform.machine()}, the machine shared with "
        "whatever else runs.",
        f"- Command: `python -m gateway.bench.overload --model {args.model} --requests "
        f"{args.requests} --channels {args.channels} --rounds {args.rounds} --threads "
        f"{args.threads}`.",
        f"- One backend worker ({args.threads} inference threads, its default queue and "
        f"concurrency limits, model `{args.model}` only). Each round a second process "
        f"sends {args.requests:,} ModelInfer calls at once over {args.channels} "
        "connections while this one alternates ServerReady and grpc.health.v1 Check "
        f"(each with a {PROBE_TIMEOUT_S:g} s deadline). Latency in ms, nearest rank; "
        "`> 1 s`: probes that would fail a Kubernetes probe's default 1 s timeout.",
        "",
        markdown_table(
            ["probe", "probes", "p50 ms", "p99 ms", "max ms", "> 1 s", "failed"], latency_rows
        ),
        "",
        markdown_table(
            ["round", "flood", "answers", "flood s", "shed with pushback trailer"], flood_rows
        ),
        "",
        "Answers other than OK, over all rounds:",
        "",
        *(f"- {count:,} x `{m}`" for m, count in sorted(messages.items())),
        "",
    ]
    return "\n".join(lines)


def worker_command(args: argparse.Namespace) -> list[str]:
    return [
        sys.executable,
        "-m",
        "backends.worker.server",
        "--repository",
        str(args.repository),
        "--listen",
        "127.0.0.1:0",
        "--threads",
        str(args.threads),
        "--hardware-class",
        "bench",
        "--models",
        args.model,
        *args.worker_arg,
    ]


async def bench(args: argparse.Namespace) -> list[Round]:
    with tempfile.TemporaryDirectory(prefix="switchyard-overload-") as tmp:
        work = Path(tmp)
        with Child("backend", worker_command(args), work, ROOT) as worker:
            target = worker.wait_listening(STARTUP_TIMEOUT_S)
            rounds = []
            for n in range(args.rounds):
                rounds.append(await one_round(args, target, work, n))
                if worker.exited() is not None:
                    raise worker.failure("the worker ended under the flood")
            return rounds


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="resnet", help="a model of one FP32 input")
    parser.add_argument("--requests", type=int, default=3000, help="calls sent at once")
    parser.add_argument("--channels", type=int, default=8, help="connections they share")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["flood"]:
        parser = argparse.ArgumentParser(prog="python -m gateway.bench.overload flood")
        parser.add_argument("--target", required=True, help="HOST:PORT of a v2 gRPC server")
        add_common(parser)
        args = parser.parse_args(argv[1:])
        request = flood_request(args.repository, args.model)
        result = asyncio.run(flood(args.target, request, args.requests, args.channels))
        print(json.dumps(asdict(result)), flush=True)
        return 0
    parser = argparse.ArgumentParser(prog="python -m gateway.bench.overload", description=__doc__)
    add_common(parser)
    parser.add_argument("--threads", type=int, default=2, help="the worker's inference threads")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        help="one more argument for the worker (repeat), e.g. --worker-arg=--max-queue=64",
    )
    parser.add_argument("--out", type=Path, default=None, help="BENCHMARKS.md to update")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        rounds = asyncio.run(bench(args))
    except BenchError as exc:
        print(f"overload bench: {exc}", file=sys.stderr)
        return 1
    body = section(args, rounds, time.perf_counter() - started)
    publish(body, args.out, BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
