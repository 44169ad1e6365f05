"""Tracing of the gateway's requests with OpenTelemetry, on when the fleet file's
`gateway.tracing` (or OTEL_TRACES_EXPORTER) says so. Each request's spans:

- `switchyard.request` (server): the request from its arrival to its answer, a child of
  the caller's W3C `traceparent` (gRPC metadata, the HTTP header, or the request's
  `traceparent` parameter); the model, the protocol, the backend and variant that
  answered, the attempts, the cost and the status;
- `switchyard.route` (internal): the routing decision: the chosen route, the reason, its
  predicted latency and cost, the policy, and every route rejected with why (the
  router's `explain` verdicts);
- `switchyard.attempt` (client), one per attempt: the first, each retry and each hedge,
  with its backend, variant, outcome and latency. Its `traceparent` goes to the backend
  (gRPC metadata on a unary call; a `traceparent` request parameter on a stream, which
  has no metadata of its own per request), where the worker's spans hang under it.

The servicer installs it (`GatewayServicer.trace`) by wrapping the dispatcher's
transport and observer: while tracing is off none of this runs and nothing on a request's
path reads trace context. A request the sampler leaves out gets no spans here, but its
context (sampled flag off) still goes to the backends, so they record none either.

Imports OpenTelemetry (only when tracing is on: nothing imports this module before) and
the routing core's `explain`; no generated protobuf.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from backends.tracing import TRACEPARENT, TRACESTATE, TraceSettings, first_value
from backends.tracing.provider import parent_context, trace_metadata, tracer_provider
from gateway.routing.fleet import Route
from gateway.routing.router import Decision, RouteRequest, explain
from gateway.routing.sla import Policy
from gateway.serving.converters import request_parameters
from gateway.serving.dispatch import Attempt, AttemptTimedOut, Job, Observer
from gateway.serving.transport import TRACED_ATTEMPT, GrpcTransport


@dataclass(frozen=True, slots=True)
class Carrier:
    """What a call brought of W3C trace context (its metadata, or HTTP headers)."""

    traceparent: str | None
    tracestate: str | None
    stream: bool = False
    """The call is a stream: a request's own `traceparent` parameter comes first (on a
    unary call its metadata does, as the gateway's own calls to backends send it)."""


SERVICE_NAME = "switchyard-gateway"
"""The gateway's `service.name` unless the settings or OTEL_SERVICE_NAME say otherwise."""

REQUEST_SPAN = "switchyard.request"
ROUTE_SPAN = "switchyard.route"
ATTEMPT_SPAN = "switchyard.attempt"


def gateway_provider(settings: TraceSettings) -> TracerProvider | None:
    """The gateway's tracer provider for `settings` (None: tracing is off)."""
    return tracer_provider(settings, SERVICE_NAME)


def decision_attributes(
    decision: Decision,
    request: RouteRequest,
    routes: Sequence[Route],
    policy: Policy,
    now_s: float,
) -> dict[str, AttributeValue]:
    """What a routing decision span says: the chosen route, the reason, its predicted
    latency and cost, the policy's target, and each route not chosen with why (as the
    router's `explain` gives it at the same instant)."""
    attributes: dict[str, AttributeValue] = {
        "switchyard.model": request.model,
        "switchyard.batch_size": request.batch_size,
        "switchyard.route.reason": decision.reason,
        "switchyard.policy": policy.name,
        "switchyard.policy.latency_ms": policy.latency_ms,
        "switchyard.policy.percentile": policy.percentile,
        "switchyard.policy.objective": policy.objective,
        "switchyard.route.candidates": len(routes),
    }
    chosen = decision.route
    if chosen is not None:
        attributes["switchyard.backend"] = chosen.backend
        attributes["switchyard.variant"] = chosen.variant
        attributes["switchyard.route.predicted_ms"] = decision.predicted_ms
        attributes["switchyard.route.cost_usd"] = decision.cost_usd
    elif decision.message:
        attributes["switchyard.route.message"] = decision.message
    rejected = []
    _, verdicts = explain(request, routes, policy, now_s)
    for verdict in verdicts:
        route = verdict.route
        if route is chosen:
            continue
        why = verdict.why
        if verdict.chosen:  # the SLA rule's choice, where another chooser decided
            why = f"feasible, not chosen by {decision.reason}"
        rejected.append(f"{route.backend}/{route.variant}: {why}")
    attributes["switchyard.route.rejected"] = rejected
    return attributes


class RequestTrace:
    """One request's spans, as the servicer and the dispatcher's wrappers make them."""

    __slots__ = ("_choosing_ns", "context", "next_kind", "recording", "span", "tracer")

    def __init__(self, tracer: trace.Tracer, span: trace.Span) -> None:
        self.tracer = tracer
        self.span = span
        self.recording = span.is_recording()
        """Sampled: its decision and attempts get spans of their own."""
        self.context = trace.set_span_in_context(span)
        self.next_kind = "first"
        """What the next attempt sent is: first, retry or hedge."""
        self._choosing_ns = 0

    def choosing(self) -> None:
        """The router is about to decide (the decision span's start)."""
        self._choosing_ns = time.time_ns()

    def decided(
        self,
        decision: Decision,
        request: RouteRequest,
        routes: Sequence[Route],
        policy: Policy,
        now_s: float,
    ) -> None:
        """The decision span, from `choosing` to now."""
        if not self.recording:
            return
        span = self.tracer.start_span(
            ROUTE_SPAN,
            self.context,
            SpanKind.INTERNAL,
            start_time=self._choosing_ns or None,
        )
        span.set_attributes(decision_attributes(decision, request, routes, policy, now_s))
        span.end()

    def attempt(self, attempt: Attempt) -> AttemptTrace:
        """The span of `attempt`, sent now (the request's own where it is not sampled:
        its context still tells the backend not to record)."""
        kind, self.next_kind = self.next_kind, "retry"
        if not self.recording:
            return AttemptTrace(self.span, False)
        route = attempt.route
        span = self.tracer.start_span(
            ATTEMPT_SPAN,
            self.context,
            SpanKind.CLIENT,
            attributes={
                "switchyard.backend": route.backend,
                "switchyard.variant": route.variant,
                "server.address": route.state.address,
                "switchyard.attempt": attempt.job.tried,
                "switchyard.attempt.kind": kind,
            },
        )
        return AttemptTrace(span, True)

    def finish(
        self,
        outcome: str,
        backend: str,
        variant: str,
        attempts: int,
        cost_usd: float | None,
        error: BaseException | None,
    ) -> None:
        """The request's span ends: `outcome` is its status code's name."""
        span = self.span
        if self.recording:
            span.set_attribute("switchyard.outcome", outcome)
            code = getattr(grpc.StatusCode, outcome, None)
            if code is not None:
                span.set_attribute("rpc.grpc.status_code", code.value[0])
            if backend != "none":
                span.set_attribute("switchyard.backend", backend)
                span.set_attribute("switchyard.variant", variant)
                span.set_attribute("switchyard.attempts", attempts)
            if cost_usd is not None:
                span.set_attribute("switchyard.cost_usd", cost_usd)
            if outcome != "OK":
                span.set_status(Status(StatusCode.ERROR, f"{outcome}: {error or ''}".rstrip()))
        span.end()


class AttemptTrace:
    """One attempt's span, and its context as the backend gets it."""

    __slots__ = ("own", "span")

    def __init__(self, span: trace.Span, own: bool) -> None:
        self.span = span
        self.own = own
        """The span is the attempt's (else the unsampled request's: not to be ended)."""

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The context as a unary call's gRPC metadata."""
        return trace_metadata(self.span)

    def parameter(self) -> bytes:
        """The context as a `traceparent` request parameter, to append to a request's
        bytes (a stream's requests have no metadata of their own)."""
        return request_parameters({TRACEPARENT: trace_metadata(self.span)[0][1]})

    def outcome(self, latency_ms: float | None, error: BaseException | None) -> None:
        """The attempt answered (`latency_ms`) or failed (`error`): its span ends, but
        for one past its timeout, which runs on (it may yet answer)."""
        span = self.span
        if not self.own or not span.is_recording():
            return
        if isinstance(error, AttemptTimedOut):
            span.add_event("timed out", {"switchyard.error": str(error)})
            return
        if error is None:
            span.set_attribute("switchyard.attempt.outcome", "answered")
            if latency_ms is not None:
                span.set_attribute("switchyard.latency_ms", latency_ms)
        else:
            span.set_attribute("switchyard.attempt.outcome", "failed")
            span.set_status(Status(StatusCode.ERROR, _describe(error)))
        span.end()

    def abandoned(self) -> None:
        """The dispatcher gave the attempt up (a hedge that lost, a caller gone, a
        deadline passed): its span ends, saying so."""
        span = self.span
        if self.own and span.is_recording():
            span.set_attribute("switchyard.attempt.outcome", "abandoned")
            span.end()

    def ended(self) -> None:
        """The attempt's call is over, however it went: its span ends if still open."""
        span = self.span
        if self.own and span.is_recording():
            span.end()


class GatewayTracing:
    """The gateway's tracer, and what the servicer installs with it."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("switchyard.gateway")

    def request(
        self,
        carrier: Carrier,
        parameter: str | None,
        protocol: str,
        start_ns: int,
        model: str = "",
    ) -> RequestTrace:
        """A request's trace, its span begun at `start_ns` (perf_counter_ns) under the
        caller's context: `carrier` (metadata, headers), else its `traceparent` request
        parameter; none: a new trace."""
        traceparent, tracestate = carrier.traceparent, carrier.tracestate
        if parameter is not None and (traceparent is None or carrier.stream):
            traceparent, tracestate = parameter, None
        wall_ns = time.time_ns() - (time.perf_counter_ns() - start_ns)
        span = self.tracer.start_span(
            REQUEST_SPAN,
            parent_context(traceparent, tracestate),
            SpanKind.SERVER,
            attributes={"switchyard.protocol": protocol, "switchyard.model": model},
            start_time=wall_ns,
        )
        return RequestTrace(self.tracer, span)

    @staticmethod
    def carrier(
        metadata: Sequence[tuple[str, str | bytes]] | None, stream: bool = False
    ) -> Carrier:
        """The W3C trace context in a call's invocation metadata."""
        return Carrier(
            first_value(metadata, TRACEPARENT), first_value(metadata, TRACESTATE), stream
        )

    @staticmethod
    def carrier_of_headers(headers: Mapping[bytes, bytes]) -> Carrier:
        """The W3C trace context in an HTTP request's headers."""
        traceparent = headers.get(TRACEPARENT.encode())
        tracestate = headers.get(TRACESTATE.encode())
        return Carrier(
            None if traceparent is None else traceparent.decode("latin-1"),
            None if tracestate is None else tracestate.decode("latin-1"),
        )

    def transport(self, inner: GrpcTransport) -> TracingTransport:
        return TracingTransport(inner)

    def observer(self, inner: Observer) -> TracingObserver:
        return TracingObserver(inner)

    def shutdown(self) -> None:
        """Sends the spans still held, and stops."""
        self.provider.shutdown()


class TracingTransport:
    """The gRPC transport, each attempt of a traced job under a span of its own whose
    context its backend call carries."""

    def __init__(self, inner: GrpcTransport) -> None:
        self.inner = inner
        inner.traced = True

    def send(self, attempt: Attempt) -> None:
        request: RequestTrace | None = attempt.job.trace
        if request is None:
            self.inner.send(attempt)
            return
        traced = attempt.trace = request.attempt(attempt)
        token = TRACED_ATTEMPT.set(attempt)  # the call's task starts with it
        try:
            self.inner.send(attempt)
        finally:
            TRACED_ATTEMPT.reset(token)
        call: asyncio.Future[None] | None = attempt.call
        if traced.own and call is not None:
            call.add_done_callback(lambda _: traced.ended())

    def cancel(self, attempt: Attempt) -> None:
        traced: AttemptTrace | None = attempt.trace
        if traced is not None:
            traced.abandoned()
        self.inner.cancel(attempt)


class TracingObserver(Observer):
    """The gateway's observer, each attempt's outcome on its span too, and which
    attempts are retries and hedges."""

    def __init__(self, inner: Observer) -> None:
        self.inner = inner

    def retried(self, job: Job, route: Route) -> None:
        self.inner.retried(job, route)
        if job.trace is not None:
            job.trace.next_kind = "retry"

    def hedged(self, job: Job, route: Route) -> None:
        self.inner.hedged(job, route)
        if job.trace is not None:
            job.trace.next_kind = "hedge"

    def outcome(
        self,
        attempt: Attempt,
        latency_ms: float | None,
        fault: bool,
        error: BaseException | None,
        now_s: float,
    ) -> None:
        self.inner.outcome(attempt, latency_ms, fault, error, now_s)
        traced: AttemptTrace | None = attempt.trace
        if traced is not None:
            traced.outcome(latency_ms, error)


def _describe(error: BaseException) -> str:
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    if code is not None and details is not None:
        return f"{getattr(code, 'name', code)}: {details}"
    return f"{type(error).__name__}: {error}"
