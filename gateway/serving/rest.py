"""The Open Inference Protocol's REST binding (KServe v2 HTTP/REST), with the Triton
extensions its clients call: health, server and model metadata, model configuration,
statistics, the repository index, and inference in JSON or in Triton's binary tensor
data extension, gzip/deflate both ways.

A thin ASGI app under uvicorn (httptools' parser, the gateway's own uvloop loop): no
framework router, no per-request validation models. An inference body becomes the same
serialized ModelInferRequest the gRPC binding forwards (`rest_codec`), and goes through
the same servicer (`GatewayServicer.infer`): the same routing, dispatch, deadlines
(Triton's `timeout` parameter), admission limits and metrics, with `protocol="rest"`.
Backends stay gRPC. Errors are HTTP statuses with `{"error": "..."}` naming what was
wrong, mapped from the one gRPC status mapping (`code_for`).

Imports uvicorn, generated protobuf and the servicer: the serving plane's edge.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import logging
import math
import socket
import ssl
import time
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import grpc
import orjson
import uvicorn
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from backends.protocol.errors import Internal, InvalidInput, SwitchyardError, shown
from backends.protocol.status import StatusError, code_for, internal_message
from gateway.serving.rest_codec import decode_infer_request, encode_infer_response, error_body
from gateway.serving.servicer import GatewayServicer
from protos import inference_pb2 as pb

log = logging.getLogger("switchyard.rest")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

HEADER_LENGTH = b"inference-header-content-length"
"""Triton's binary tensor data extension: the length of the JSON part of a body whose
tensors follow it as raw bytes."""

JSON = b"application/json"
OCTETS = b"application/octet-stream"

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
"""gRPC status -> HTTP status. INTERNAL and UNKNOWN: 502 when a backend said it (its
fault, passed on), 500 when it is the gateway's own."""


class Disconnected(Exception):
    """The caller closed the connection before its body arrived: nothing to answer."""


class HttpError(Exception):
    """A request the REST binding refuses before it reaches the servicer (an unknown
    path, a method the path does not take, a body too large or undecodable)."""

    def __init__(self, status: int, message: str, allow: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.allow = allow


@dataclass(slots=True)
class Reply:
    status: int
    body: bytes
    content_type: bytes = JSON
    headers: tuple[tuple[bytes, bytes], ...] = ()


class RestApp:
    """The ASGI app: one coroutine per request, no middleware."""

    def __init__(
        self, servicer: GatewayServicer, max_body_bytes: int, max_in_flight: int | None = None
    ) -> None:
        self.servicer = servicer
        self.max_body_bytes = max_body_bytes
        self.max_in_flight = max_in_flight
        """Requests served at once (None: no limit); past it, 429 at once."""
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        headers = dict(scope["headers"])
        limit = self.max_in_flight
        if limit is not None and self.in_flight >= limit:
            # As gRPC answers past max_concurrent_rpcs: RESOURCE_EXHAUSTED, at once.
            message = (
                f"the gateway is serving its limit of {limit} requests at once "
                "(gateway.max_concurrent_rpcs)"
            )
            reply = Reply(429, error_body(message), headers=((b"retry-after", b"1"),))
            await _send(send, reply, b"")
            return
        self.in_flight += 1
        try:
            reply = await self._route(scope["method"], scope["path"], headers, receive)
        except Disconnected:
            return
        except HttpError as exc:
            extra = () if exc.allow is None else ((b"allow", exc.allow.encode()),)
            if exc.status == 413:
                # The rest of a body over the limit is not read, not even to discard
                # it on a kept-alive connection: the connection ends with the answer.
                extra = (*extra, (b"connection", b"close"))
            reply = Reply(exc.status, error_body(str(exc)), headers=extra)
        except SwitchyardError as exc:
            reply = _error_reply(exc)
        except Exception as exc:
            log.exception("REST %s %s failed", scope["method"], shown(scope["path"]))
            reply = Reply(500, error_body(internal_message(exc)))
        finally:
            self.in_flight -= 1
        await _send(send, reply, headers.get(b"accept-encoding", b""))

    async def _route(
        self, method: str, path: str, headers: dict[bytes, bytes], receive: Receive
    ) -> Reply:
        parts = path.strip("/").split("/")
        if parts[0] != "v2":
            raise HttpError(404, f"no endpoint at {shown(path)}: the API is under /v2")
        parts = parts[1:]
        servicer = self.servicer
        if parts in ([], [""]):
            _allow(method, "GET")
            return _json(_message_json(servicer.server_description()))
        if parts[0] == "health" and len(parts) == 2 and parts[1] in ("live", "ready"):
            _allow(method, "GET")
            if parts[1] == "live":
                return _json({"live": True})
            ready = servicer.fleet.any_ready()
            return _json({"ready": ready}, 200 if ready else 503)
        if parts == ["repository", "index"]:
            _allow(method, "POST")
            body = await self._body(headers, receive)
            return _json(
                [_message_json(m) for m in servicer.repository_of(_ready_only(body)).models]
            )
        if parts == ["models", "stats"]:
            _allow(method, "GET")
            return _json(_message_json(servicer.statistics_of()))
        if parts[0] == "models" and len(parts) >= 2 and parts[1]:
            return await self._model(method, parts[1], parts[2:], headers, receive)
        raise HttpError(404, f"no endpoint at {shown(path)}")

    async def _model(
        self,
        method: str,
        model: str,
        rest: list[str],
        headers: dict[bytes, bytes],
        receive: Receive,
    ) -> Reply:
        version = ""
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        servicer = self.servicer
        action = rest[0] if len(rest) == 1 else ("" if not rest else None)
        if action == "":
            _allow(method, "GET")
            return _json(_message_json(servicer.metadata_of(model, version)))
        if action == "ready":
            _allow(method, "GET")
            ready = servicer.is_model_ready(model, version)
            return _json({"name": model, "ready": ready}, 200 if ready else 503)
        if action == "config":
            _allow(method, "GET")
            return _json(_message_json(servicer.config_of(model, version).config))
        if action == "stats":
            _allow(method, "GET")
            return _json(_message_json(servicer.statistics_of(model, version)))
        if action == "infer":
            _allow(method, "POST")
            return await self._infer(model, version, headers, receive)
        raise HttpError(404, f"no endpoint {shown('/'.join(rest))} for model {shown(model)}")

    async def _infer(
        self, model: str, version: str, headers: dict[bytes, bytes], receive: Receive
    ) -> Reply:
        start_ns = time.perf_counter_ns()
        label = "(unknown)"  # unknown names stay out of metric labels
        try:
            self.servicer.described(model, version)  # unknown: a 404 before its body
            label = model
            body = await self._body(headers, receive)
            header_length = _header_length(headers.get(HEADER_LENGTH))
            request = decode_infer_request(body, header_length, model, version)
        except SwitchyardError as exc:
            # Counted as the servicer counts a request it refuses (a gRPC request that
            # does not parse, an unknown model): the same metrics for both bindings.
            metrics = self.servicer.metrics
            metrics.requests.labels(label, "none", "none", code_for(exc).name, "rest").inc()
            elapsed_s = (time.perf_counter_ns() - start_ns) / 1e9
            metrics.latency.labels(label, "none", "rest").observe(elapsed_s)
            raise
        tracing = self.servicer.tracing
        carrier = None if tracing is None else tracing.carrier_of_headers(headers)
        reply = await self.servicer.infer(
            request.message.SerializeToString(), None, "rest", carrier
        )
        try:
            answer, json_length = encode_infer_response(
                pb.ModelInferResponse.FromString(reply), request
            )
        except Internal as exc:
            # The backend's answer does not hold what it says (contents that do not
            # fit their shapes, a datatype unknown): its fault, passed on as a 502.
            raise HttpError(502, f"model {model!r}: {exc}") from exc
        if json_length is None:
            return Reply(200, answer)
        return Reply(200, answer, OCTETS, ((HEADER_LENGTH, str(json_length).encode()),))

    async def _body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        """The request's body, decompressed, at most `max_body_bytes` either way."""
        limit = self.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HttpError(413, f"request body of {int(declared)} bytes exceeds {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise HttpError(413, f"request body exceeds {limit} bytes")
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        encoding = headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding in (b"", b"identity"):
            return body
        return _decompressed(body, encoding, limit)


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise HttpError(405, f"{method} is not allowed here: use {allowed}", allow=allowed)


def _json(value: object, status: int = 200) -> Reply:
    return Reply(status, orjson.dumps(value))


def _ready_only(body: bytes) -> bool:
    """The repository index request's `{"ready": true}` (an empty body: all models)."""
    if not body.strip():
        return False
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"repository index request is not JSON: {exc}") from exc
    if not isinstance(request, dict):
        raise InvalidInput("repository index request must be a JSON object")
    ready = request.get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidInput(f"'ready' must be true or false, not {shown(ready)}")
    return ready


def _header_length(value: bytes | None) -> int | None:
    if value is None:
        return None
    text = value.decode("latin-1").strip()
    if not text.isdigit():
        raise InvalidInput(
            f"Inference-Header-Content-Length must be a non-negative integer, not {shown(text)}"
        )
    return int(text)


def _decompressed(body: bytes, encoding: bytes, limit: int) -> bytes:
    if encoding == b"gzip":
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == b"deflate":
        wbits = zlib.MAX_WBITS
    else:
        raise HttpError(
            415,
            f"Content-Encoding {shown(encoding.decode('latin-1'))} is not supported "
            "(gzip, deflate, identity)",
        )
    # gzip allows several members one after the other (`cat a.gz b.gz`): each is
    # inflated in turn, the limit counting them all.
    parts: list[bytes] = []
    size = 0
    rest = body
    while True:
        inflater = zlib.decompressobj(wbits)
        try:
            data = inflater.decompress(rest, limit + 1 - size)
        except zlib.error as exc:
            raise InvalidInput(
                f"request body is not valid {encoding.decode()} data: {exc}"
            ) from exc
        size += len(data)
        if size > limit:
            raise HttpError(413, f"request body exceeds {limit} bytes once decompressed")
        parts.append(data)
        if not inflater.eof:
            raise InvalidInput(f"request body is truncated {encoding.decode()} data")
        rest = inflater.unused_data
        if not rest:
            return parts[0] if len(parts) == 1 else b"".join(parts)
        if encoding != b"gzip":
            raise InvalidInput(f"request body has {len(rest)} bytes after its deflate data")


def _error_reply(exc: SwitchyardError) -> Reply:
    code = code_for(exc)
    status = HTTP_STATUS.get(code)
    if status is None:  # INTERNAL, UNKNOWN, DATA_LOSS
        status = 502 if isinstance(exc, StatusError) else 500
    headers: tuple[tuple[bytes, bytes], ...] = ()
    if exc.retry_after_ms is not None:
        ms = max(1, exc.retry_after_ms)
        headers = (
            (b"retry-after", str(math.ceil(ms / 1000)).encode()),
            (b"retry-after-ms", str(ms).encode()),
        )
    return Reply(status, error_body(str(exc)), headers=headers)


async def _send(send: Send, reply: Reply, accept_encoding: bytes) -> None:
    body = reply.body
    headers = [(b"content-type", reply.content_type), *reply.headers]
    # Only answers are compressed, as Triton does: an error's JSON stays readable to
    # clients (tritonclient.http) that decode it without looking at Content-Encoding.
    coding = _response_coding(accept_encoding) if reply.status == 200 and body else None
    if coding is not None:
        if coding == b"gzip":
            body = gzip.compress(body, compresslevel=1)
        else:
            body = zlib.compress(body, 1)
        headers.append((b"content-encoding", coding))
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _response_coding(accept_encoding: bytes) -> bytes | None:
    """gzip or deflate when the caller accepts it (as Triton does: only when asked)."""
    if not accept_encoding:
        return None
    offered = set()
    for item in accept_encoding.lower().split(b","):
        coding, *params = (part.strip() for part in item.split(b";"))
        if not any(_refused(param) for param in params):
            offered.add(coding)
    if b"gzip" in offered:
        return b"gzip"
    if b"deflate" in offered:
        return b"deflate"
    return None


def _refused(param: bytes) -> bool:
    """An Accept-Encoding parameter that refuses its coding: `q=0` (or 0.0, 0.00 ...)."""
    name, _, value = param.partition(b"=")
    return name.strip() == b"q" and value.strip().rstrip(b"0").rstrip(b".") in (b"0", b"")


# ---- protobuf messages as Triton's JSON --------------------------------------------------


def _message_json(message: Message) -> dict[str, Any]:
    """A message as Triton's REST endpoint writes it: proto field names, every field
    (defaults included, as its clients read them), 64-bit integers as numbers (not
    strings, as protobuf's JSON mapping has them), enums by name, bytes in base64."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            of = field.message_type.fields_by_name["value"]
            out[field.name] = {key: _field_json(of, item) for key, item in value.items()}
        elif field.is_repeated:
            out[field.name] = [_field_json(field, item) for item in value]
        elif field.containing_oneof is not None:
            if message.WhichOneof(field.containing_oneof.name) == field.name:
                out[field.name] = _field_json(field, value)
        elif field.message_type is not None and not message.HasField(field.name):
            continue
        else:
            out[field.name] = _field_json(field, value)
    return out


def _field_json(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None:
        return _message_json(value)
    if field.enum_type is not None:
        named = field.enum_type.values_by_number.get(value)
        return value if named is None else named.name
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value


# ---- the listener ------------------------------------------------------------------------


class RestServer:
    """uvicorn serving a RestApp on the running loop, on a socket bound at `start`."""

    def __init__(
        self,
        app: RestApp,
        listen: str,
        context: ssl.SSLContext | None,
        limit_concurrency: int | None,
        reuse_port: bool = False,
    ) -> None:
        # The app keeps the limit, answering past it as the gRPC listener does (429,
        # JSON): uvicorn's own limit answers a plain-text 503 and counts idle
        # kept-alive connections as requests.
        app.max_in_flight = limit_concurrency
        self._socket = bind_listener(listen, reuse_port)
        self.port: int = self._socket.getsockname()[1]
        self._server = uvicorn_server(app, "httptools", context, timeout_graceful_shutdown=2)
        self._ticks: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._server.startup(sockets=[self._socket])
        # uvicorn's tick: refreshes the Date header once a second.
        self._ticks = asyncio.get_running_loop().create_task(self._server.main_loop())

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._ticks is not None:
            await self._ticks
        if self._server.started:
            await self._server.shutdown(sockets=[self._socket])
        self._socket.close()


def uvicorn_server(
    app: Any, http: str = "httptools", context: ssl.SSLContext | None = None, **options: Any
) -> uvicorn.Server:
    """uvicorn as the gateway runs it on its own loop: `http`'s parser, no lifespan
    events, no access log or server header, uvicorn's logging left alone; TLS with
    `context`. Started with `startup(sockets=[...])`, never `serve()` (which takes the
    process's signals)."""
    config = uvicorn.Config(
        app,
        http=http,
        loop="none",
        interface="asgi3",
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        **options,
    )
    config.load()
    config.ssl = context
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)  # off: no startup events
    return server


def bind_listener(listen: str, reuse_port: bool = False) -> socket.socket:
    """A listening socket at HOST:PORT (`[v6]:PORT` too); OSError when it cannot bind.
    `reuse_port`: SO_REUSEPORT, shared with the other processes of a `--processes` group."""
    host, port = listen.rsplit(":", 1)
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio turns Nagle off only on sockets that say TCP
    # (uvloop does either way); with it on, each kept-alive answer can wait ~40 ms for a
    # delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, int(port)))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
