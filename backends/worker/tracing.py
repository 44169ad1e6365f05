"""Tracing of the worker's requests with OpenTelemetry, on when `switchyard backend`'s
`--trace-*` flags (or OTEL_TRACES_EXPORTER) say so. Each request's spans, children of the
W3C `traceparent` its call carried (the gateway's attempt span):

- `switchyard.backend.request` (server): the request in the worker, from its arrival to
  its answer: model, variant, rows, status;
- `switchyard.backend.queue`: from joining its variant's queue to its batch's start;
- `switchyard.backend.run`: its batch's execution (the requests and rows it held).

A unary call's context is its gRPC metadata, else the request's `traceparent` parameter;
a stream's request's is its parameter (a stream has no metadata per request), else the
stream's metadata. A request whose caller's context says "not sampled" gets no spans.

Imports OpenTelemetry (only when tracing is on: nothing imports this module before);
nothing from the gateway.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Status, StatusCode

from backends.tracing import TRACEPARENT, TRACESTATE, TraceSettings, first_value
from backends.tracing.provider import parent_context, tracer_provider

SERVICE_NAME = "switchyard-backend"
"""The worker's `service.name` unless the flags or OTEL_SERVICE_NAME say otherwise."""

REQUEST_SPAN = "switchyard.backend.request"
QUEUE_SPAN = "switchyard.backend.queue"
RUN_SPAN = "switchyard.backend.run"


def worker_provider(settings: TraceSettings) -> TracerProvider | None:
    """The worker's tracer provider for `settings` (None: tracing is off)."""
    return tracer_provider(settings, SERVICE_NAME)


class RequestTrace:
    """One request's spans in the worker; the batcher calls `started` as its batch runs."""

    __slots__ = ("_context", "_enqueued_ns", "_run", "span", "tracer")

    def __init__(self, tracer: trace.Tracer, span: trace.Span) -> None:
        self.tracer = tracer
        self.span = span
        self._context = trace.set_span_in_context(span)
        self._enqueued_ns = 0
        self._run: trace.Span | None = None

    def queued(self, model: str, variant: str, rows: int) -> None:
        """The request joins `variant`'s queue now."""
        self._enqueued_ns = time.time_ns()
        self.span.set_attributes(
            {"switchyard.model": model, "switchyard.variant": variant, "switchyard.rows": rows}
        )

    def started(self, requests: int, rows: int) -> None:
        """Its batch (`requests` requests, `rows` rows) starts running now: the queue
        span ends, the run span begins."""
        now_ns = time.time_ns()
        queue = self.tracer.start_span(
            QUEUE_SPAN, self._context, start_time=self._enqueued_ns or now_ns
        )
        queue.end(now_ns)
        self._run = self.tracer.start_span(
            RUN_SPAN,
            self._context,
            attributes={"switchyard.batch.requests": requests, "switchyard.batch.rows": rows},
            start_time=now_ns,
        )

    def finish(self, error: BaseException | None = None) -> None:
        """The request is answered (or failed with `error`): its spans end."""
        run = self._run
        if run is not None:
            if error is not None:
                run.set_status(Status(StatusCode.ERROR, str(error)))
            run.end()
        if error is not None:
            self.span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        self.span.end()


class WorkerTracing:
    """The worker's tracer."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("switchyard.backend")

    def request(
        self,
        metadata: Sequence[tuple[str, str | bytes]] | None,
        parameter: object,
        stream: bool,
        start_ns: int,
    ) -> RequestTrace | None:
        """A request's trace, begun at `start_ns` (perf_counter_ns) under its caller's
        context (`metadata`, the request's `traceparent` `parameter`; which first: see
        the module); None when the caller's context says it is not sampled."""
        traceparent = first_value(metadata, TRACEPARENT)
        tracestate = first_value(metadata, TRACESTATE)
        if isinstance(parameter, str) and (stream or traceparent is None):
            traceparent, tracestate = parameter, None
        wall_ns = time.time_ns() - (time.perf_counter_ns() - start_ns)
        span = self.tracer.start_span(
            REQUEST_SPAN,
            parent_context(traceparent, tracestate),
            SpanKind.SERVER,
            start_time=wall_ns,
        )
        if not span.is_recording():
            return None
        return RequestTrace(self.tracer, span)

    def shutdown(self) -> None:
        """Sends the spans still held, and stops."""
        self.provider.shutdown()
