"""OpenTelemetry tracing for the gateway and the worker: its settings here, the tracer
provider and the W3C trace context in `backends.tracing.provider`.

Off unless configured. This module imports nothing of OpenTelemetry: a process imports
`provider` (OpenTelemetry's SDK and its OTLP exporter take a quarter of a second to
import) only once its settings say it traces, and nothing on a request's path looks at
trace context while tracing is off.

A setting left unset follows OpenTelemetry's environment variables: `OTEL_TRACES_EXPORTER`
(`otlp` or `none`), `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER_ARG` (the sample ratio), and
the OTLP exporter's own (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_CERTIFICATE`, ...); the batch span
processor's (`OTEL_BSP_SCHEDULE_DELAY`, ...) say how often spans leave.
`OTEL_SDK_DISABLED=true` turns tracing off whatever the settings say. The environment is
read when the settings are resolved, at start, never at import.

Plain values: no OpenTelemetry, no grpc, nothing from the gateway.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

TRACEPARENT = "traceparent"
"""W3C trace context: the gRPC metadata key, HTTP header and request parameter that carry
the caller's span."""
TRACESTATE = "tracestate"
"""W3C trace context: vendors' state, carried beside `traceparent` in metadata and
headers."""

Exporter = Literal["otlp", "file", "none"]


class TracingError(ValueError):
    """Settings that describe no usable exporter."""


@dataclass(frozen=True, slots=True)
class TraceSettings:
    """Where spans go, as the fleet file (gateway) or the flags (worker) say; None: what
    OpenTelemetry's environment variables say (`resolved`)."""

    exporter: Exporter | None = None
    """`otlp` (OTLP over gRPC), `file` (JSON lines), `none`; None: OTEL_TRACES_EXPORTER's
    (`otlp` or `none`), else none."""
    endpoint: str | None = None
    """The OTLP collector (`http://HOST:4317`); None: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    OTEL_EXPORTER_OTLP_ENDPOINT, else http://localhost:4317."""
    file: Path | None = None
    """Where the `file` exporter appends its spans, one JSON object a line."""
    service_name: str | None = None
    """The `service.name` resource attribute; None: OTEL_SERVICE_NAME, else the
    process's default (`switchyard-gateway`, `switchyard-backend`)."""
    sample_ratio: float | None = None
    """The share of traces begun here that are recorded (a caller's sampled flag decides
    for the traces it began); None: OTEL_TRACES_SAMPLER_ARG, else 1."""

    def resolved(
        self, default_service_name: str, environ: Mapping[str, str] | None = None
    ) -> TraceSettings:
        """Every setting decided, the unset ones from `environ` (default os.environ);
        TracingError when they describe no exporter that can work."""
        env = os.environ if environ is None else environ
        exporter = self.exporter
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            exporter = "none"
        elif exporter is None:
            named = env.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "none"
            if named not in ("otlp", "none"):
                raise TracingError(
                    f"OTEL_TRACES_EXPORTER={named!r}: switchyard exports traces with "
                    "`otlp` (or `none`)"
                )
            exporter = "otlp" if named == "otlp" else "none"
        if exporter == "file" and self.file is None:
            raise TracingError("the file trace exporter needs a file to write")
        ratio = self.sample_ratio
        if ratio is None:
            given = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
            try:
                ratio = float(given) if given else 1.0
            except ValueError:
                raise TracingError(f"OTEL_TRACES_SAMPLER_ARG={given!r} is not a ratio") from None
        if not 0.0 <= ratio <= 1.0:
            raise TracingError(f"the trace sample ratio {ratio:g} is not between 0 and 1")
        name = self.service_name or env.get("OTEL_SERVICE_NAME") or default_service_name
        return replace(self, exporter=exporter, service_name=name, sample_ratio=ratio)

    @property
    def on(self) -> bool:
        """Whether these (resolved) settings export spans."""
        return self.exporter not in (None, "none")


def first_value(metadata: Sequence[tuple[str, str | bytes]] | None, key: str) -> str | None:
    """The first value of `key` in gRPC invocation metadata, as text."""
    for name, value in metadata or ():
        if name == key:
            return value.decode("latin-1") if isinstance(value, bytes) else value
    return None
