"""The REST binding's section of BENCHMARKS.md: the gateway's Open Inference Protocol
HTTP/REST endpoint against its own gRPC one and against KServe 0.21's REST server, and
the HTTP stack under it chosen by measurement.

    python -m gateway.bench.rest [--model digits] [--concurrency 8] [--rounds 3]
        [--duration-s 6] [--out BENCHMARKS.md]

The targets: REST throughput at least 0.7x the gateway's own gRPC throughput, and at
least 1.2x KServe 0.21's REST server serving the same model directly, at concurrency 8
on a small model (digits: 64 floats in), binary tensors.

One run, one machine, everything side by side:
1. `switchyard serve` on a fleet of one launched worker (one ONNX Runtime thread) serving
   `--model`, every port 0 and read back from `--ready-file`; beside it KServe's REST
   server (`kserve_peer.py --rest`, its own virtualenv, one ONNX Runtime thread) on the
   same ONNX file. Both stay up; the loads take turns on them, `--rounds` times, the
   order reversed every other round, so the machine's noise shows as a range.
2. gateway gRPC against gateway REST: Triton's perf_analyzer at `--concurrency`, `-i grpc`
   then `-i http` (binary tensor data both ways, its default over HTTP), the same binary
   and the same windows; the gateway's and its worker's CPU time read from /proc meanwhile.
3. gateway REST against KServe REST: perf_analyzer cannot drive KServe (it asks for the
   model's configuration first, which KServe does not serve), so both are driven by this
   module's own load generator (`python -m gateway.bench.rest load`, a process of its own:
   raw HTTP/1.1 keep-alive connections on uvloop in a closed loop, one request body of
   Triton's binary tensor data built once, the answers' statuses checked).
4. the HTTP stack: a trivial ASGI app (a fixed small JSON body) and the gateway's own REST
   app (inference on a fleet like 1's) under uvicorn with httptools, uvicorn with h11 and
   granian (embedded, on the same loop), each in a process of its own
   (`python -m gateway.bench.rest stack`) run by one interpreter: a virtualenv
   (`.bench/granian-venv`) holding granian and seeing this project's packages, so the
   three stacks share every other package; driven by the load generator.

Imports no generated protobuf code, tritonclient nor KServe: those run in processes of
their own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import math
import os
import platform
import shlex
import shutil
import site
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np

from gateway.bench import harness
from gateway.bench.harness import BenchError, Child, serve_command
from gateway.bench.loadgen import cpu_seconds
from gateway.bench.report import publish
from gateway.report.markdown import markdown_table
from gateway.routing.percentiles import percentile

ROOT = Path(__file__).resolve().parents[2]
BEGIN = "<!-- rest: written by `python -m gateway.bench.rest` -->"
END = "<!-- /rest -->"
STARTUP_TIMEOUT_S = 120.0
REST_VS_GRPC_TARGET = 0.7
"""Gateway REST throughput over the gateway's gRPC throughput, at least."""
REST_VS_KSERVE_TARGET = 1.2
"""Gateway REST throughput over KServe's REST server's, at least."""
STACKS = ("uvicorn-httptools", "uvicorn-h11", "granian")
"""The HTTP servers measured under the same ASGI apps; the first is the gateway's."""
GRANIAN = "granian==2.8.9"
STACK_MARGIN = 0.10
"""Another stack replaces the gateway's only when its inference throughput beats it by
more than this share (less is within this machine's noise, and not worth a dependency)."""
HELLO_PATH = "/v2/health/ready"
HELLO_BODY = b'{"ready":true}'
CPU_SAMPLE_INTERVAL_S = 0.2
PA_SKIP_S = 1.0
"""CPU time during perf_analyzer is taken from this long after it starts (its start-up
and first connections) to its last sample but one."""

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# ---- the HTTP load generator (its own process) -----------------------------------------


@dataclass(frozen=True, slots=True)
class HttpLoad:
    """What the load generator measured in its window."""

    concurrency: int
    requests: int
    """Answers (any status) in the window."""
    window_s: float
    throughput_per_s: float
    """Answers 200 a second in the window."""
    latency_p50_ms: float
    latency_p99_ms: float
    errors: int
    """Answers other than 200, and connections lost, in the whole run."""
    first_error: str
    cpu_us_per_request: dict[str, float] = field(default_factory=dict)
    """Process -> CPU microseconds (user + system, all threads) per answer in the window;
    `client` is the load generator itself."""


def http_request(
    host: str, path: str, body: bytes | None, headers: Sequence[tuple[str, str]] = ()
) -> bytes:
    """One HTTP/1.1 keep-alive request's bytes: POST with `body`, GET without."""
    lines = [f"{'GET' if body is None else 'POST'} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


class _Run:
    """One closed-loop run: the request every connection sends, what came back."""

    def __init__(self, request: bytes, connections: int) -> None:
        self.request = request
        self.end_s = math.inf
        self.answered_s: list[float] = []
        self.latency_s: list[float] = []
        self.statuses: list[int] = []
        self.errors = 0
        self.first_error = ""
        self.open = connections
        self.closed = asyncio.get_running_loop().create_future()

    def error(self, what: str) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = what

    def answer(self, sent_s: float, answered_s: float, status: int, body: bytes) -> None:
        self.answered_s.append(answered_s)
        self.latency_s.append(answered_s - sent_s)
        self.statuses.append(status)
        if status != 200:
            self.error(f"HTTP {status}: {body[:300].decode(errors='replace')}")

    def lost(self) -> None:
        self.open -= 1
        if self.open == 0 and not self.closed.done():
            self.closed.set_result(None)


def _answer_end(buffer: bytearray, head_end: int) -> int | None:
    """Where the answer whose head ends at `head_end` ends in `buffer` (its
    Content-Length, or its chunks: KServe answers chunked); None: not all in yet.
    ValueError when the answer says neither."""
    head = bytes(buffer[:head_end]).lower()
    body = head_end + 4
    at = head.find(b"\r\ncontent-length:")
    if at >= 0:
        stop = head.find(b"\r\n", at + 2)
        end = body + int(head[at + 17 : stop if stop >= 0 else None])
        return end if len(buffer) >= end else None
    if b"\r\ntransfer-encoding: chunked" not in head:
        raise ValueError("an answer with neither Content-Length nor chunks")
    at = body
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            return None
        size = int(bytes(buffer[at:line_end]).split(b";")[0], 16)
        at = line_end + 2 + size + 2  # the chunk and its CRLF (no trailers)
        if len(buffer) < at:
            return None
        if size == 0:
            return at


class _Stream(asyncio.Protocol):
    """One keep-alive connection: sends the request, reads its whole answer (its
    Content-Length), sends it again, until the run's end."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.buffer = bytearray()
        self.sent_s = 0.0
        self.transport: asyncio.Transport | None = None
        self.stopped = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass

    def send(self) -> None:
        assert self.transport is not None
        now = time.perf_counter()
        if now >= self.run.end_s:
            self.stopped = True
            self.transport.close()
            return
        self.sent_s = now
        self.transport.write(self.run.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            try:
                total = _answer_end(self.buffer, head_end)
            except ValueError as exc:
                self.run.error(str(exc))
                self.stopped = True
                assert self.transport is not None
                self.transport.close()
                return
            if total is None:
                return
            now = time.perf_counter()
            try:
                status = int(self.buffer[9:12])
            except ValueError:
                status = 0
            body = bytes(self.buffer[head_end + 4 : total]) if status != 200 else b""
            del self.buffer[:total]
            self.run.answer(self.sent_s, now, status, body)
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.stopped:
            self.run.error(f"connection lost: {exc or 'closed by the server'}")
        self.run.lost()


async def closed_loop_http(
    target: str,
    request: bytes,
    concurrency: int,
    warmup_s: float,
    window_s: float,
    cpu_pids: dict[str, int] | None = None,
) -> HttpLoad:
    """`concurrency` connections to `target` (HOST:PORT), each sending `request` again as
    soon as its answer is in, for `warmup_s` then a `window_s` window: throughput and
    latencies of the answers in the window, and the CPU time of `cpu_pids` (and of this
    process, `client`) spent in it per answer."""
    loop = asyncio.get_running_loop()
    host, port = target.rsplit(":", 1)
    run = _Run(request, concurrency)
    streams: list[_Stream] = []
    for _ in range(concurrency):
        transport, stream = await loop.create_connection(lambda: _Stream(run), host, int(port))
        stream.transport = transport  # uvloop may call connection_made after this returns
        streams.append(stream)
    pids = dict(cpu_pids or {})
    pids["client"] = os.getpid()
    for stream in streams:
        stream.send()
    await asyncio.sleep(warmup_s)
    begin_s = time.perf_counter()
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    await asyncio.sleep(window_s)
    end_s = time.perf_counter()
    cpu_after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    run.end_s = end_s
    try:
        await asyncio.wait_for(asyncio.shield(run.closed), 30.0)
    except TimeoutError:
        run.error("answers still missing 30 s after the window")
        for stream in streams:
            stream.stopped = True
            if stream.transport is not None:
                stream.transport.abort()
    in_window = [
        (latency, status)
        for answered, latency, status in zip(
            run.answered_s, run.latency_s, run.statuses, strict=True
        )
        if begin_s <= answered < end_s
    ]
    ok_ms = [latency * 1000 for latency, status in in_window if status == 200]
    elapsed_s = end_s - begin_s
    answers = len(in_window)
    return HttpLoad(
        concurrency=concurrency,
        requests=answers,
        window_s=elapsed_s,
        throughput_per_s=len(ok_ms) / elapsed_s,
        latency_p50_ms=percentile(ok_ms, 50),
        latency_p99_ms=percentile(ok_ms, 99),
        errors=run.errors,
        first_error=run.first_error,
        cpu_us_per_request={
            name: (cpu_after[name] - cpu_before[name]) * 1e6 / answers if answers else math.nan
            for name in pids
        },
    )


def load_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.bench.rest load",
        description="closed-loop HTTP/1.1 load: prints one JSON line of what it measured",
    )
    parser.add_argument("--target", required=True, help="HOST:PORT")
    parser.add_argument("--path", required=True)
    parser.add_argument("--body", type=Path, default=None, help="POST this file (else GET)")
    parser.add_argument("--header", action="append", default=[], metavar="NAME: VALUE")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--window-s", type=float, default=5.0)
    parser.add_argument("--cpu-pid", action="append", default=[], metavar="NAME=PID")
    args = parser.parse_args(argv)
    body = None if args.body is None else args.body.read_bytes()
    headers = []
    for header in args.header:
        name, colon, value = header.partition(":")
        if not colon:
            parser.error(f"--header {header!r} is not NAME: VALUE")
        headers.append((name.strip(), value.strip()))
    request = http_request(args.target, args.path, body, headers)
    pids = {name: int(pid) for name, pid in (item.split("=", 1) for item in args.cpu_pid)}
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    result = asyncio.run(
        closed_loop_http(args.target, request, args.concurrency, args.warmup_s, args.window_s, pids)
    )
    print(json.dumps(asdict(result)), flush=True)
    return 0


# ---- the HTTP stacks (a process each) --------------------------------------------------


async def hello_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The trivial ASGI app: any request's body read, a fixed small JSON answer."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        more = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(HELLO_BODY)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": HELLO_BODY})


def _listening(address: str, **extra: object) -> None:
    event = {"event": "listening", "address": address, "pid": os.getpid(), **extra}
    print(json.dumps(event), flush=True)


async def serve_stack(server: str, app: ASGIApp) -> None:
    """Serves `app` with `server` on 127.0.0.1 port 0, on the running loop; prints the
    listening line and serves until the process is ended."""
    if server.startswith("uvicorn-"):
        from gateway.serving.rest import bind_listener, uvicorn_server

        listener = bind_listener("127.0.0.1:0")
        # The gateway's own listener's settings (gateway.serving.rest.RestServer).
        running = uvicorn_server(app, server.removeprefix("uvicorn-"))
        await running.startup(sockets=[listener])
        _listening(f"127.0.0.1:{listener.getsockname()[1]}", server=server)
        await running.main_loop()
    elif server == "granian":
        # Only in the granian virtualenv (ensure_granian_venv).
        from granian.constants import HTTPModes, Interfaces  # type: ignore[import-not-found]
        from granian.log import LogLevels  # type: ignore[import-not-found]
        from granian.net import SocketSpec  # type: ignore[import-not-found]
        from granian.server.embed import Server  # type: ignore[import-not-found]

        class OneListener(Server):  # type: ignore[misc]
            """On Linux granian binds in each worker from its listener's spec (port 0
            would be a port nobody knows); here the one worker takes a listener bound
            once, as granian does elsewhere, whose port is read back."""

            def _init_shared_socket(self) -> None:
                self._shd = SocketSpec(self.bind_addr, self.bind_port, self.backlog).build()
                self._sfd = self._shd.get_fd()
                self._ssp = None

        granian_server = OneListener(
            app,
            address="127.0.0.1",
            port=0,
            interface=Interfaces.ASGINL,
            http=HTTPModes.http1,
            log_access=False,
            log_level=LogLevels.warning,
        )
        serving = asyncio.get_running_loop().create_task(granian_server.serve())
        while getattr(granian_server, "_sfd", None) is None:
            if serving.done():
                await serving
                raise BenchError("granian stopped before listening")
            await asyncio.sleep(0.01)
        sock = socket.socket(fileno=os.dup(granian_server._sfd))
        port = sock.getsockname()[1]
        sock.close()
        _listening(f"127.0.0.1:{port}", server=server)
        await serving
    else:
        raise BenchError(f"unknown HTTP stack {server}")


async def _stack(args: argparse.Namespace) -> None:
    if args.app == "hello":
        await serve_stack(args.server, hello_app)
        return
    from gateway.config import load_fleet
    from gateway.server import start_gateway
    from gateway.serving.rest import RestApp

    config = load_fleet(args.config)
    gateway = await start_gateway(config)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not gateway.servicer.fleet.model_ready(args.model):
            if time.monotonic() > deadline:
                raise BenchError(f"{args.model} not ready after {STARTUP_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.05)
        gc.collect()  # as `switchyard serve` does once serving
        gc.freeze()
        app = RestApp(gateway.servicer, config.gateway.max_message_bytes)
        await serve_stack(args.server, app)
    finally:
        await gateway.stop()


def stack_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.bench.rest stack",
        description="an ASGI app under one HTTP server on 127.0.0.1 port 0",
    )
    parser.add_argument("--server", choices=STACKS, required=True)
    parser.add_argument("--app", choices=("hello", "infer"), required=True)
    parser.add_argument("--config", type=Path, help="infer: the fleet file (REST off)")
    parser.add_argument("--model", default="digits", help="infer: wait for this model")
    args = parser.parse_args(argv)
    if args.app == "infer" and args.config is None:
        parser.error("--app infer needs --config")
    from backends.process import use_uvloop

    use_uvloop()
    asyncio.run(_stack(args))
    return 0


# ---- the run ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One load on one target in one round."""

    throughput_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    cpu_us_per_request: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class Results:
    """Target -> its samples, in round order."""

    samples: dict[str, list[Sample]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    loads: dict[str, str] = field(default_factory=dict)
    """Stack key -> the load generator's request, for the report."""

    def add(self, key: str, sample: Sample) -> None:
        self.samples.setdefault(key, []).append(sample)


PA_GRPC = "gateway gRPC (perf_analyzer)"
PA_HTTP = "gateway REST (perf_analyzer)"
LG_GATEWAY = "gateway REST"
LG_KSERVE = "KServe 0.21 REST"


def stack_key(app: str, server: str) -> str:
    return f"{app} / {server}"


def fleet_yaml(repository: Path, model: str, http: bool) -> str:
    """One launched worker (one ONNX Runtime thread) serving `model`; every port 0."""
    return (
        f"repository: {json.dumps(str(repository))}\n"
        "gateway:\n"
        "  listen: 127.0.0.1:0\n"
        "  metrics: 127.0.0.1:0\n"
        f"  http: {'127.0.0.1:0' if http else 'null'}\n"
        "  admin: 127.0.0.1:0\n"
        "backends:\n"
        "  - name: cpu\n"
        "    address: 127.0.0.1:0\n"
        "    hardware_class: cpu-x86-64-v4-1c\n"
        "    price_usd_per_hour: 0.04\n"
        f"    launch: {{threads: 1, models: [{model}]}}\n"
    )


def infer_body(repository: Path, model: str, variant: str) -> tuple[bytes, int]:
    """A batch-1 inference request in Triton's binary tensor data extension (the first
    row of the model's sample inputs; every output asked for in binary): the body and
    its JSON part's length (Inference-Header-Content-Length)."""
    manifest_path = repository / model / "variants" / variant / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"no usable manifest at {manifest_path}: {exc}") from exc
    (described,) = manifest["inputs"]
    if described["datatype"] != "FP32":
        raise BenchError(f"{model}: the bench sends one FP32 input, not {described}")
    with np.load(repository / model / "samples" / "inputs.npz") as data:
        row = np.ascontiguousarray(data[described["name"]][:1], dtype=np.float32)
    raw = row.tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": described["name"],
                    "shape": list(row.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [
                {"name": o["name"], "parameters": {"binary_data": True}}
                for o in manifest["outputs"]
            ],
        },
        separators=(",", ":"),
    ).encode()
    return header + raw, len(header)


def ensure_granian_venv(venv: Path, log: Callable[[str], None]) -> Path:
    """A virtualenv with granian that sees this environment's packages (a .pth line
    naming its site-packages), so the three stacks run on one interpreter and share
    every other package; made when missing. Returns its python."""
    python = venv / "bin" / "python"
    stamp = venv / ".bench-installed"
    sites = [p for p in site.getsitepackages() if Path(p).is_dir()]
    wanted = f"{GRANIAN} + {' '.join(sites)}"
    if python.exists() and stamp.is_file() and stamp.read_text().strip() == wanted:
        return python
    base = shutil.which(f"python{sys.version_info[0]}.{sys.version_info[1]}")
    log(f"creating {venv} with {GRANIAN} (once only)")
    try:
        if not python.exists():
            subprocess.run(
                [base or sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True
            )
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", GRANIAN],
            check=True,
            capture_output=True,
            timeout=600,
        )
        found = subprocess.run(
            [str(python), "-c", "import site; print(site.getsitepackages()[0])"],
            check=True,
            capture_output=True,
            text=True,
        )
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or b"")[-2000:]
        raise BenchError(f"cannot set up {venv}: {exc}\n{detail!r}") from exc
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"cannot set up {venv}: pip timed out") from exc
    (Path(found.stdout.strip()) / "switchyard-bench.pth").write_text("\n".join(sites) + "\n")
    stamp.write_text(wanted + "\n")
    return python


class CpuSampler:
    """Samples processes' CPU seconds every CPU_SAMPLE_INTERVAL_S in a thread."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(
                (time.monotonic(), {n: cpu_seconds(p) for n, p in self.pids.items()})
            )
            if self._stop.wait(CPU_SAMPLE_INTERVAL_S):
                return

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def rates(self, skip_s: float) -> dict[str, float]:
        """CPU seconds a second per process, from `skip_s` after the first sample to the
        last sample but one (nan when too few)."""
        if not self.samples:
            return {name: math.nan for name in self.pids}
        start = self.samples[0][0] + skip_s
        kept = [s for s in self.samples[:-1] if s[0] >= start]
        if len(kept) < 2:
            return {name: math.nan for name in self.pids}
        (t0, first), (t1, last) = kept[0], kept[-1]
        return {name: (last[name] - first[name]) / (t1 - t0) for name in self.pids}


def perf_analyzer_sample(
    args: argparse.Namespace,
    binary: Path,
    address: str,
    protocol: str,
    pids: dict[str, int],
    work: Path,
    round_number: int,
) -> Sample:
    """perf_analyzer over `protocol` at `--concurrency`: three windows of `--pa-window-ms`
    (stability 100%: every run the same length), the servers' CPU sampled meanwhile."""
    extra = ["--input-tensor-format", "binary", "--output-tensor-format", "binary"]
    load = ["--concurrency-range", f"{args.concurrency}:{args.concurrency}"]
    with CpuSampler(pids) as sampler:
        rows = harness.perf_analyzer_rows(
            binary,
            address,
            args.model,
            [*load, *(extra if protocol == "http" else [])],
            args.pa_window_ms,
            work / f"pa-{protocol}-round{round_number}.csv",
            timeout_s=120,
            max_trials=3,
            protocol=protocol,
            stability_percentage=1000,
        )
    if len(rows) != 1:
        raise BenchError(f"perf_analyzer gave {len(rows)} rows over {protocol}, not one")
    (row,) = rows
    rates = sampler.rates(PA_SKIP_S)
    return Sample(
        row.throughput_per_s,
        row.latency_p50_ms,
        row.latency_p99_ms,
        {name: rate * 1e6 / row.throughput_per_s for name, rate in rates.items()},
    )


def load_sample(
    args: argparse.Namespace,
    address: str,
    path: str,
    body: Path | None,
    headers: Sequence[str],
    pids: dict[str, int],
    work: Path,
    name: str,
) -> Sample:
    """The load generator (its own process) on one target."""
    command = [
        sys.executable,
        "-m",
        "gateway.bench.rest",
        "load",
        "--target",
        address,
        "--path",
        path,
        "--concurrency",
        str(args.concurrency),
        "--warmup-s",
        f"{args.warmup_s:g}",
        "--window-s",
        f"{args.duration_s:g}",
    ]
    if body is not None:
        command += ["--body", str(body)]
    for header in headers:
        command += ["--header", header]
    for process, pid in pids.items():
        command += ["--cpu-pid", f"{process}={pid}"]
    with Child(name, command, work, ROOT) as child:
        status, _ = child.wait(60 + args.warmup_s + args.duration_s)
        if status != 0:
            raise child.failure("the load generator failed")
    lines = [line for line in child.stdout_path.read_text().splitlines() if line.startswith("{")]
    if not lines:
        raise child.failure("the load generator printed nothing")
    load = HttpLoad(**json.loads(lines[-1]))
    if load.errors:
        raise BenchError(f"{load.errors} errors from {address}{path}: {load.first_error}")
    return Sample(
        load.throughput_per_s, load.latency_p50_ms, load.latency_p99_ms, load.cpu_us_per_request
    )


def infer_request_files(
    repository: Path, model: str, variant: str, work: Path
) -> tuple[Path, list[str], str]:
    """`infer_body`'s request written to a file in `work` for the load generator: the
    file, its headers and the model's infer path."""
    body, json_length = infer_body(repository, model, variant)
    body_file = work / "infer-body.bin"
    body_file.write_bytes(body)
    headers = [
        "Content-Type: application/octet-stream",
        f"Inference-Header-Content-Length: {json_length}",
    ]
    return body_file, headers, f"/v2/models/{model}/infer"


@contextlib.contextmanager
def gateway_and_kserve(
    args: argparse.Namespace, work: Path, peers_python: Path | None
) -> Iterator[tuple[dict[str, Any], dict[str, int], Child | None]]:
    """`switchyard serve` (its ready file's description and pids) and, with
    `peers_python`, KServe's REST server on the same model file."""
    repository = args.repository.resolve()
    fleet = work / "fleet.yaml"
    fleet.write_text(fleet_yaml(repository, args.model, http=True))
    ready = work / "ready.json"
    ready.unlink(missing_ok=True)
    command = serve_command(fleet, ready)
    with contextlib.ExitStack() as stack:
        gateway = stack.enter_context(Child("gateway", command, work, ROOT))
        kserve = None
        if peers_python is not None:
            model_file = harness.verified_variant_copy(
                repository, args.model, args.variant, work / "kserve-models"
            )
            peer = [
                str(peers_python),
                "-I",
                str(Path(__file__).with_name("kserve_peer.py")),
                "--rest",
                "--threads",
                "1",
                "--kserve-logging",
                args.kserve_logging,
                "--model",
                f"{args.model}={model_file}",
            ]
            kserve = stack.enter_context(Child("kserve", peer, work, work))
        described = gateway.wait_ready_file(ready, STARTUP_TIMEOUT_S)
        if not described.get("http_port"):
            raise BenchError("the gateway's ready file names no REST port")
        pids = {"gateway": gateway.process.pid}
        worker = described.get("pids", {}).get("cpu")
        if worker is not None:
            pids["worker"] = int(worker)
        if kserve is not None:
            described["kserve"] = kserve.wait_listening(STARTUP_TIMEOUT_S)
        yield described, pids, kserve


def measure_bindings(
    args: argparse.Namespace,
    results: Results,
    work: Path,
    pa_binary: Path | None,
    peers_python: Path | None,
    log: Callable[[str], None],
) -> None:
    """Steps 1-3 of the module's docstring."""
    body_file, headers, path = infer_request_files(
        args.repository.resolve(), args.model, args.variant, work
    )
    with gateway_and_kserve(args, work, peers_python) as (described, pids, kserve):
        grpc_address = str(described["address"])
        http_address = f"127.0.0.1:{described['http_port']}"
        kserve_at = described.get("kserve")
        log(f"gateway: gRPC {grpc_address}, REST {http_address}; KServe REST {kserve_at}")
        turns: list[tuple[str, Callable[[int], Sample]]] = []
        if pa_binary is not None:
            for key, protocol, address in (
                (PA_GRPC, "grpc", grpc_address),
                (PA_HTTP, "http", http_address),
            ):
                turns.append(
                    (
                        key,
                        functools.partial(
                            perf_analyzer_sample, args, pa_binary, address, protocol, pids, work
                        ),
                    )
                )
        turns.append(
            (
                LG_GATEWAY,
                lambda r: load_sample(
                    args, http_address, path, body_file, headers, pids, work, f"load-gw-{r}"
                ),
            )
        )
        if kserve is not None:
            kserve_address = str(described["kserve"])
            kserve_pids = {"kserve": kserve.process.pid}
            turns.append(
                (
                    LG_KSERVE,
                    lambda r: load_sample(
                        args,
                        kserve_address,
                        path,
                        body_file,
                        headers,
                        kserve_pids,
                        work,
                        f"load-kserve-{r}",
                    ),
                )
            )
        for round_number in range(1, args.rounds + 1):
            ordered = turns if round_number % 2 else turns[::-1]
            for key, measure in ordered:
                sample = measure(round_number)
                results.add(key, sample)
                log(
                    f"round {round_number}: {key}: {sample.throughput_per_s:,.0f}/s, "
                    f"p50 {sample.latency_p50_ms:.2f} ms"
                )
        if kserve is not None and pa_binary is not None:
            error = harness.probe_perf_analyzer(
                pa_binary, str(described["kserve"]), args.model, work, protocol="http"
            )
            if error:
                results.notes.append(
                    f"perf_analyzer `-i http` against KServe 0.21's REST server stops before "
                    f"sending load: `{error}` (it asks for `/v2/models/{args.model}/config`, "
                    "Triton's model configuration, which KServe does not serve: 404); hence "
                    "this module's own load generator for gateway REST against KServe REST."
                )


def measure_stacks(
    args: argparse.Namespace,
    results: Results,
    work: Path,
    python: Path,
    log: Callable[[str], None],
) -> None:
    """Step 4: each app under each stack, the stacks up side by side, loads in turns."""
    body, json_length = infer_body(args.repository.resolve(), args.model, args.variant)
    body_file = work / "infer-body.bin"
    body_file.write_bytes(body)
    fleet = work / "stack-fleet.yaml"
    fleet.write_text(fleet_yaml(args.repository.resolve(), args.model, http=False))
    loads = {
        "hello": (HELLO_PATH, None, []),
        "infer": (
            f"/v2/models/{args.model}/infer",
            body_file,
            [
                "Content-Type: application/octet-stream",
                f"Inference-Header-Content-Length: {json_length}",
            ],
        ),
    }
    results.loads = {"hello": f"GET {HELLO_PATH}", "infer": f"POST /v2/models/{args.model}/infer"}
    for app in args.stack_apps:
        with contextlib.ExitStack() as stack:
            servers: dict[str, tuple[str, dict[str, int]]] = {}
            for server in STACKS:
                command = [str(python), "-m", "gateway.bench.rest", "stack", "--server", server]
                command += ["--app", app, "--model", args.model]
                if app == "infer":
                    command += ["--config", str(fleet)]
                child = stack.enter_context(Child(f"stack-{app}-{server}", command, work, ROOT))
                address = child.wait_listening(STARTUP_TIMEOUT_S)
                servers[server] = (address, {"server": child.process.pid})
            path, body_path, headers = loads[app]
            for round_number in range(1, args.rounds + 1):
                ordered = STACKS if round_number % 2 else STACKS[::-1]
                for server in ordered:
                    address, pids = servers[server]
                    sample = load_sample(
                        args,
                        address,
                        path,
                        body_path,
                        headers,
                        pids,
                        work,
                        f"load-{app}-{server}-{round_number}",
                    )
                    results.add(stack_key(app, server), sample)
                    log(
                        f"round {round_number}: {app} under {server}: "
                        f"{sample.throughput_per_s:,.0f}/s"
                    )


# ---- the report ------------------------------------------------------------------------


def _median(samples: Sequence[Sample], what: Callable[[Sample], float]) -> float:
    values = [v for v in (what(s) for s in samples) if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def _throughput(results: Results, key: str) -> float:
    return _median(results.samples.get(key, []), lambda s: s.throughput_per_s)


def _ratio(results: Results, top: str, bottom: str) -> tuple[float, list[float]]:
    """Median throughput over median throughput, and the ratio of each round's pair."""
    a, b = results.samples.get(top, []), results.samples.get(bottom, [])
    if not a or not b:
        return math.nan, []
    per_round = [x.throughput_per_s / y.throughput_per_s for x, y in zip(a, b, strict=False)]
    return _throughput(results, top) / _throughput(results, bottom), per_round


def _num(value: float, digits: int = 0) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def _rounds(values: Sequence[float], digits: int = 2) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values) if values else "-"


def _cpu(samples: Sequence[Sample], process: str) -> float:
    return _median(samples, lambda s: s.cpu_us_per_request.get(process, math.nan))


def _row(label: str, samples: Sequence[Sample], processes: Sequence[str]) -> list[str]:
    throughputs = [s.throughput_per_s for s in samples]
    return [
        label,
        _num(_median(samples, lambda s: s.throughput_per_s)),
        f"{min(throughputs):,.0f}-{max(throughputs):,.0f}" if throughputs else "-",
        _num(_median(samples, lambda s: s.latency_p50_ms), 2),
        _num(_median(samples, lambda s: s.latency_p99_ms), 2),
        *(_num(_cpu(samples, p)) for p in processes),
    ]


def _met(value: float, target: float) -> str:
    if math.isnan(value):
        return "not measured"
    return "met" if value >= target else "NOT met"


@dataclass(frozen=True, slots=True)
class StackChoice:
    chosen: str
    infer_vs_gateway: dict[str, float]
    """Stack -> its median inference throughput over the gateway's stack's."""
    hello_vs_gateway: dict[str, float]


def stack_choice(results: Results) -> StackChoice:
    """The gateway's stack stays unless another beats it on the inference path by more
    than STACK_MARGIN."""
    incumbent = STACKS[0]

    def versus(app: str) -> dict[str, float]:
        base = _throughput(results, stack_key(app, incumbent))
        return {s: _throughput(results, stack_key(app, s)) / base for s in STACKS}

    infer, hello = versus("infer"), versus("hello")
    measured = {s: v for s, v in infer.items() if not math.isnan(v)}
    best = max(measured, key=measured.__getitem__, default=incumbent)
    chosen = best if measured.get(best, 1.0) > 1.0 + STACK_MARGIN else incumbent
    return StackChoice(chosen, infer, hello)


def section(args: argparse.Namespace, results: Results, took_s: float, load_1m: float) -> str:
    vs_grpc, grpc_rounds = _ratio(results, PA_HTTP, PA_GRPC)
    vs_kserve, kserve_rounds = _ratio(results, LG_GATEWAY, LG_KSERVE)
    command = shlex.join(
        [
            "python",
            "-m",
            "gateway.bench.rest",
            "--model",
            args.model,
            "--concurrency",
            str(args.concurrency),
            "--rounds",
            str(args.rounds),
            "--duration-s",
            f"{args.duration_s:g}",
            "--pa-window-ms",
            str(args.pa_window_ms),
        ]
    )
    lines = [
        "## REST binding",
        "",
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC (run took {took_s:.0f} s); Python "
        f"{platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs shared with "
        "whatever else runs (load average over the last minute: "
        f"{load_1m:.1f} at the start, {os.getloadavg()[0]:.1f} at the end). Load generators, "
        "gateway, worker and KServe all share these cores.",
        f"- Command: `{command}` (`make bench` runs it).",
        f"- Targets, at concurrency {args.concurrency} on `{args.model}` (batch 1, binary tensor "
        f"data): gateway REST throughput >= {REST_VS_GRPC_TARGET}x its gRPC throughput; >= "
        f"{REST_VS_KSERVE_TARGET}x KServe 0.21's REST server serving the same model directly.",
        "- Servers: `switchyard serve` with one launched worker (not the demo fleet: one "
        f"backend, `threads: 1`, `{args.model}` only; its REST listener is uvicorn with "
        "httptools on the gateway's uvloop loop); KServe 0.21's own REST server "
        "(`gateway/bench/kserve_peer.py --rest`: its FastAPI app and uvicorn, one process, on "
        f"127.0.0.1 port 0, KServe logging {args.kserve_logging}) with a custom ONNX Runtime "
        f"model on the same `{args.variant}` file; one ONNX Runtime thread on each side. Both "
        f"up together; the loads take turns, {args.rounds} rounds, the order reversed every "
        "other round. Cells: the median over rounds; the range is the rounds' lowest and "
        "highest throughput.",
        "",
        "### Gateway: REST against gRPC (Triton perf_analyzer)",
        "",
        f"perf_analyzer 2.60 `-i grpc` and `-i http --input-tensor-format binary "
        f"--output-tensor-format binary`, `--concurrency-range {args.concurrency}:"
        f"{args.concurrency} --measurement-interval {args.pa_window_ms} --max-trials 3 "
        "--stability-percentage 1000` (three windows every run, whatever their spread: the "
        "same length each). CPU: "
        "the gateway's and the worker's user + system time (all threads, `/proc/PID/stat`) "
        f"sampled every {CPU_SAMPLE_INTERVAL_S:g} s while perf_analyzer ran, from "
        f"{PA_SKIP_S:g} s after its start, as a rate over its throughput.",
        "",
        markdown_table(
            [
                "binding",
                "infer/s",
                "range",
                "p50 ms",
                "p99 ms",
                "gateway CPU us/infer",
                "worker CPU us/infer",
            ],
            [
                _row(label, results.samples[key], ("gateway", "worker"))
                for key, label in ((PA_GRPC, "gRPC"), (PA_HTTP, "REST"))
                if key in results.samples
            ],
        ),
        "",
        "### Gateway REST against KServe 0.21 REST (the bench's load generator)",
        "",
        "perf_analyzer cannot drive KServe's REST server (see notes), so both are driven by "
        "`python -m gateway.bench.rest load`: a process of its own, "
        f"{args.concurrency} raw HTTP/1.1 keep-alive connections on uvloop in a closed loop, "
        "each sending the same body again as soon as its answer is in (Triton's binary "
        "tensor data: the first sample row as 256 raw bytes, every output asked for in "
        f"binary), {args.warmup_s:g} s of warm-up then a {args.duration_s:g} s window; any "
        "status but 200 fails the run. CPU per answer from `/proc/PID/stat` at the window's "
        "edges.",
        "",
        markdown_table(
            [
                "server",
                "infer/s",
                "range",
                "p50 ms",
                "p99 ms",
                "server CPU us/infer",
                "(gateway + worker)",
                "client CPU us/infer",
            ],
            [
                row
                for key in (LG_GATEWAY, LG_KSERVE)
                if key in results.samples
                for row in [_kserve_row(key, results.samples[key])]
            ],
        ),
        "",
        "### Tracked figures",
        "",
        markdown_table(
            ["figure", "value", "each round", "target", "status"],
            [
                [
                    f"gateway REST / gateway gRPC throughput, c={args.concurrency} (perf_analyzer)",
                    _num(vs_grpc, 2),
                    _rounds(grpc_rounds),
                    f">= {REST_VS_GRPC_TARGET}",
                    _met(vs_grpc, REST_VS_GRPC_TARGET),
                ],
                [
                    f"gateway REST / KServe REST throughput, c={args.concurrency} (load generator)",
                    _num(vs_kserve, 2),
                    _rounds(kserve_rounds),
                    f">= {REST_VS_KSERVE_TARGET}",
                    _met(vs_kserve, REST_VS_KSERVE_TARGET),
                ],
            ],
        ),
        "",
    ]
    lines += _stack_lines(args, results)
    lines += ["### Notes", ""]
    lines += [f"- {note}" for note in results.notes]
    return "\n".join(lines).rstrip() + "\n"


def _kserve_row(key: str, samples: Sequence[Sample]) -> list[str]:
    processes = ("gateway", "worker") if key == LG_GATEWAY else ("kserve",)
    server = _median(
        samples,
        lambda s: sum(s.cpu_us_per_request.get(p, math.nan) for p in processes),
    )
    row = _row(key, samples, ())
    split = " + ".join(_num(_cpu(samples, p)) for p in processes) if key == LG_GATEWAY else "-"
    client = _num(_median(samples, lambda s: s.cpu_us_per_request.get("client", math.nan)))
    return [*row, _num(server), split, client]


def _stack_lines(args: argparse.Namespace, results: Results) -> list[str]:
    if not any(k.startswith(("hello /", "infer /")) for k in results.samples):
        return []
    choice = stack_choice(results)
    rows = []
    for app in ("hello", "infer"):
        for server in STACKS:
            samples = results.samples.get(stack_key(app, server))
            if not samples:
                continue
            ratio = (choice.hello_vs_gateway if app == "hello" else choice.infer_vs_gateway)[server]
            rows.append([*_row(f"{app}: {server}", samples, ("server",)), _num(ratio, 2)])
    infer = choice.infer_vs_gateway
    verdict = (
        f"**Chosen: {choice.chosen}**"
        + (
            " (the gateway's listener as it is)"
            if choice.chosen == STACKS[0]
            else " (faster than the gateway's listener by more than the margin)"
        )
        + ": on the inference path "
        + ", ".join(f"{s} {_num(infer[s], 2)}x" for s in STACKS[1:])
        + f" of uvicorn with httptools; another stack would replace it only when faster by "
        f"more than {STACK_MARGIN:.0%}, the run-to-run noise here and not worth a new "
        "dependency for less."
    )
    return [
        "### The HTTP stack, chosen by measurement",
        "",
        "Two ASGI apps under three HTTP servers, each server in a process of its own run by "
        "one interpreter (`.bench/granian-venv`: granian " + GRANIAN.split("==")[1] + " "
        "installed, this project's packages seen through a .pth line, so uvicorn, httptools, "
        "h11 and uvloop are the project's own): `hello`, a trivial app answering "
        f"`{HELLO_PATH}` with a fixed {len(HELLO_BODY)}-byte JSON body; `infer`, the "
        "gateway's REST app (`gateway.serving.rest.RestApp`) over an in-process gateway on "
        "a fleet like the one above (REST listener off, the app served by the server under "
        "test). uvicorn as the gateway configures it (`loop=none`, `lifespan=off`, no access "
        "log) with `http=httptools` or `http=h11`; granian's embedded server (`granian."
        "server.embed.Server`, HTTP/1, the ASGI app on the same uvloop loop, its I/O in one "
        "Rust runtime thread): the form the gateway could adopt, whose event loop also runs "
        f"gRPC. The same load generator, c={args.concurrency}, {args.rounds} rounds, the "
        "servers up side by side and the loads in turns. `server CPU` is the serving "
        "process's (for `infer`, its worker's not included).",
        "",
        markdown_table(
            [
                "app: server",
                "req/s",
                "range",
                "p50 ms",
                "p99 ms",
                "server CPU us/req",
                "over uvicorn-httptools",
            ],
            rows,
        ),
        "",
        verdict,
        "",
    ]


# ---- main ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.bench.rest", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="digits", help="a model of one FP32 input")
    parser.add_argument("--variant", default="ort-cpu-fp32", help="the file KServe serves")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=6.0, help="the load generator's window")
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument(
        "--pa-window-ms",
        type=int,
        default=2000,
        help="perf_analyzer's --measurement-interval (three windows a run)",
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("bindings", "stacks"),
        default=["bindings", "stacks"],
    )
    parser.add_argument(
        "--stack-apps", nargs="+", choices=("hello", "infer"), default=["hello", "infer"]
    )
    parser.add_argument("--kserve", choices=("on", "off"), default="on")
    parser.add_argument("--kserve-logging", choices=("default", "quiet"), default="quiet")
    parser.add_argument("--peers-venv", type=Path, default=ROOT / ".bench" / "peers-venv")
    parser.add_argument("--granian-venv", type=Path, default=ROOT / ".bench" / "granian-venv")
    parser.add_argument("--perf-analyzer", choices=("auto", "off"), default="auto")
    harness.add_perf_analyzer_arguments(parser, ROOT)
    parser.add_argument("--log-dir", type=Path, default=None, help="keep logs here")
    parser.add_argument("--out", type=Path, default=None, help="BENCHMARKS.md to update")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.concurrency < 1:
        parser.error("--rounds and --concurrency must be at least 1")
    return args


def static_notes(args: argparse.Namespace) -> list[str]:
    return [
        "KServe 0.21 binds its REST server to 0.0.0.0:8080 (`RESTServer` takes a port, no "
        "host); the peer starts KServe's own `RESTServer` (`create_application()`: its "
        "FastAPI app with KServe's middleware, endpoints and exception handlers) and hands "
        "uvicorn a socket bound to 127.0.0.1 port 0, read back. Started by "
        "`ModelServer.start()` as KServe does with one worker, it runs on the loop "
        "`asyncio.run` makes (asyncio's own: uvicorn's uvloop choice applies only when "
        "uvicorn makes the loop) with uvicorn's httptools parser.",
        "KServe's predict is a plain `def`, as in its examples: it runs on the event loop, "
        "one inference at a time, and answers in binary (its `InferResponse` with "
        "`use_binary_outputs`), as the gateway does when asked.",
        "The gateway runs with its defaults (`coalesce_in_flight: 1`: requests that arrive "
        "while a call to the worker is in flight for the model are merged into one batched "
        "call), over gRPC and REST alike. Beside this bench (same fleet, the load generator "
        "at c=8, 4 s windows, one after the other) 0 gave 1,253/s (gateway 551 + worker 567 "
        "us a request), 1 about 1,490/s, 2 1,255/s and 4 1,091/s: the default is the "
        "fastest here.",
        "Where the gateway's time goes under REST load (py-spy 200 Hz, 8 s, c=8 from the load "
        "generator, about 1,490/s, run beside this bench on 2026-12-06): grpc.aio's unary "
        "call to the worker (`UnaryUnaryCall._invoke`, the hop) 19%; uvicorn writing the "
        "answer (`RequestResponseCycle.send`: the head and the body are two "
        "`transport.write` calls, two sends on the socket) 19%; the event loop itself "
        "(uvloop: polling, reads, callbacks) 18%; coalescer, dispatch, router, statistics "
        "and metrics about 12%; the REST codec (decode 5%, encode 3%, body 1%) and "
        "httptools' parsing (3%) about 12%. What is REST's own is a small share: the gap to "
        "KServe is the hop. The gateway and its worker spend about 640 us of CPU a request "
        "(the worker's grpc.aio server about 225 of it) where KServe spends about 480 us in "
        "one process; KServe, one event loop, can use one core, while the gateway's two "
        "processes can use both. On a quiet machine the gateway's pipeline pulls ahead; while "
        "other work takes the cores, throughput follows CPU per request and KServe's lower "
        "total wins: an earlier run on 2026-12-06, the other work heavier (the gateway and "
        "its worker at 640 us a request), gave 0.86, 0.80 and 1.31 over its three rounds.",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["load"]:
        return load_main(argv[1:])
    if argv[:1] == ["stack"]:
        return stack_main(argv[1:])
    args = parse_args(argv)
    started = time.monotonic()
    load_1m = os.getloadavg()[0]

    def log(message: str) -> None:
        print(f"[rest bench {time.monotonic() - started:6.1f}s] {message}", flush=True)

    results = Results()
    try:
        with contextlib.ExitStack() as stack:
            if args.log_dir is not None:
                work = args.log_dir.resolve()
                work.mkdir(parents=True, exist_ok=True)
            else:
                work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rest-bench-")))
            if "bindings" in args.parts:
                pa_binary = None
                if args.perf_analyzer == "auto":
                    pa_binary = harness.ensure_perf_analyzer(
                        args.perf_analyzer_dir, args.perf_analyzer_build, log
                    )
                peers_python = None
                if args.kserve == "on":
                    peers_python = harness.ensure_peers_venv(args.peers_venv, log)
                measure_bindings(args, results, work, pa_binary, peers_python, log)
            if "stacks" in args.parts:
                python = ensure_granian_venv(args.granian_venv, log)
                measure_stacks(args, results, work, python, log)
    except BenchError as exc:
        print(f"REST bench: {exc}", file=sys.stderr)
        return 1
    results.notes += static_notes(args)
    body = section(args, results, time.monotonic() - started, load_1m)
    publish(body, args.out, BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
