"""The gateway's Open Inference Protocol servicer.

ModelInfer and ModelStreamInfer take the request as serialized bytes, parse only
the header routing needs, and forward the original bytes to the chosen backend;
the backend's response bytes come back with the gateway's response parameters
appended (protobuf merges them). Metadata, readiness, configuration and the
repository index are answered from the fleet state; statistics from the
gateway's own counters. The protocol edge only: each request's attempts, retries,
hedges and deadline are the Dispatcher's (`dispatch.py`), its calls the transport's
(`transport.py`); errors reach callers through the one status mapping
(`aborts_with_status`).

Imports grpc and generated protobuf (the edge); the routing core for choosing; never
the control plane, the simulator or the load tools.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from backends import __version__
from backends.protocol.errors import (
    Exhausted,
    Internal,
    InvalidInput,
    ModelNotFound,
    SwitchyardError,
    Unavailable,
    shown,
)
from backends.protocol.status import aborts_with_status, code_for, internal_message
from backends.tracing import TraceSettings, TracingError
from gateway.config import ConfigError, TracingSettings
from gateway.routing.fleet import FleetState, ModelInfo, Route
from gateway.routing.policy import PolicyBook
from gateway.routing.router import Chooser, carbon_g, choose, cost_usd, retry_hint_ms
from gateway.routing.sla import Policy
from gateway.serving.converters import (
    REMOTE_VARIANT,
    check_header,
    config_message,
    cost_parameter,
    metadata_message,
    response_parameters,
    route_request,
    stream_error,
    stream_response,
    timeout_param_s,
)
from gateway.serving.dispatch import Dispatcher, Job, LoopTimers, Observer, Transport
from gateway.serving.metrics import GatewayMetrics
from gateway.serving.pool import BackendPool
from gateway.serving.stats import ModelCounters
from gateway.serving.transport import Forward, GatewayObserver, GrpcTransport
from protos import gateway_pb2
from protos import inference_pb2 as pb

if TYPE_CHECKING:  # imported only where tracing is on (gateway.serving.tracing)
    from gateway.serving.tracing import Carrier, GatewayTracing, RequestTrace

log = logging.getLogger("switchyard.gateway")

SERVICE = "inference.GRPCInferenceService"
EXTENSIONS = ["model_configuration", "statistics", "model_repository", "switchyard_routing"]
STREAM_WINDOW = 64
"""The most requests of one ModelStreamInfer stream in flight at once: past it, the
stream reads no further request until an answer goes out (backpressure, through gRPC's
flow control, to the client)."""


@aborts_with_status
class GatewayServicer:
    def __init__(
        self,
        fleet: FleetState,
        pool: BackendPool,
        policies: PolicyBook,
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.monotonic,
        coalesce_in_flight: int = 1,
        chooser: Chooser = choose,
    ) -> None:
        self.fleet = fleet
        self.pool = pool
        self.policies = policies
        self.metrics = metrics
        self.clock = clock
        self.counters: dict[str, ModelCounters] = {}
        self.chooser = chooser
        self._suffixes: dict[tuple[str, str, int], bytes] = {}
        self.transport = GrpcTransport(pool, fleet, metrics, clock, coalesce_in_flight)
        self.coalescer = self.transport.coalescer
        self.dispatcher = Dispatcher(
            self.transport, LoopTimers(clock), GatewayObserver(fleet, metrics)
        )
        self.transport.dispatcher = self.dispatcher
        self.tracing: GatewayTracing | None = None
        """Spans for each request, its decision and attempts; None: off."""
        self._untraced: tuple[Transport, Observer] = (self.transport, self.dispatcher.observer)

    def trace_as(self, settings: TracingSettings) -> None:
        """Traces requests as the fleet file's `gateway.tracing` says (a setting left
        unset: as OpenTelemetry's environment variables say); nothing when that is off.
        ConfigError when it names no exporter that can work."""
        try:
            resolved = TraceSettings(
                settings.exporter,
                settings.endpoint,
                settings.file,
                settings.service_name,
                settings.sample_ratio,
            ).resolved("switchyard-gateway")
            if not resolved.on:
                return
            from gateway.serving.tracing import GatewayTracing, gateway_provider

            provider = gateway_provider(resolved)
        except TracingError as exc:
            raise ConfigError(f"gateway.tracing: {exc}") from exc
        if provider is not None:
            self.trace(GatewayTracing(provider))

    def trace(self, tracing: GatewayTracing) -> None:
        """Traces every request from now on (tracing.py): the dispatcher's transport and
        observer are wrapped with tracing's, which the untraced path never runs."""
        self.stop_tracing()
        self.tracing = tracing
        dispatcher = self.dispatcher
        self._untraced = (dispatcher.transport, dispatcher.observer)
        dispatcher.transport = tracing.transport(self.transport)
        dispatcher.observe_with(tracing.observer(dispatcher.observer))

    def stop_tracing(self) -> None:
        """Traces no more requests, and sends the spans still held."""
        tracing = self.tracing
        if tracing is None:
            return
        self.tracing = None
        self.dispatcher.transport, observer = self._untraced
        self.dispatcher.observe_with(observer)
        self.transport.traced = False
        tracing.shutdown()

    # ---- inference ---------------------------------------------------------------

    async def model_infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        tracing = self.tracing
        if tracing is None:
            return await self.infer(request, context.time_remaining())
        carrier = tracing.carrier(context.invocation_metadata())
        return await self.infer(request, context.time_remaining(), "grpc", carrier)

    async def model_stream_infer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Each request is routed on its own; responses come back in request order.
        At most STREAM_WINDOW requests are in flight: the next request is read only
        once a slot is free (an answer went out), so one stream cannot queue unbounded
        work."""
        window = asyncio.Semaphore(STREAM_WINDOW)
        pending: asyncio.Queue[asyncio.Task[bytes] | None] = asyncio.Queue()
        # Traced: the stream's own context is the parent of requests that name none.
        tracing = self.tracing
        carrier = None if tracing is None else tracing.carrier(context.invocation_metadata(), True)

        async def read() -> None:
            iterator = aiter(requests)
            while True:
                await window.acquire()
                try:
                    request = await anext(iterator)
                except StopAsyncIteration:
                    break
                pending.put_nowait(
                    asyncio.ensure_future(
                        self.infer(request, context.time_remaining(), "grpc", carrier)
                    )
                )
            pending.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (task := await pending.get()) is not None:
                try:
                    reply = stream_response(await task)
                except SwitchyardError as exc:
                    reply = stream_error(str(exc))
                yield reply
                window.release()
            await reader
        finally:
            reader.cancel()
            while not pending.empty():
                leftover = pending.get_nowait()
                if leftover is not None:
                    leftover.cancel()

    async def infer(
        self,
        request: bytes,
        time_remaining: float | None,
        protocol: str = "grpc",
        carrier: Carrier | None = None,
    ) -> bytes:
        """One inference request, a serialized ModelInferRequest, however it arrived
        (`protocol`: `grpc`, or `rest` for the REST binding's requests made into the
        same message): routed, dispatched, answered with the backend's response bytes
        and the gateway's response parameters; a failure raises the SwitchyardError
        that names it. `carrier`: the caller's trace context, given where tracing is on
        (None: not traced)."""
        start_ns = time.perf_counter_ns()
        model_label = "(unknown)"  # unknown names stay out of metric labels
        backend = variant = "none"
        outcome = "OK"
        batch_size = 1
        backend_ns = 0
        counters: ModelCounters | None = None
        policy: Policy | None = None
        trace: RequestTrace | None = None
        cost: float | None = None
        attempts = 0
        failure: BaseException | None = None
        try:
            try:
                header = gateway_pb2.InferRequestHeader.FromString(request)
            except DecodeError as exc:
                raise InvalidInput("request is not a valid ModelInferRequest") from exc
            if carrier is not None and self.tracing is not None:
                trace = self.tracing.request(
                    carrier, _traceparent_param(header), protocol, start_ns, header.model_name
                )
            check_header(header)
            model = header.model_name
            info = self._model_info(model, header.model_version)
            model_label = model
            counters = self.counters.setdefault(model, ModelCounters())
            route_req = route_request(header, info.max_batch_size)
            batch_size = route_req.batch_size
            policy = self.policies.resolve(route_req)
            timeout_s = _earliest(time_remaining, timeout_param_s(header))
            arrived = self.clock()
            deadline = None if timeout_s is None else arrived + timeout_s
            routes = self.fleet.routes(model)
            if "switchyard_variant" in header.parameters:
                routes = self._pinned(model, routes, header.parameters["switchyard_variant"])
            if trace is not None:
                trace.choosing()
            decision = self.chooser(route_req, routes, policy, arrived)
            if trace is not None:
                trace.decided(decision, route_req, routes, policy, arrived)
            self.metrics.decisions.labels(model, decision.reason).inc()
            if decision.route is None:
                if decision.reason in ("infeasible-reject", "queue-full"):
                    raise Exhausted(decision.message, retry_hint_ms(decision, policy))
                raise Unavailable(f"no healthy backend serves model {model!r} right now")
            started = time.perf_counter_ns()
            job = Job(
                decision,
                policy,
                route_req,
                routes,
                self.chooser,
                arrived,
                deadline,
                Forward(request, header, info),
            )
            job.trace = trace
            await self.dispatcher.run(job, arrived)
            backend_ns = time.perf_counter_ns() - started
            assert job.winner is not None
            reply: bytes = job.reply
            route, attempts = job.winner.route, job.tried
            backend, variant = route.backend, route.variant
            cost = cost_usd(route, batch_size)
            self.metrics.cost.labels(model, backend).inc(cost)
            carbon = carbon_g(route, batch_size)
            if carbon is not None:
                self.metrics.carbon.labels(model, backend).inc(carbon)
            return reply + self._suffix(route, attempts) + cost_parameter(cost)
        except SwitchyardError as exc:  # a backend's own status included
            outcome = code_for(exc).name
            failure = exc
            raise
        except asyncio.CancelledError:
            outcome = grpc.StatusCode.CANCELLED.name  # the caller went away
            raise
        except Exception as exc:
            # A fault of ours: INTERNAL (never UNKNOWN), counted as the failure it is.
            outcome = grpc.StatusCode.INTERNAL.name
            failure = exc
            log.exception("request for model %s failed", shown(model_label))
            raise Internal(internal_message(exc)) from exc
        finally:
            elapsed_ns = time.perf_counter_ns() - start_ns
            if counters is not None:
                counters.record(
                    outcome == "OK", elapsed_ns, batch_size, int(time.time() * 1000), backend_ns
                )
            self.metrics.requests.labels(model_label, backend, variant, outcome, protocol).inc()
            self.metrics.latency.labels(model_label, backend, protocol).observe(elapsed_ns / 1e9)
            if policy is not None and counters is not None:
                met = outcome == "OK" and elapsed_ns / 1e6 <= policy.latency_ms
                self.metrics.sla.labels(model_label, policy.name, "met" if met else "missed").inc()
            if carrier is not None and self.tracing is not None:
                if trace is None:  # not a request at all: its span says so
                    trace = self.tracing.request(carrier, None, protocol, start_ns)
                trace.finish(outcome, backend, variant, attempts, cost, failure)

    def _suffix(self, route: Route, attempts: int) -> bytes:
        key = (route.backend, route.variant, attempts)
        suffix = self._suffixes.get(key)
        if suffix is None:
            params = {"switchyard_backend": route.backend, "switchyard_attempts": str(attempts)}
            if route.variant == REMOTE_VARIANT:
                # Switchyard workers name the variant that ran (the request may have
                # chosen one); other v2 servers do not, so the gateway says it.
                params["switchyard_variant"] = route.variant
            suffix = response_parameters(params)
            self._suffixes[key] = suffix
        return suffix

    def _pinned(self, model: str, routes: list[Route], param: pb.InferParameter) -> list[Route]:
        """The routes serving the variant a request names (`switchyard_variant`)."""
        if param.WhichOneof("parameter_choice") != "string_param":
            raise InvalidInput("request parameter 'switchyard_variant' must be a string")
        wanted = param.string_param
        pinned = [r for r in routes if r.variant == wanted]
        if not pinned:
            known = ", ".join(self.fleet.variants(model)) or "none"
            raise ModelNotFound(
                f"no backend serves model {model!r} as variant {shown(wanted)} (variants: {known})"
            )
        return pinned

    def _model_info(self, model: str, version: str) -> ModelInfo:
        info = self.fleet.model_info(model)
        if info is None:
            if model in self.fleet.known_models():
                raise Unavailable(f"model {model!r} is not ready on any backend")
            raise ModelNotFound(f"unknown model {shown(model)}")
        if version and version not in info.versions:
            raise ModelNotFound(
                f"model {model!r} has no version {shown(version)} "
                f"(versions: {', '.join(info.versions)})"
            )
        return info

    # ---- health, metadata, configuration, statistics, repository ----------------------

    async def server_live(
        self, request: pb.ServerLiveRequest, context: Any
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(
        self, request: pb.ServerReadyRequest, context: Any
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.fleet.any_ready())

    async def model_ready(
        self, request: pb.ModelReadyRequest, context: Any
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.is_model_ready(request.name, request.version))

    async def server_metadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return self.server_description()

    async def model_metadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return self.metadata_of(request.name, request.version)

    async def model_config(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        return self.config_of(request.name, request.version)

    async def model_statistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        return self.statistics_of(request.name, request.version)

    async def repository_index(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        return self.repository_of(request.ready)

    # The answers themselves, for both protocol bindings (gRPC above, REST in rest.py);
    # each raises the SwitchyardError that names what was wrong.

    def is_model_ready(self, name: str, version: str = "") -> bool:
        ready = self.fleet.model_ready(name)
        if ready and version:
            info = self.fleet.model_info(name)
            ready = info is not None and version in info.versions
        return ready

    def server_description(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="switchyard", version=__version__, extensions=EXTENSIONS
        )

    def metadata_of(self, name: str, version: str = "") -> pb.ModelMetadataResponse:
        return metadata_message(self._described(name, version))

    def config_of(self, name: str, version: str = "") -> pb.ModelConfigResponse:
        info = self._described(name, version)
        return pb.ModelConfigResponse(config=config_message(info, self.fleet.variants(name)))

    def described(self, name: str, version: str = "") -> ModelInfo:
        """The model `name` (at `version`, when given); ModelNotFound when the fleet
        knows no such model or version."""
        return self._described(name, version)

    def _described(self, name: str, version: str) -> ModelInfo:
        info = self.fleet.model_info(name)
        if info is None:
            raise ModelNotFound(f"unknown model {shown(name)}")
        if version and version not in info.versions:
            raise ModelNotFound(f"model {name!r} has no version {shown(version)}")
        return info

    def statistics_of(self, name: str = "", version: str = "") -> pb.ModelStatisticsResponse:
        """Every model's statistics (`name` empty), or one model's."""
        if name:
            described = self._described(name, version)
            names = [described.name]
        else:
            names = self.fleet.known_models()
        reply = pb.ModelStatisticsResponse()
        for name in names:
            counters = self.counters.get(name, ModelCounters())
            info = self.fleet.model_info(name)
            stats = reply.model_stats.add(
                name=name,
                version=info.versions[0] if info and info.versions else "",
                last_inference=counters.last_inference_ms,
                inference_count=counters.inference_count,
                execution_count=counters.success_count,
            )
            inf = stats.inference_stats
            inf.success.count, inf.success.ns = counters.success_count, counters.success_ns
            inf.fail.count, inf.fail.ns = counters.fail_count, counters.fail_ns
            # perf_analyzer needs queue and equal compute counts: the gateway's own time
            # is its queue, the backend round trip its compute.
            inf.queue.count, inf.queue.ns = counters.success_count, counters.queue_ns
            inf.compute_input.count = counters.success_count
            inf.compute_infer.count, inf.compute_infer.ns = (
                counters.success_count,
                counters.backend_ns,
            )
            inf.compute_output.count = counters.success_count
        return reply

    def repository_of(self, ready_only: bool = False) -> pb.RepositoryIndexResponse:
        reply = pb.RepositoryIndexResponse()
        for name in self.fleet.known_models():
            ready = self.fleet.model_ready(name)
            if ready_only and not ready:
                continue
            info = self.fleet.model_info(name)
            reply.models.add(
                name=name,
                version=info.versions[0] if info and info.versions else "",
                state="READY" if ready else "UNAVAILABLE",
                reason="" if ready else "no healthy backend holds it",
            )
        return reply


def _traceparent_param(header: gateway_pb2.InferRequestHeader) -> str | None:
    """The request's own `traceparent` parameter (a stream's requests may each carry
    one), if a string."""
    param = header.parameters.get("traceparent")
    if param is None or param.WhichOneof("parameter_choice") != "string_param":
        return None
    return param.string_param


def _earliest(*timeouts: float | None) -> float | None:
    given = [t for t in timeouts if t is not None]
    return min(given) if given else None


def generic_handler(servicer: GatewayServicer) -> grpc.GenericRpcHandler:
    """The servicer's methods under `inference.GRPCInferenceService`; inference
    methods take and return bytes, the rest typed messages."""

    def typed(fn: Callable[..., Awaitable[Any]], req: Any, resp: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
        )

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ServerLive": typed(servicer.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": typed(
                servicer.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse
            ),
            "ModelReady": typed(servicer.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": typed(
                servicer.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse
            ),
            "ModelMetadata": typed(
                servicer.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse
            ),
            "ModelConfig": typed(
                servicer.model_config, pb.ModelConfigRequest, pb.ModelConfigResponse
            ),
            "ModelStatistics": typed(
                servicer.model_statistics, pb.ModelStatisticsRequest, pb.ModelStatisticsResponse
            ),
            "RepositoryIndex": typed(
                servicer.repository_index, pb.RepositoryIndexRequest, pb.RepositoryIndexResponse
            ),
            "ModelInfer": grpc.unary_unary_rpc_method_handler(servicer.model_infer),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(servicer.model_stream_infer),
        },
    )
