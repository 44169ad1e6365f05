"""The closed-loop load client of `make bench`, driving any Open Inference Protocol
(KServe v2) gRPC server the same way: Switchyard's backend worker, its gateway, and
KServe's ModelServer alike (perf_analyzer cannot drive KServe, which lacks the
ModelConfig RPC that perf_analyzer calls first).

Like perf_analyzer's concurrency mode: N requests always in flight on one gRPC
channel, each sent again as soon as its answer comes; the same request (batch 1,
one row of the model's sample inputs, as `raw_input_contents`) every time. After a
warm-up, it counts the answers that complete inside the measurement window and
times each from send to answer. The request is serialized once and sent as bytes,
and answers are not decoded (but the first, which is checked), so the client spends
as little of the shared CPU as a Python client can.

Runs as its own process (`python -m gateway.bench.loadgen ...`): it uses
tritonclient's generated protobuf module (package `inference`), which must not
meet this project's `protos` package in one process. Prints one JSON line per
concurrency on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from backends.protocol.tensors import NUMPY_DTYPES
from gateway.routing.percentiles import percentile

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
CALL_TIMEOUT_S = 30.0
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class InputSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LevelResult:
    """What one concurrency level measured."""

    target: str
    model: str
    concurrency: int
    requests: int
    errors: int
    window_s: float
    throughput_per_s: float
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    latency_mean_ms: float
    first_error: str
    cpu_us_per_infer: dict[str, float]
    """Per watched process (and `client`): CPU time (user + system) in the window
    over the calls answered in it."""


def parse_input(text: str) -> InputSpec:
    """NAME:DATATYPE:D0,D1,... (a -1 dimension becomes 1: batch 1)."""
    try:
        name, datatype, dims = text.rsplit(":", 2)
        shape = tuple(1 if int(d) < 0 else int(d) for d in dims.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected NAME:DATATYPE:D0,D1,..., got {text!r}") from exc
    return InputSpec(name, datatype, shape)


def parse_pid(text: str) -> tuple[str, int]:
    name, _, pid = text.partition("=")
    if not name or not pid.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=PID, got {text!r}")
    return name, int(pid)


def input_bytes(spec: InputSpec, samples: Path | None) -> bytes:
    """The first rows of the model's sample inputs, or a fixed pseudo-random tensor."""
    dtype = NUMPY_DTYPES[spec.datatype]
    count = math.prod(spec.shape)
    if samples is not None and samples.is_file():
        with np.load(samples) as data:
            if spec.name in data.files:
                flat: np.ndarray = np.ascontiguousarray(data[spec.name], dtype=dtype).reshape(-1)
                if flat.size >= count:
                    return flat[:count].tobytes()
    rng = np.random.default_rng(0)
    return rng.random(count).astype(dtype).tobytes()


def _service_pb2() -> Any:
    """tritonclient's generated messages, imported late: importing this module must
    not bring protobuf package `inference` into a process that may hold ours."""
    from tritonclient.grpc import service_pb2

    return service_pb2


def build_request(model: str, inputs: Sequence[InputSpec], samples: Path | None) -> bytes:
    request = _service_pb2().ModelInferRequest(model_name=model, id="bench")
    for spec in inputs:
        tensor = request.inputs.add()
        tensor.name = spec.name
        tensor.datatype = spec.datatype
        tensor.shape.extend(spec.shape)
        request.raw_input_contents.append(input_bytes(spec, samples))
    return bytes(request.SerializeToString())


def check_response(raw: bytes) -> list[str]:
    """Decodes one answer; returns its output names (an error when there are none)."""
    response = _service_pb2().ModelInferResponse.FromString(raw)
    names = [o.name for o in response.outputs]
    if not names:
        raise RuntimeError("the answer has no outputs")
    return names


Call = Callable[[bytes], Awaitable[bytes]]


async def wait_until_serving(call: Call, payload: bytes, timeout_s: float) -> list[str]:
    """Sends the request until one succeeds (a gateway may still be probing)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return check_response(await call(payload))
        except grpc.aio.AioRpcError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"target not serving: {exc.code().name} {exc.details()}"
                ) from exc
            await asyncio.sleep(0.2)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (nan when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return math.nan
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


async def closed_loop(
    call: Call,
    payload: bytes,
    concurrency: int,
    warmup_s: float,
    window_s: float,
    watched: dict[str, int],
) -> tuple[list[int], int, str, dict[str, float]]:
    """Keeps `concurrency` requests in flight; returns the latencies (ns) of the answers
    completed inside the window, the errors there, the first error's text, and the CPU
    seconds each watched process spent in the window."""
    clock = time.perf_counter_ns
    window_start = clock() + int(warmup_s * 1e9)
    window_end = window_start + int(window_s * 1e9)
    latencies: list[int] = []
    errors = 0
    first_error = ""
    cpu: dict[str, float] = {}

    async def sample_cpu() -> None:
        await asyncio.sleep(max(0.0, (window_start - clock()) / 1e9))
        before = {name: cpu_seconds(pid) for name, pid in watched.items()}
        await asyncio.sleep(max(0.0, (window_end - clock()) / 1e9))
        cpu.update({name: cpu_seconds(pid) - before[name] for name, pid in watched.items()})

    async def one_stream() -> None:
        nonlocal errors, first_error
        while True:
            sent = clock()
            if sent >= window_end:
                return
            try:
                await call(payload)
            except grpc.aio.AioRpcError as exc:
                done = clock()
                if window_start <= done <= window_end:
                    errors += 1
                    first_error = first_error or f"{exc.code().name}: {exc.details()}"
                continue
            done = clock()
            if window_start <= done <= window_end:
                latencies.append(done - sent)

    await asyncio.gather(sample_cpu(), *(one_stream() for _ in range(concurrency)))
    return latencies, errors, first_error, cpu


async def run(args: argparse.Namespace) -> list[LevelResult]:
    payload = build_request(args.model, args.input, args.samples)
    options = [
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ]
    async with grpc.aio.insecure_channel(args.target, options=options) as channel:
        stub = channel.unary_unary(INFER_METHOD)  # no (de)serializers: bytes in, bytes out

        async def call(request: bytes) -> bytes:
            response: bytes = await stub(request, timeout=CALL_TIMEOUT_S)
            return response

        await wait_until_serving(call, payload, args.ready_timeout_s)
        results = []
        for concurrency in args.concurrency:
            watched = {"client": os.getpid(), **dict(args.cpu_pid)}
            latencies, errors, first_error, cpu = await closed_loop(
                call, payload, concurrency, args.warmup_s, args.window_s, watched
            )
            ms = [v / 1e6 for v in latencies]
            results.append(
                LevelResult(
                    target=args.target,
                    model=args.model,
                    concurrency=concurrency,
                    requests=len(ms),
                    errors=errors,
                    window_s=args.window_s,
                    throughput_per_s=len(ms) / args.window_s,
                    latency_p50_ms=percentile(ms, 50),
                    latency_p90_ms=percentile(ms, 90),
                    latency_p99_ms=percentile(ms, 99),
                    latency_mean_ms=sum(ms) / len(ms) if ms else math.nan,
                    first_error=first_error,
                    cpu_us_per_infer={
                        name: seconds * 1e6 / len(ms) if ms else math.nan
                        for name, seconds in cpu.items()
                    },
                )
            )
            print(json.dumps(asdict(results[-1])), flush=True)
        return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="HOST:PORT of a v2 gRPC server")
    parser.add_argument("--model", required=True)
    parser.add_argument(
        "--input",
        type=parse_input,
        action="append",
        required=True,
        help="NAME:DATATYPE:SHAPE, e.g. input:FP32:-1,64 (repeat per input)",
    )
    parser.add_argument(
        "--samples", type=Path, default=None, help="an .npz of sample inputs, keyed by input name"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--window-s", type=float, default=5.0)
    parser.add_argument("--ready-timeout-s", type=float, default=30.0)
    parser.add_argument(
        "--cpu-pid",
        type=parse_pid,
        action="append",
        default=[],
        metavar="NAME=PID",
        help="a server process whose CPU time to report",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.bench.loadgen", description=__doc__.split("\n\n")[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        asyncio.run(run(args))
    except RuntimeError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
