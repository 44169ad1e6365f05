"""The tracer provider that tracing settings describe (an OTLP exporter over gRPC, or a
file of JSON lines), and the W3C trace context (`traceparent`, `tracestate`) read from
what a caller sent and written for the next hop.

Imported only by a process that traces (see `backends.tracing`). Imports OpenTelemetry;
nothing from the gateway, no grpc of its own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from backends.tracing import TRACEPARENT, TRACESTATE, TraceSettings, TracingError

log = logging.getLogger("switchyard.tracing")

_PROPAGATOR = TraceContextTextMapPropagator()


def tracer_provider(settings: TraceSettings, default_service_name: str) -> TracerProvider | None:
    """The provider `settings` describe (unset ones from the environment), its spans
    batched to their exporter; None when tracing is off. TracingError when the settings
    describe no usable exporter."""
    settings = settings.resolved(default_service_name)
    if not settings.on:
        return None
    exporter = _exporter(settings)
    assert settings.service_name is not None and settings.sample_ratio is not None
    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
        resource=Resource.create({SERVICE_NAME: settings.service_name}),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _exporter(settings: TraceSettings) -> SpanExporter:
    if settings.exporter == "file":
        assert settings.file is not None
        return JsonLinesExporter(settings.file)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=settings.endpoint)


class JsonLinesExporter(SpanExporter):
    """Appends each span to a file as one line of JSON (the SDK's own `to_json` form:
    `name`, `context.trace_id`, `context.span_id`, `parent_id`, `kind`, `start_time`,
    `end_time`, `status`, `attributes`, `events`, `resource`). Each batch is one append,
    so processes may share the file without splitting each other's lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise TracingError(f"cannot open the trace file {path}: {exc}") from exc

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._fd is None:
            return SpanExportResult.FAILURE
        data = "".join(span.to_json(indent=None) + "\n" for span in spans).encode()
        try:
            while data:
                written = os.write(self._fd, data)
                data = data[written:]
        except OSError as exc:
            log.warning("cannot write spans to %s: %s", self.path, exc)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def parent_context(traceparent: str | None, tracestate: str | None = None) -> Context | None:
    """The caller's span as a parent, from its W3C `traceparent` (and `tracestate`); None
    when it sent none, or one that does not parse (a new trace begins)."""
    if not traceparent:
        return None
    carrier = {TRACEPARENT: traceparent}
    if tracestate:
        carrier[TRACESTATE] = tracestate
    context = _PROPAGATOR.extract(carrier)
    if not trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context


def traceparent_of(span: trace.Span) -> str:
    """`span`'s W3C `traceparent`: what the next hop takes for its parent."""
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def trace_metadata(span: trace.Span) -> tuple[tuple[str, str], ...]:
    """`span`'s W3C trace context as gRPC metadata (`traceparent`, and `tracestate` when
    it holds any)."""
    state = span.get_span_context().trace_state.to_header()
    if state:
        return ((TRACEPARENT, traceparent_of(span)), (TRACESTATE, state))
    return ((TRACEPARENT, traceparent_of(span)),)
