"""The backend worker: serves a model repository over the Open Inference Protocol.

`switchyard backend --repository DIR --listen HOST:PORT --threads N
--hardware-class NAME [--models ...]` loads every servable variant of each model
(ONNX Runtime or Apache TVM; the fastest by its profile here is the default, a
request may name another with `switchyard_variant`), verifies each artifact's
sha256 against its manifest, and answers the same gRPC API as the gateway, so the
gateway can route to it or to any other v2 server alike. Inference runs in worker
threads behind a dynamic batcher, never on the event loop. On start it prints one
JSON line,
`{"event": "listening", "address": ..., "pid": ...}`, for supervisors.

Under overload it sheds rather than queues without end: each model variant's queue
holds at most `--max-queue` requests, and one more is answered RESOURCE_EXHAUSTED at
once, naming the limit, with a `grpc-retry-pushback-ms` trailer (gRPC's retry
design, A6) saying about when room frees; a request whose deadline (its gRPC
deadline, or Triton's `timeout` parameter) passed while it waited is answered
DEADLINE_EXCEEDED without running; and past `--max-concurrent-rpcs` calls in
progress, gRPC itself answers RESOURCE_EXHAUSTED (never CANCELLED: its backlog of
calls not yet handed over is deep). Health, liveness, readiness and metadata are
answered on the event loop; inference runs in worker threads, off it.

With `--tls-cert` and `--tls-key` it listens over TLS; with `--tls-client-ca` too, it
answers only clients whose certificate that CA signed (the gateway gives the workers
it launches such files, from its private CA, so that only it reaches them).

The models it serves, and which variants may be served, are `served.py`'s.

A protocol edge: grpc and generated protobuf are imported here and in backends.protocol;
nothing from the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from backends import __version__
from backends.process import PARENT_PID_ENV, die_with_parent, stop_on_signals, use_uvloop
from backends.protocol.codec import (
    decode_request,
    encode_response,
)
from backends.protocol.errors import (
    Exhausted,
    Internal,
    InvalidInput,
    ModelNotFound,
    SwitchyardError,
    shown,
)
from backends.protocol.load import (
    BUCKETS,
    CALLER_PARAMETER,
    DUE_EDGES_MS,
    PROBE_MODULUS,
    LoadReport,
    caller_group,
    report_field,
)
from backends.protocol.parameters import (
    AFTER_WAITING_PARAMETER,
    DUE_PARAMETER,
    LATE_REFUSAL,
    REFUSE_LATE_PARAMETER,
    checked_due_us,
    checked_flag,
    checked_priority,
    checked_timeout_us,
    priority_level,
)
from backends.protocol.status import aborts_with_status, code_for, internal_message
from backends.protocol.streams import (
    RETRY_AFTER_PARAMETER,
    STATUS_PARAMETER,
    WireError,
    length_delimited,
    message_id,
)
from backends.tracing import TRACEPARENT, TraceSettings, TracingError
from backends.worker.batching import DEFAULT_MAX_QUEUE, Batcher, answer_in_ns
from backends.worker.served import (
    AUTO_INLINE_BELOW_US,
    DEFAULT_MAX_MESSAGE_BYTES,
    MEASURE_BUDGET_S,
    MEASURE_RUNS,
    MODEL_VERSION,
    ServedModel,
    WorkerSettings,
    load_models,
    parse_batching,
)
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # imported only where tracing is on (backends.worker.tracing)
    from backends.worker.tracing import RequestTrace, WorkerTracing

log = logging.getLogger("switchyard.backend")

SERVICE = "inference.GRPCInferenceService"

CONCURRENT_RPCS_PER_QUEUED = 4
"""The default concurrency limit: this many RPCs per request each served model's queue
may hold ..."""
CONCURRENT_RPCS_HEADROOM = 64
"""... plus this many, for probes, metadata and the batches running."""

PENDING_CALLS_SOFT_LIMIT = 20_000
"""Calls gRPC may hold for this server before it cancels some at random ..."""
PENDING_CALLS_HARD_LIMIT = 40_000
"""... and before it cancels every further one (gRPC's defaults: 1,000 and 3,000)."""

_DUE_EDGES_NS = [int(edge * 1e6) for edge in DUE_EDGES_MS]
_STREAM_INFER_RESPONSE = 2
"""ModelStreamInferResponse.infer_response."""


def default_max_concurrent_rpcs(max_queue: int, models: int) -> int:
    """The default limit on RPCs in progress with `models` models served: generous
    enough that every model's full queue, its batch running and the answers being sent
    fit well inside it, so the queue bounds shed first (and probes are answered) and the
    limit only guards the process."""
    return CONCURRENT_RPCS_PER_QUEUED * max_queue * max(1, models) + CONCURRENT_RPCS_HEADROOM


@aborts_with_status
class WorkerServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The v2 API over the served models (a SwitchyardError raised by an RPC is the
    caller's status: backends.protocol.status)."""

    def __init__(
        self,
        models: dict[str, ServedModel],
        settings: WorkerSettings,
        tracing: WorkerTracing | None = None,
    ) -> None:
        self.models = models
        self.settings = settings
        self.tracing = tracing
        """Spans for each request's queue wait and run; None: off."""
        self._reports = itertools.count(1)
        """Load reports' sequence numbers."""
        self._probes = 0
        """Latency probes answered (`switchyard_after_waiting` requests), for the reports."""
        self._intakes: set[asyncio.Task[None]] = set()
        """The streams' readers while they take requests (`end_streams` stops them)."""
        self._ending = False

    def end_streams(self) -> None:
        """The worker stops: every stream takes no further request, answers those it
        took and ends (OK), and a stream opened from now on ends at once. Its callers
        (a gateway's long-lived streams, idle most of the time) learn it now, not when
        the server's grace runs out, and send elsewhere; a request they sent that the
        stream did not take fails with the stream's end, which a gateway retries."""
        self._ending = True
        for intake in self._intakes:
            intake.cancel()

    def _model(self, name: str, version: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(f"unknown model {shown(name)}")
        model.check_version(version)
        return model

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=bool(self.models))

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        model = self.models.get(request.name)
        ready = model is not None and request.version in ("", MODEL_VERSION)
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="switchyard-backend",
            version=__version__,
            extensions=["model_configuration", "statistics", "model_repository"],
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return self._model(request.name, request.version).metadata()

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self._model(request.name, request.version).config())

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        if request.name:
            chosen = [self._model(request.name, request.version)]
        else:
            chosen = [self.models[name] for name in sorted(self.models)]
        return pb.ModelStatisticsResponse(model_stats=[m.statistics() for m in chosen])

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        reply = pb.RepositoryIndexResponse()
        for name in sorted(self.models):
            reply.models.add(name=name, version=MODEL_VERSION, state="READY")
        return reply

    async def ModelInfer(
        self, request: pb.ModelInferRequest | bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        # A full queue's QueueFull carries its retry hint: aborts_with_status sends it
        # as the grpc-retry-pushback-ms trailer.
        if self.tracing is None:
            return await self._infer(request, context.time_remaining())
        metadata = context.invocation_metadata() or ()
        return await self._infer(request, context.time_remaining(), metadata)

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest | bytes],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[bytes]:
        """Requests run concurrently, each answered as it finishes (out of order), with
        its `id` echoed; an error is that request's answer (`error_message`, and its
        status and retry hint as parameters: backends.protocol.streams), never the
        stream's end. Each request's deadline is its `timeout` parameter (a stream has
        one gRPC deadline for all), or the stream's, whichever comes first. The stream
        ends when the caller's side ends and every answer is sent."""
        answers: asyncio.Queue[bytes | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()
        metadata = None if self.tracing is None else (context.invocation_metadata() or ())

        async def answer(request: pb.ModelInferRequest | bytes) -> None:
            try:
                response = await self._infer(request, context.time_remaining(), metadata, True)
            except SwitchyardError as exc:
                answers.put_nowait(_stream_error(request, exc).SerializeToString())
            else:
                answers.put_nowait(length_delimited(_STREAM_INFER_RESPONSE, response))

        async def read() -> None:
            try:
                intake = asyncio.current_task()
                assert intake is not None
                if not self._ending:
                    self._intakes.add(intake)
                    try:
                        async for request in request_iterator:
                            task = asyncio.ensure_future(answer(request))
                            running.add(task)
                            task.add_done_callback(running.discard)
                    except asyncio.CancelledError:
                        # Once the worker ends its streams, a cancellation here stops the
                        # intake only: the requests taken are still answered (where the
                        # caller went away instead, their own tasks are cancelled too).
                        if not self._ending:
                            raise
                        intake.uncancel()
                    finally:
                        self._intakes.discard(intake)
                while running:
                    await asyncio.wait(set(running))
            finally:
                answers.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                item = await answers.get()
                if item is None:
                    break
                yield item
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()
        await reader

    async def _infer(
        self,
        given: pb.ModelInferRequest | bytes,
        remaining_s: float | None,
        metadata: Sequence[tuple[str, str | bytes]] | None = None,
        stream: bool = False,
    ) -> bytes:
        """Runs one request with `remaining_s` left of its call's deadline (None: none)
        or less, as Triton's `timeout` parameter says; returns the serialized answer,
        with a load report at its end when the request names its caller (see
        backends.protocol.load). A failure is counted and raised as a SwitchyardError
        (any other exception as Internal). `metadata`: its call's, given where tracing
        is on (`stream`: the call is a stream)."""
        start_ns = time.perf_counter_ns()
        model: ServedModel | None = None
        request = pb.ModelInferRequest()
        trace: RequestTrace | None = None
        try:
            request = _parsed(given)
            model = self._model(request.model_name, request.model_version)
            decoded = decode_request(request, model.signature)
            model.decode_ns += time.perf_counter_ns() - start_ns
            chosen = model.choose(decoded.parameters.get("switchyard_variant"))
            priority = checked_priority(decoded.parameters.get("priority"))
            due_us = checked_due_us(decoded.parameters.get(DUE_PARAMETER))
            caller = decoded.parameters.get(CALLER_PARAMETER)
            probe = checked_flag(
                AFTER_WAITING_PARAMETER, decoded.parameters.get(AFTER_WAITING_PARAMETER)
            )
            if probe:
                due_us = self._after_waiting_us()
            refuse_late = checked_flag(
                REFUSE_LATE_PARAMETER, decoded.parameters.get(REFUSE_LATE_PARAMETER)
            )
            if due_us is not None and refuse_late:
                self._refuse_if_late(model.name, chosen.batcher, priority, due_us)
            timeout = decoded.parameters.get("timeout")
            if timeout is not None:
                timeout_s = checked_timeout_us(timeout) / 1e6
                remaining_s = timeout_s if remaining_s is None else min(remaining_s, timeout_s)
            if metadata is not None and self.tracing is not None:
                trace = self.tracing.request(
                    metadata, decoded.parameters.get(TRACEPARENT), stream, start_ns
                )
                if trace is not None:
                    trace.queued(model.name, chosen.name, decoded.batch_size)
            try:
                outputs, queued_ns = await chosen.batcher.infer_waited(
                    decoded.inputs,
                    decoded.batch_size,
                    priority,
                    due_us,
                    remaining_s,
                    caller=str(caller) if caller is not None else "",
                    trace=trace,
                )
            except SwitchyardError:
                raise
            except Exception as exc:  # a runtime rejected what validation let through
                raise _runtime_error(model.name, exc) from exc
            computed_ns = time.perf_counter_ns()
            response = pb.ModelInferResponse(
                model_name=model.name, model_version=MODEL_VERSION, id=decoded.id
            )
            encode_response(
                response,
                model.output_specs,
                decoded.outputs,
                [outputs[name] for name in decoded.outputs],
                decoded.raw_output,
            )
            response.parameters["switchyard_variant"].string_param = chosen.name
            answer = response.SerializeToString()
            if probe:
                self._probes += 1
            if caller is not None:
                answer += self._load_report(str(caller), queued_ns)
            done_ns = time.perf_counter_ns()
            model.encode_ns += done_ns - computed_ns
            elapsed = done_ns - start_ns
            model.success[0] += 1
            model.success[1] += elapsed
            model.last_inference_ms = int(time.time() * 1000)
            if trace is not None:
                trace.finish()
            return answer
        except asyncio.CancelledError as exc:  # the caller went away, or its deadline passed
            if model is not None:
                model.fail[0] += 1
                model.fail[1] += time.perf_counter_ns() - start_ns
            if trace is not None:
                trace.finish(exc)
            raise
        except Exception as exc:
            if model is not None:
                model.fail[0] += 1
                model.fail[1] += time.perf_counter_ns() - start_ns
            if trace is not None:
                trace.finish(exc)
            if isinstance(exc, SwitchyardError):
                raise
            # A fault of ours: INTERNAL for the caller (a stream goes on), never UNKNOWN.
            log.exception("request for model %s failed", shown(request.model_name))
            raise Internal(internal_message(exc)) from exc

    def _batchers(self) -> Iterator[Batcher]:
        """Every batcher of this worker: one per model variant."""
        return (b for model in self.models.values() for b in model.batchers())

    def _after_waiting_us(self) -> int:
        """How soon (us) the latest-due of the requests waiting across this worker's
        batchers is due (0: none waits, or it is overdue): the due time of a request
        that asks to go after them (`switchyard_after_waiting`)."""
        now_ns = time.perf_counter_ns()
        latest = max(
            (due for b in self._batchers() if (due := b.latest_due_ns()) is not None),
            default=now_ns,
        )
        return max(0, (latest - now_ns) // 1000 + 1)  # +1: after it, its clock read later

    def _refuse_if_late(self, model: str, batcher: Batcher, priority: int, due_us: int) -> None:
        """Exhausted (RESOURCE_EXHAUSTED) when a request due in `due_us` would be
        answered later than that, behind the work ahead of it in this worker's queues
        (`batching.answer_in_ns`): its sender asked to be told at once, to send it
        elsewhere (`switchyard_refuse_late`), rather than wait here past its time."""
        now_ns = time.perf_counter_ns()
        level = priority_level(priority)
        due_ns = now_ns + due_us * 1000
        threads = self.settings.threads
        answer_ns = answer_in_ns(self._batchers(), threads, batcher, level, due_ns, now_ns)
        if answer_ns is not None and answer_ns > due_us * 1000:
            batcher.stats.refused_late += 1
            raise Exhausted(
                f"model {model}: {LATE_REFUSAL} ({answer_ns / 1e6:.1f} ms from now, due in "
                f"{due_us / 1000:.1f} ms); refused as {REFUSE_LATE_PARAMETER} asked"
            )

    def _load_report(self, caller: str, queued_ns: int) -> bytes:
        """This worker's queue now, less `caller`'s own requests, as the load report
        field to end its answer with; with the requests of callers outside `caller`'s
        group, where it names one, the latency probes answered so far and the answer's
        own wait, `queued_ns` (backends.protocol.load)."""
        now_ns = time.perf_counter_ns()
        counts = [0] * BUCKETS
        work_ns = [0.0] * BUCKETS
        running = 0
        foreign = 0
        group = caller_group(caller)
        rest_ns: int | None = None
        for model in self.models.values():
            for batcher in model.batchers():
                ends_ns, outside = batcher.others_load(
                    caller, now_ns, _DUE_EDGES_NS, counts, work_ns, group
                )
                foreign += outside
                if ends_ns is not None:
                    running += 1
                    rest_ns = ends_ns if rest_ns is None else min(rest_ns, ends_ns)
        threads = self.settings.threads
        report = LoadReport(
            next(self._reports),
            threads,
            min(running, threads),
            0 if rest_ns is None else rest_ns // 1000,
            tuple((c, int(w / 1000)) for c, w in zip(counts, work_ns, strict=True)),
            None if group is None else foreign,
            max(0, queued_ns) // 1000,
            self._probes % PROBE_MODULUS,
        )
        return report_field(report)


def _parsed(request: pb.ModelInferRequest | bytes) -> pb.ModelInferRequest:
    """A request as it came (bytes, see `add_servicer`), parsed: InvalidInput when it is
    not a ModelInferRequest (gRPC's own parse would answer UNKNOWN, which a gateway
    retries and holds against the backend)."""
    if not isinstance(request, bytes):
        return request
    try:
        return pb.ModelInferRequest.FromString(request)
    except DecodeError as exc:
        raise InvalidInput("request is not a valid ModelInferRequest") from exc


def _stream_error(
    request: pb.ModelInferRequest | bytes, error: SwitchyardError
) -> pb.ModelStreamInferResponse:
    """A request's error as its answer on a stream: the message, and in the response's
    parameters the status code and the retry hint a unary call would carry."""
    if isinstance(request, bytes):
        try:
            request_id = message_id(request)
        except WireError:
            request_id = ""
    else:
        request_id = request.id
    reply = pb.ModelStreamInferResponse(error_message=str(error))
    reply.infer_response.id = request_id
    parameters = reply.infer_response.parameters
    parameters[STATUS_PARAMETER].string_param = code_for(error).name
    if error.retry_after_ms is not None:
        parameters[RETRY_AFTER_PARAMETER].int64_param = max(1, error.retry_after_ms)
    return reply


class _Registration:
    """Stands for the server while the generated code registers the servicer, to take
    its method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers = dict(handlers)


def add_servicer(servicer: WorkerServicer, server: grpc.aio.Server) -> None:
    """The generated registration, except that ModelInfer and ModelStreamInfer take
    their requests as bytes and parse them in the handler (`_parsed`), and give their
    answers as bytes."""
    registration = _Registration()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, registration)
    handlers = registration.handlers
    # Answers go out as the handlers serialized them (a load report at their end).
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(servicer.ModelInfer)
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(servicer.ModelStreamInfer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def _runtime_error(model: str, exc: Exception) -> SwitchyardError:
    kind = type(exc).__name__
    if kind in ("InvalidArgument", "InvalidGraph"):
        return InvalidInput(f"model {model!r} rejected the input: {exc}")
    log.exception("model %s failed", model)
    return Internal(f"model {model!r} failed: {kind}: {exc}")


def server_credentials(
    cert_file: Path, key_file: Path, client_ca_file: Path | None
) -> grpc.ServerCredentials:
    """TLS credentials from PEM files; client certificates signed by `client_ca_file`
    required when it is given. OSError when a file cannot be read."""
    root = client_ca_file.read_bytes() if client_ca_file is not None else None
    return grpc.ssl_server_credentials(
        [(key_file.read_bytes(), cert_file.read_bytes())],
        root_certificates=root,
        require_client_auth=root is not None,
    )


async def start_worker(
    settings: WorkerSettings,
    listen: str,
    credentials: grpc.ServerCredentials | None = None,
    tracing: WorkerTracing | None = None,
) -> tuple[grpc.aio.Server, int, dict[str, ServedModel], ThreadPoolExecutor, WorkerServicer]:
    """Loads the models and starts serving on `listen` (over TLS with `credentials`,
    tracing requests with `tracing`); returns the bound port, and the servicer whose
    `end_streams` a stop calls first."""
    executor = ThreadPoolExecutor(max_workers=max(2, settings.threads), thread_name_prefix="infer")
    models = await asyncio.get_running_loop().run_in_executor(None, load_models, settings, executor)
    for model in models.values():
        for batcher in model.batchers():
            batcher.start()
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
        # A gateway pings its backends while calls are out (to find a hung one): take
        # pings as often as every second without calling it abuse.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
        ("grpc.http2.max_ping_strikes", 0),
    ]
    max_rpcs = settings.max_concurrent_rpcs or default_max_concurrent_rpcs(
        settings.max_queue, len(models)
    )
    options += [
        # Calls gRPC has accepted but not yet handed to this server wait in its
        # backlog; past 1,000 it cancels them at random (CANCELLED, which a caller
        # cannot act on). A deep backlog instead: each call reaches the concurrency
        # limit or the queue bound and is answered RESOURCE_EXHAUSTED.
        ("grpc.server.max_pending_requests", PENDING_CALLS_SOFT_LIMIT),
        ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS_HARD_LIMIT),
    ]
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=max_rpcs)
    servicer = WorkerServicer(models, settings, tracing)
    add_servicer(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if credentials is None:
        port = server.add_insecure_port(listen)
    else:
        port = server.add_secure_port(listen, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    await health_servicer.set("", serving)
    await health_servicer.set("inference.GRPCInferenceService", serving)
    for name in models:
        await health_servicer.set(name, serving)
    return server, port, models, executor, servicer


async def serve(
    settings: WorkerSettings,
    listen: str,
    credentials: grpc.ServerCredentials | None = None,
    tracing: WorkerTracing | None = None,
) -> None:
    server, port, models, executor, servicer = await start_worker(
        settings, listen, credentials, tracing
    )
    host = listen.rsplit(":", 1)[0]
    print(
        json.dumps(
            {
                "event": "listening",
                "address": f"{host}:{port}",
                "pid": os.getpid(),
                "models": sorted(models),
            }
        ),
        flush=True,
    )
    await stop_on_signals().wait()
    servicer.end_streams()
    await server.stop(grace=2.0)
    for model in models.values():
        for batcher in model.batchers():
            await batcher.stop()
    executor.shutdown(wait=False, cancel_futures=True)
    if tracing is not None:
        tracing.shutdown()  # the spans still held leave now


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", type=Path, required=True, help="model repository directory")
    parser.add_argument("--listen", default="127.0.0.1:9101", help="HOST:PORT (port 0: any free)")
    parser.add_argument(
        "--threads", type=int, default=1, help="inference threads (the instance size)"
    )
    parser.add_argument("--hardware-class", default="cpu", help="what this worker stands for")
    parser.add_argument("--models", nargs="*", default=[], help="models to serve (default: all)")
    parser.add_argument(
        "--emulate-latency-ms",
        type=float,
        default=0.0,
        help="added service time per row, standing for slower hardware",
    )
    parser.add_argument(
        "--max-batch-rows",
        type=int,
        default=0,
        help="dynamic batching: most rows merged into one execution (1: none; "
        "default: the variant's max_batch_size)",
    )
    parser.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=0,
        help="dynamic batching: how long a batch may wait for more requests",
    )
    parser.add_argument(
        "--batching",
        nargs="*",
        default=[],
        metavar="MODEL=ROWS:DELAY_US",
        help="dynamic batching for one model: most rows per execution and the longest "
        "wait for more (e.g. resnet=8:2000), in place of the two options above",
    )
    parser.add_argument(
        "--cpus",
        type=int,
        nargs="*",
        default=[],
        help="pin the worker to these CPU numbers (default: no pinning)",
    )
    parser.add_argument(
        "--precisions",
        nargs="*",
        default=[],
        help="precisions allowed (fp32 fp16 int8); default: any that passed its accuracy check",
    )
    parser.add_argument(
        "--measure-at-start",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time each variant without a profile for this hardware class and threads "
        f"after its warm-up (batch 1, at most {MEASURE_RUNS} runs or {MEASURE_BUDGET_S:g} s "
        "each) to choose the default variant and advertise to the gateway; nothing is "
        "written to the repository (default: on)",
    )
    parser.add_argument(
        "--inline-below-us",
        type=int,
        default=None,
        help="run a variant whose recent runs average under this many microseconds on "
        "the event loop, not in an inference thread: less CPU and latency per request, "
        "but for a variant that batches, smaller batches under concurrent load; 0: "
        f"never (default: {AUTO_INLINE_BELOW_US} us for a variant that merges no rows "
        "on a one-thread worker, else never)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help="most requests waiting per model variant; more are shed at once with "
        f"RESOURCE_EXHAUSTED (default: {DEFAULT_MAX_QUEUE})",
    )
    parser.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=0,
        help="most calls in progress at once, health checks included; more are answered "
        f"RESOURCE_EXHAUSTED by gRPC (default: {CONCURRENT_RPCS_PER_QUEUED} x --max-queue "
        f"x the models served + {CONCURRENT_RPCS_HEADROOM})",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest request or response accepted",
    )
    parser.add_argument(
        "--tls-cert", type=Path, default=None, help="serve over TLS with this certificate (PEM)"
    )
    parser.add_argument("--tls-key", type=Path, default=None, help="the certificate's key (PEM)")
    parser.add_argument(
        "--tls-client-ca",
        type=Path,
        default=None,
        help="require client certificates signed by these CAs (PEM): mTLS",
    )
    parser.add_argument(
        "--trace-exporter",
        choices=["otlp", "file", "none"],
        default=None,
        help="OpenTelemetry spans of each request's queue wait and run, children of the "
        "caller's traceparent: OTLP over gRPC, or JSON lines to --trace-file "
        "(default: OTEL_TRACES_EXPORTER, otlp or none; else none)",
    )
    parser.add_argument(
        "--trace-endpoint",
        default=None,
        help="the OTLP collector, http://HOST:4317 (default: "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT, "
        "else http://localhost:4317)",
    )
    parser.add_argument(
        "--trace-file",
        type=Path,
        default=None,
        help="where the file exporter appends its spans, one JSON object a line "
        "(alone, it chooses the file exporter)",
    )
    parser.add_argument(
        "--trace-service-name",
        default=None,
        help="service.name of the spans (default: OTEL_SERVICE_NAME, else switchyard-backend)",
    )
    parser.add_argument(
        "--trace-sample-ratio",
        type=float,
        default=None,
        help="share of the traces begun here that are recorded; a caller's sampled flag "
        "decides for its own (default: OTEL_TRACES_SAMPLER_ARG, else 1)",
    )


def run(args: argparse.Namespace) -> int:
    # A worker the gateway launched ends when the gateway does: armed here, first
    # thing, rather than between fork and exec in the threaded gateway.
    parent = os.environ.get(PARENT_PID_ENV, "")
    if parent.isdigit():
        die_with_parent(int(parent))
    if args.threads < 1:
        print("--threads must be at least 1", file=sys.stderr)
        return 2
    if args.max_queue < 1 or args.max_concurrent_rpcs < 0:
        print("--max-queue must be at least 1, --max-concurrent-rpcs at least 0", file=sys.stderr)
        return 2
    credentials = None
    if (args.tls_cert is None) != (args.tls_key is None):
        print("--tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.tls_client_ca is not None and args.tls_cert is None:
        print("--tls-client-ca needs --tls-cert and --tls-key", file=sys.stderr)
        return 2
    if args.tls_cert is not None:
        try:
            credentials = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
        except OSError as exc:
            print(f"cannot read TLS files: {exc}", file=sys.stderr)
            return 2
    try:
        batching = parse_batching(args.batching)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    exporter = args.trace_exporter
    if exporter is None and args.trace_file is not None:
        exporter = "file"
    tracing = None
    try:
        trace_settings = TraceSettings(
            exporter,
            args.trace_endpoint,
            args.trace_file,
            args.trace_service_name,
            args.trace_sample_ratio,
        ).resolved("switchyard-backend")
        if trace_settings.on:
            from backends.worker.tracing import WorkerTracing, worker_provider

            provider = worker_provider(trace_settings)
            tracing = None if provider is None else WorkerTracing(provider)
    except TracingError as exc:
        print(f"tracing: {exc}", file=sys.stderr)
        return 2
    settings = WorkerSettings(
        repository=args.repository,
        threads=args.threads,
        hardware_class=args.hardware_class,
        models=tuple(args.models),
        emulate_latency_ms=args.emulate_latency_ms,
        max_queue_delay_us=args.max_queue_delay_us,
        max_batch_rows=max(0, args.max_batch_rows),
        batching=batching,
        max_message_bytes=args.max_message_bytes,
        max_queue=args.max_queue,
        max_concurrent_rpcs=args.max_concurrent_rpcs or None,
        precisions=tuple(args.precisions),
        measure_at_start=args.measure_at_start,
        inline_below_us=None if args.inline_below_us is None else max(0, args.inline_below_us),
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.cpus:
        try:
            os.sched_setaffinity(0, set(args.cpus))
        except (OSError, ValueError) as exc:
            print(f"cannot pin to CPUs {args.cpus}: {exc}", file=sys.stderr)
            return 2
    prepare_runtimes(settings.threads)
    use_uvloop()
    asyncio.run(serve(settings, args.listen, credentials, tracing))
    return 0


def prepare_runtimes(threads: int) -> None:
    """Before any runtime loads in this worker process: TVM's runtime library only (not
    its compiler), with exactly `threads` threads."""
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    os.environ["TVM_NUM_THREADS"] = str(threads)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="switchyard backend", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
