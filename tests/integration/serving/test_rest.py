"""The REST binding in process, driven with plain HTTP/1.1 over asyncio streams: every
kind of bad request gets its HTTP status and an `{"error": ...}` naming what was wrong
(never a 500), good requests among bad ones are answered as if alone, the request
metrics carry protocol="rest", bodies over the limit are refused before they are read
(and once decompressed), shedding, no ready backend and deadlines map to 429, 503 and
504, a backend's own failure to 502, and `gateway.tls` puts the REST port behind TLS
(and mTLS)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import ssl
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson
import pytest

from backends.runtimes.base import Array
from backends.worker.batching import Batcher
from backends.worker.served import LoadedVariant
from gateway.server import Gateway, start_gateway
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import Worker, fleet_config, launch_worker, raw_request, samples
from tests.integration.security.certs import PKI, Leaf
from tests.waiting import wait_until

pytestmark = pytest.mark.asyncio

LIMIT_BYTES = 200_000
"""gateway.max_message_bytes of the gateway most tests use: a digits request fits."""


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def error(self) -> str:
        document = self.json()
        assert set(document) == {"error"}, document
        return str(document["error"])


@dataclass
class Call:
    """One HTTP request, as bytes on the wire."""

    method: str
    path: str
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    content_length: bool = True
    """Send Content-Length (else the body is sent as it is, e.g. chunked)."""


async def _read_answer(reader: asyncio.StreamReader) -> Answer:
    status_line = await reader.readline()
    if not status_line.startswith(b"HTTP/1.1 "):
        raise ConnectionError(f"no HTTP answer: {status_line!r}")
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = await reader.read()
    return Answer(int(status_line.split()[1]), headers, body)


async def send(port: int, call: Call, context: ssl.SSLContext | None = None) -> Answer:
    """`call` on a connection of its own; the answer is read while the body is still
    being written (the server may answer, and close, before taking it all)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    head = [f"{call.method} {call.path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if call.content_length:
        head.append(f"Content-Length: {len(call.body)}")
    head.extend(f"{name}: {value}" for name, value in call.headers.items())

    async def write() -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
            writer.write(call.body)
            await writer.drain()

    writing = asyncio.ensure_future(write())
    try:
        return await asyncio.wait_for(_read_answer(reader), 30)
    finally:
        writing.cancel()
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()


def infer_path(model: str = "digits") -> str:
    return f"/v2/models/{model}/infer"


def one_input(shape: object, datatype: object, data: object) -> bytes:
    """A JSON body with one input named `input`, as given (ill-formed on purpose or not)."""
    return orjson.dumps(
        {"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}]}
    )


def json_infer(
    x: np.ndarray, parameters: Mapping[str, object] | None = None, **extra: object
) -> bytes:
    request: dict[str, object] = {
        "inputs": [
            {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}
        ],
        "outputs": [{"name": "label"}],
        **extra,
    }
    if parameters:
        request["parameters"] = dict(parameters)
    return orjson.dumps(request)


def binary_infer(x: np.ndarray, size: int | None = None) -> tuple[bytes, dict[str, str]]:
    """A binary-data request (the label back as binary data too) and its headers."""
    raw = x.astype("<f4").tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw) if size is None else size},
                }
            ],
            "outputs": [{"name": "label", "parameters": {"binary_data": True}}],
        }
    )
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


def labels_of(answer: Answer) -> list[int]:
    """The `label` output of a successful answer, JSON or binary."""
    assert answer.status == 200, (answer.status, answer.body[:300])
    length = answer.headers.get("inference-header-content-length")
    document = orjson.loads(answer.body if length is None else answer.body[: int(length)])
    (out,) = document["outputs"]
    assert out["name"] == "label" and out["datatype"] == "INT64"
    if length is None:
        return list(out["data"])
    raw = answer.body[int(length) :]
    assert len(raw) == out["parameters"]["binary_data_size"]
    labels: list[int] = np.frombuffer(raw, "<i8").tolist()
    return labels


@pytest.fixture
async def rest_gateway(two_workers: tuple[Worker, Worker]) -> AsyncIterator[Gateway]:
    a, b = two_workers
    gw = await start_gateway(
        fleet_config(
            {"cheap": (a.address, 0.04), "dear": (b.address, 0.08)},
            max_message_bytes=LIMIT_BYTES,
        )
    )
    assert gw.rest is not None
    yield gw
    await gw.stop()


@dataclass(frozen=True)
class Bad:
    """A bad request, the status it must get and words its error must hold."""

    what: str
    call: Call
    status: int
    says: Sequence[str]
    allow: str | None = None
    """The Allow header a 405 must carry."""

    @property
    def outcome(self) -> str | None:
        """The outcome switchyard_requests_total counts it under (protocol="rest"):
        inference requests refused with a gRPC status's meaning; None for what HTTP
        refuses on its own (a method, an encoding, a size) and for other endpoints."""
        if not self.call.path.endswith("/infer") or self.status in (405, 413, 415):
            return None
        return {400: "INVALID_ARGUMENT", 404: "NOT_FOUND"}[self.status]


def bad_requests(x: np.ndarray) -> list[Bad]:
    one = x[:1]
    binary, binary_headers = binary_infer(one)
    short_binary, short_headers = binary_infer(one, size=4 * 63)
    good = json_infer(one)
    bomb = zlib.compress(b" " * (50 * LIMIT_BYTES), 9)
    assert len(bomb) < LIMIT_BYTES
    gzip_bomb = gzip.compress(b" " * (50 * LIMIT_BYTES), 9)
    infer = infer_path()
    return [
        Bad("malformed JSON", Call("POST", infer, b'{"inputs": ['), 400, ["JSON is malformed"]),
        Bad("not an object", Call("POST", infer, b"[1, 2]"), 400, ["must be an object"]),
        Bad("no inputs", Call("POST", infer, b'{"outputs": []}'), 400, ["has no 'inputs'"]),
        Bad(
            "unknown field",
            Call("POST", infer, orjson.dumps({"inputs": [], "input": []})),
            400,
            ["unknown field 'input'"],
        ),
        Bad(
            "data count off the shape",
            Call(
                "POST",
                infer,
                one_input([1, 64], "FP32", [0.0] * 63),
            ),
            400,
            ["input 'input'", "holds 63 values", "needs 64"],
        ),
        Bad(
            "shape the model does not take",
            Call("POST", infer, json_infer(np.zeros((1, 63), np.float32))),
            400,
            ["input 'input'", "[1, 63]", "[-1, 64]"],
        ),
        Bad(
            "datatype the model does not take",
            Call(
                "POST",
                infer,
                one_input([1, 64], "INT32", [0] * 64),
            ),
            400,
            ["input 'input'", "INT32", "FP32"],
        ),
        Bad(
            "unknown datatype",
            Call(
                "POST",
                infer,
                one_input([1, 64], "FP33", [0] * 64),
            ),
            400,
            ["input 'input'", "unknown datatype 'FP33'"],
        ),
        Bad(
            "strings for FP32",
            Call(
                "POST",
                infer,
                one_input([1, 1], "FP32", ["a"]),
            ),
            400,
            ["input 'input'", "FP32 'data' must hold numbers", "a string"],
        ),
        Bad(
            "binary data of the wrong size",
            Call("POST", infer, short_binary, short_headers),
            400,
            ["input 'input'", "252 bytes", "needs 256"],
        ),
        Bad(
            "binary data without the header length",
            Call("POST", infer, binary),
            400,
            ["Inference-Header-Content-Length"],
        ),
        Bad(
            "header length past the body",
            Call("POST", infer, binary, {"Inference-Header-Content-Length": str(len(binary) + 1)}),
            400,
            [f"Inference-Header-Content-Length is {len(binary) + 1}", f"holds {len(binary)} bytes"],
        ),
        Bad(
            "header length not a number",
            Call("POST", infer, binary, {"Inference-Header-Content-Length": "ten"}),
            400,
            ["Inference-Header-Content-Length", "'ten'"],
        ),
        Bad(
            "bytes after the binary data",
            Call("POST", infer, binary + b"xx", binary_headers),
            400,
            ["2 bytes after the binary data"],
        ),
        Bad(
            "unknown SLA class",
            Call("POST", infer, json_infer(one, {"sla_class": "platinum"})),
            400,
            ["sla_class 'platinum'"],
        ),
        Bad(
            "timeout of the wrong kind",
            Call("POST", infer, json_infer(one, {"timeout": "soon"})),
            400,
            ["timeout"],
        ),
        Bad(
            "unknown variant",
            Call("POST", infer, json_infer(one, {"switchyard_variant": "tvm-fp4"})),
            404,
            ["variant 'tvm-fp4'", "ort-cpu-fp32"],
        ),
        Bad("unknown model", Call("POST", infer_path("nope"), good), 404, ["unknown model 'nope'"]),
        Bad(
            "unknown version",
            Call("POST", "/v2/models/digits/versions/7/infer", good),
            404,
            ["no version '7'"],
        ),
        Bad(
            "unknown model's metadata",
            Call("GET", "/v2/models/nope"),
            404,
            ["unknown model 'nope'"],
        ),
        Bad("path outside the API", Call("GET", "/v1/models"), 404, ["/v1/models", "/v2"]),
        Bad(
            "unknown endpoint", Call("GET", "/v2/models/digits/explain"), 404, ["explain", "digits"]
        ),
        Bad("GET on infer", Call("GET", infer), 405, ["GET", "POST"], allow="POST"),
        Bad("POST on health", Call("POST", "/v2/health/ready"), 405, ["POST", "GET"], allow="GET"),
        Bad(
            "repository index asked with junk",
            Call("POST", "/v2/repository/index", b'{"ready": "yes"}'),
            400,
            ["'ready'", "'yes'"],
        ),
        Bad(
            "Content-Encoding not supported",
            Call("POST", infer, good, {"Content-Encoding": "br"}),
            415,
            ["Content-Encoding 'br'", "gzip"],
        ),
        Bad(
            "gzip that is not gzip",
            Call("POST", infer, good, {"Content-Encoding": "gzip"}),
            400,
            ["not valid gzip"],
        ),
        Bad(
            "truncated deflate",
            Call("POST", infer, zlib.compress(good)[:-8], {"Content-Encoding": "deflate"}),
            400,
            ["truncated deflate"],
        ),
        Bad(
            "deflate with bytes after its end",
            Call("POST", infer, zlib.compress(good) + b"xx", {"Content-Encoding": "deflate"}),
            400,
            ["2 bytes after its deflate data"],
        ),
        Bad(
            "a gzip bomb",
            Call("POST", infer, gzip_bomb, {"Content-Encoding": "gzip"}),
            413,
            [f"exceeds {LIMIT_BYTES} bytes once decompressed"],
        ),
        Bad(
            "a deflate bomb",
            Call("POST", infer, bomb, {"Content-Encoding": "deflate"}),
            413,
            [f"exceeds {LIMIT_BYTES} bytes once decompressed"],
        ),
        Bad(
            "a chunked body over the limit",
            Call(
                "POST",
                infer,
                b"".join(
                    f"{len(piece):x}\r\n".encode() + piece + b"\r\n" for piece in [b" " * 65536] * 4
                )
                + b"0\r\n\r\n",
                {"Transfer-Encoding": "chunked"},
                content_length=False,
            ),
            413,
            [f"exceeds {LIMIT_BYTES} bytes"],
        ),
    ]


async def test_bad_requests_get_a_status_naming_what_was_wrong(
    rest_gateway: Gateway, repository: Path
) -> None:
    assert rest_gateway.rest is not None
    port = rest_gateway.rest.port
    inputs, _ = samples(repository, "digits")
    for bad in bad_requests(inputs["input"]):
        answer = await send(port, bad.call)
        assert answer.status == bad.status, (bad.what, answer.status, answer.body[:300])
        assert answer.headers["content-type"] == "application/json", bad.what
        message = answer.error
        for words in bad.says:
            assert words in message, (bad.what, words, message)
        assert answer.headers.get("allow") == bad.allow, (bad.what, answer.headers)
    # Errors are not compressed when a compressed answer is asked for: clients read
    # them as plain JSON.
    answer = await send(
        port, Call("POST", infer_path("nope"), b"{}", {"Accept-Encoding": "gzip, deflate"})
    )
    assert answer.status == 404 and "content-encoding" not in answer.headers
    assert answer.error == "unknown model 'nope'"


async def test_a_body_over_the_limit_is_refused_before_it_is_read(rest_gateway: Gateway) -> None:
    assert rest_gateway.rest is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", rest_gateway.rest.port)
    try:
        # A gigabyte declared on a kept-alive connection, 16 KiB of it sent: the answer
        # cannot have waited for the rest.
        writer.write(
            f"POST {infer_path()} HTTP/1.1\r\nHost: x\r\nContent-Length: {2**30}\r\n\r\n".encode()
            + b" " * 16384
        )
        await writer.drain()
        answer = await asyncio.wait_for(_read_answer(reader), 30)
        assert answer.status == 413
        assert answer.error == f"request body of {2**30} bytes exceeds {LIMIT_BYTES} bytes"
        # Nor does it read the rest to discard it: the connection ends with the answer.
        assert answer.headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 30) == b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_good_requests_among_bad_ones_are_answered_and_counted_as_rest(
    rest_gateway: Gateway, repository: Path
) -> None:
    assert rest_gateway.rest is not None
    port = rest_gateway.rest.port
    inputs, reference = samples(repository, "digits")
    x, labels = inputs["input"], reference["label"].tolist()
    bads = bad_requests(x)
    calls: list[tuple[Call, list[int] | Bad]] = []
    for i in range(24):
        rows = slice(i % len(x), i % len(x) + 1 + i % 3)
        if i % 2:
            body, headers = binary_infer(x[rows])
            calls.append((Call("POST", infer_path(), body, headers), labels[rows]))
        else:
            calls.append((Call("POST", infer_path(), json_infer(x[rows])), labels[rows]))
        bad = bads[i % len(bads)]
        calls.append((bad.call, bad))
    answers = await asyncio.gather(*(send(port, call) for call, _ in calls))
    good = 0
    for answer, (_, expected) in zip(answers, calls, strict=True):
        if isinstance(expected, Bad):
            assert answer.status == expected.status, (expected.what, answer.body[:300])
        else:
            assert labels_of(answer) == expected
            good += 1
    registry = rest_gateway.registry

    def requests(protocol: str, outcome: str) -> float:
        return sum(
            sample.value
            for metric in registry.collect()
            if metric.name == "switchyard_requests"
            for sample in metric.samples
            if sample.name == "switchyard_requests_total"
            and sample.labels["protocol"] == protocol
            and sample.labels["outcome"] == outcome
        )

    assert requests("rest", "OK") == good
    assert requests("grpc", "OK") == 0
    # Bad inference requests are counted as the gRPC binding counts them, whether the
    # REST body did not decode or the servicer refused what it held.
    refused = Counter(e.outcome for _, e in calls if isinstance(e, Bad) and e.outcome)
    assert set(refused) == {"INVALID_ARGUMENT", "NOT_FOUND"}
    for outcome, count in refused.items():
        assert requests("rest", outcome) == count, outcome
    # One gRPC request: counted under its own protocol.
    async with grpc.aio.insecure_channel(rest_gateway.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await stub.ModelInfer(
            raw_request("digits", {"input": x[:1]}, {"input": "FP32"}), timeout=30
        )
    assert requests("grpc", "OK") == 1 and requests("rest", "OK") == good


async def test_compression_as_the_caller_asks(rest_gateway: Gateway, repository: Path) -> None:
    assert rest_gateway.rest is not None
    port = rest_gateway.rest.port
    inputs, reference = samples(repository, "digits")
    x, labels = inputs["input"][:4], reference["label"][:4].tolist()
    decoders: dict[str, Callable[[bytes], bytes]] = {
        "gzip": gzip.decompress,
        "deflate": zlib.decompress,
    }
    body = json_infer(x)

    def gzip_members(data: bytes) -> bytes:
        """gzip in two members one after the other (as `cat a.gz b.gz` makes)."""
        half = len(data) // 2
        return gzip.compress(data[:half]) + gzip.compress(data[half:])

    for request_coding, compress in (
        ("identity", bytes),
        ("gzip", gzip.compress),
        ("gzip", gzip_members),
        ("deflate", zlib.compress),
    ):
        for accept, answered in (
            ("", None),
            ("gzip", "gzip"),
            ("deflate", "deflate"),
            ("br, deflate;q=0.5", "deflate"),
            ("gzip;q=0, deflate", "deflate"),
            ("gzip;q=0.0", None),
            ("br", None),
        ):
            headers = {"Content-Encoding": request_coding}
            if accept:
                headers["Accept-Encoding"] = accept
            answer = await send(port, Call("POST", infer_path(), compress(body), headers))
            what = (request_coding, accept)
            assert answer.headers.get("content-encoding") == answered, what
            if answered is not None:
                answer.body = decoders[answered](answer.body)
            assert labels_of(answer) == labels, what


async def test_a_full_queue_is_429_with_retry_after(repository: Path) -> None:
    worker = await launch_worker(repository, threads=1, hardware_class="test-1c")
    gw = await start_gateway(
        fleet_config(
            {"only": (worker.address, 0.1)},
            latency_probe_interval_s=0,
            backend_queue_limit=1,
            attempt_timeout_slack_s=0,
        )
    )
    try:
        assert gw.rest is not None
        port = gw.rest.port
        held = await worker.hold("digits")
        inputs, reference = samples(repository, "digits")
        request = Call("POST", infer_path(), json_infer(inputs["input"][:1]))
        # One running (held at the worker), one waiting: the queue is at its limit.
        running = asyncio.ensure_future(send(port, request))
        await wait_until(lambda: held.gate.holding, what="the first request to run")
        waiting = asyncio.ensure_future(send(port, request))
        state = gw.fleet.backends["only"]
        await wait_until(lambda: state.in_flight == 2, what="the second to wait")
        shed = await send(port, request)
        assert shed.status == 429, shed.body
        assert "is at its queue limit" in shed.error and "limit 1" in shed.error, shed.error
        assert int(shed.headers["retry-after"]) >= 1
        assert int(shed.headers["retry-after-ms"]) >= 1
        held.gate.open()
        for accepted in (running, waiting):
            assert labels_of(await accepted) == reference["label"][:1].tolist()
    finally:
        await gw.stop()
        await worker.stop()


async def test_past_max_concurrent_rpcs_is_429_naming_the_limit(repository: Path) -> None:
    worker = await launch_worker(repository, threads=1, hardware_class="test-1c")
    gw = await start_gateway(
        fleet_config(
            {"only": (worker.address, 0.1)}, latency_probe_interval_s=0, max_concurrent_rpcs=2
        )
    )
    try:
        assert gw.rest is not None
        port = gw.rest.port
        held = await worker.hold("digits", max_batch_rows=8)
        inputs, reference = samples(repository, "digits")
        request = Call("POST", infer_path(), json_infer(inputs["input"][:1]))
        # Idle kept-alive connections are no requests: they do not count.
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        accepted = [asyncio.ensure_future(send(port, request)) for _ in range(2)]
        state = gw.fleet.backends["only"]
        await wait_until(lambda: state.in_flight == 2, what="two requests at the backend")
        over = await send(port, request)
        assert over.status == 429, over.body
        assert over.headers["content-type"] == "application/json"
        assert over.error == (
            "the gateway is serving its limit of 2 requests at once (gateway.max_concurrent_rpcs)"
        )
        assert over.headers["retry-after"] == "1"
        held.gate.open()
        for answer in accepted:
            assert labels_of(await answer) == reference["label"][:1].tolist()
        assert labels_of(await send(port, request)) == reference["label"][:1].tolist()
        for _, writer in idle:
            writer.close()
    finally:
        await gw.stop()
        await worker.stop()


async def test_no_ready_backend_is_503(repository: Path) -> None:
    worker = await launch_worker(repository, threads=1, hardware_class="test-1c")
    gw = await start_gateway(fleet_config({"only": (worker.address, 0.1)}))
    try:
        assert gw.rest is not None
        port = gw.rest.port
        ready = await send(port, Call("GET", "/v2/health/ready"))
        assert ready.status == 200 and ready.json() == {"ready": True}
        await worker.stop()
        await wait_until(lambda: not gw.fleet.model_ready("digits"), what="the backend to be out")
        answer = await send(
            port, Call("POST", infer_path(), json_infer(np.zeros((1, 64), np.float32)))
        )
        assert answer.status == 503, answer.body
        assert answer.error == "no healthy backend serves model 'digits' right now"
        ready = await send(port, Call("GET", "/v2/health/ready"))
        assert ready.status == 503 and ready.json() == {"ready": False}
        model = await send(port, Call("GET", "/v2/models/digits/ready"))
        assert model.status == 503 and model.json() == {"name": "digits", "ready": False}
        # Liveness is the gateway's own: still live.
        live = await send(port, Call("GET", "/v2/health/live"))
        assert live.status == 200 and live.json() == {"live": True}
    finally:
        await gw.stop()
        await worker.stop()


async def test_a_tiny_timeout_against_a_busy_backend_is_504(repository: Path) -> None:
    worker = await launch_worker(repository, threads=1, hardware_class="test-1c")
    gw = await start_gateway(
        fleet_config({"only": (worker.address, 0.1)}, latency_probe_interval_s=0)
    )
    try:
        assert gw.rest is not None
        held = await worker.hold("digits")  # never answers until the test opens it
        body = json_infer(np.zeros((1, 64), np.float32), {"timeout": 50_000})  # microseconds
        answer = await send(gw.rest.port, Call("POST", infer_path(), body))
        assert answer.status == 504, answer.body
        assert "deadline passed" in answer.error and "'digits'" in answer.error, answer.error
        held.gate.open()
    finally:
        await gw.stop()
        await worker.stop()


class Broken(Exception):
    """What the failing runtime raises."""


def failing_run(inputs: Mapping[str, Array], outputs: Sequence[str]) -> list[Array]:
    raise Broken("the accelerator fell off the bus")


async def test_a_backends_own_failure_is_502_and_the_gateways_is_not_blamed(
    repository: Path,
) -> None:
    worker = await launch_worker(repository, threads=1, hardware_class="test-1c")
    gw = await start_gateway(
        fleet_config({"only": (worker.address, 0.1)}, latency_probe_interval_s=0)
    )
    try:
        assert gw.rest is not None and worker.executor is not None
        served = worker.models["digits"]
        loaded = served.variants[served.default]
        await loaded.batcher.stop()
        outputs = [spec.name for spec in loaded.adapter.outputs]
        batcher = Batcher(failing_run, worker.executor, outputs, 1)
        batcher.start()
        served.variants[served.default] = LoadedVariant(loaded.variant, loaded.adapter, batcher)
        body = json_infer(np.zeros((1, 64), np.float32))
        answer = await send(gw.rest.port, Call("POST", infer_path(), body))
        assert answer.status == 502, answer.body
        assert "digits" in answer.error and "Broken" in answer.error, answer.error
        await batcher.stop()
    finally:
        await gw.stop()
        await worker.stop()


INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"


class ShortAnswers(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc is untyped here (Any)
    """A hop in front of a worker that forwards every call, and cuts the last byte off
    each inference answer's first output: a backend whose answers do not fit their
    shapes."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = str(details.method)
        if method.endswith("StreamInfer") or method.endswith("/Watch"):
            return None  # unary calls only (UNIMPLEMENTED): the gateway forwards unary

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                reply: bytes = await self.channel.unary_unary(method)(
                    request, timeout=context.time_remaining()
                )
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")
            if method != INFER_METHOD:
                return reply
            response = pb.ModelInferResponse.FromString(reply)
            response.raw_output_contents[0] = response.raw_output_contents[0][:-1]
            return response.SerializeToString()

        return grpc.unary_unary_rpc_method_handler(handle)


async def test_a_backend_answer_that_does_not_fit_its_shape_is_502(repository: Path) -> None:
    worker = await launch_worker(repository, threads=1, hardware_class="test-1c")
    channel = grpc.aio.insecure_channel(worker.address)
    hop = grpc.aio.server()
    hop.add_generic_rpc_handlers([ShortAnswers(channel)])
    hop_port = hop.add_insecure_port("127.0.0.1:0")
    await hop.start()
    gw = await start_gateway(
        fleet_config({"short": (f"127.0.0.1:{hop_port}", 0.1)}, latency_probe_interval_s=0)
    )
    try:
        assert gw.rest is not None
        body = json_infer(np.zeros((2, 64), np.float32))
        answer = await send(gw.rest.port, Call("POST", infer_path(), body))
        assert answer.status == 502, answer.body
        assert answer.error == (
            "model 'digits': output 'label': the backend's raw contents hold 15 bytes; "
            "shape [2] of INT64 needs 16"
        )
    finally:
        await gw.stop()
        await hop.stop(None)
        await channel.close()
        await worker.stop()


def client_context(pki: PKI, leaf: Leaf | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    if leaf is not None:
        context.load_cert_chain(str(leaf.cert_file), str(leaf.key_file))
    return context


async def refused(port: int, context: ssl.SSLContext | None) -> None:
    """A request that must not be answered: the connection fails, or ends without an
    HTTP answer."""
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await send(port, Call("GET", "/v2/health/live"), context)


async def test_tls_serves_https_and_refuses_plaintext(
    two_workers: tuple[Worker, Worker], tmp_path: Path, repository: Path
) -> None:
    pki = PKI(tmp_path, "rest")
    server = pki.server()
    a, b = two_workers
    gw = await start_gateway(
        fleet_config(
            {"cheap": (a.address, 0.04), "dear": (b.address, 0.08)},
            tls={"cert_file": str(server.cert_file), "key_file": str(server.key_file)},
        )
    )
    try:
        assert gw.rest is not None
        port = gw.rest.port
        inputs, reference = samples(repository, "digits")
        x = inputs["input"][:2]
        answer = await send(port, Call("POST", infer_path(), json_infer(x)), client_context(pki))
        assert labels_of(answer) == reference["label"][:2].tolist()
        await refused(port, None)
        stranger = PKI(tmp_path, "stranger")
        await refused(port, client_context(stranger))
    finally:
        await gw.stop()


async def test_mtls_refuses_a_client_without_a_certificate(
    two_workers: tuple[Worker, Worker], tmp_path: Path
) -> None:
    pki = PKI(tmp_path, "rest")
    clients = PKI(tmp_path, "clients")
    server = pki.server()
    a, b = two_workers
    gw = await start_gateway(
        fleet_config(
            {"cheap": (a.address, 0.04), "dear": (b.address, 0.08)},
            tls={
                "cert_file": str(server.cert_file),
                "key_file": str(server.key_file),
                "client_ca_file": str(clients.ca_file),
            },
        )
    )
    try:
        assert gw.rest is not None
        port = gw.rest.port
        known = client_context(pki, clients.client("known"))
        answer = await send(port, Call("GET", "/v2/health/live"), known)
        assert answer.status == 200 and answer.json() == {"live": True}
        await refused(port, client_context(pki))
        await refused(port, client_context(pki, pki.client("other")))
    finally:
        await gw.stop()
