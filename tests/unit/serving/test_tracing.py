"""Tracing's pure parts: what a routing decision's span says (a fake route set), the
settings as the fleet file and OpenTelemetry's environment variables give them, the W3C
context read and written, and the file exporter's lines."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from backends.tracing import TraceSettings, TracingError, first_value
from backends.tracing.provider import JsonLinesExporter, parent_context, traceparent_of
from gateway.config import ConfigError, TracingSettings, parse_fleet
from gateway.routing.router import RouteRequest, choose
from gateway.routing.sla import Policy
from gateway.serving.tracing import GatewayTracing, decision_attributes
from tests.unit.routing.builders import route

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
BACKENDS = "backends: [{name: a, address: '127.0.0.1:1', price_usd_per_hour: 0.1}]\n"


def test_a_decision_span_names_the_choice_and_each_rejected_route_with_why() -> None:
    cheap_slow = route("cheap-slow", 0.01, p50=30.0, p99=60.0)  # misses the SLA
    mid = route("mid", 0.05)
    dear = route("dear", 0.50)
    down = route("down", 0.001, available=False)
    routes = [cheap_slow, mid, dear, down]
    policy = Policy(latency_ms=20.0)
    request = RouteRequest("m")
    decision = choose(request, routes, policy, 0.0)

    attributes = decision_attributes(decision, request, routes, policy, 0.0)

    assert attributes["switchyard.backend"] == "mid"
    assert attributes["switchyard.route.reason"] == "cheapest-feasible"
    assert attributes["switchyard.route.predicted_ms"] == pytest.approx(decision.predicted_ms)
    assert attributes["switchyard.route.cost_usd"] == pytest.approx(decision.cost_usd)
    assert attributes["switchyard.policy.latency_ms"] == 20.0
    assert attributes["switchyard.route.candidates"] == 4
    lines = cast("Sequence[str]", attributes["switchyard.route.rejected"])
    rejected = {line.split(":", 1)[0]: line for line in lines}
    assert set(rejected) == {"cheap-slow/v", "dear/v", "down/v"}
    assert "> SLA 20 ms" in rejected["cheap-slow/v"]
    assert "dearer than the chosen route" in rejected["dear/v"]
    assert "unhealthy" in rejected["down/v"]


def test_a_rejection_says_why_and_names_no_route() -> None:
    routes = [route("slow", 0.01, p50=30.0, p99=60.0)]
    policy = Policy(latency_ms=20.0, on_infeasible="reject")
    request = RouteRequest("m")
    decision = choose(request, routes, policy, 0.0)

    attributes = decision_attributes(decision, request, routes, policy, 0.0)

    assert decision.route is None
    assert attributes["switchyard.route.reason"] == "infeasible-reject"
    assert "switchyard.backend" not in attributes
    assert "no route for model 'm' meets p99 <= 20 ms" in str(
        attributes["switchyard.route.message"]
    )
    assert attributes["switchyard.route.rejected"] == [
        f"slow/v: predicted p99 {decision.predicted_ms:.2f} ms > SLA 20 ms"
    ]


def test_a_baselines_choice_is_not_reported_as_rejected_for_being_chosen() -> None:
    cheap, dear = route("cheap", 0.01), route("dear", 0.5)
    policy = Policy(latency_ms=20.0)
    request = RouteRequest("m")
    decision = choose(request, [dear], policy, 0.0)  # a chooser that took the dear one

    attributes = decision_attributes(decision, request, [cheap, dear], policy, 0.0)

    assert attributes["switchyard.route.rejected"] == [
        "cheap/v: feasible, not chosen by cheapest-feasible"
    ]


@pytest.mark.parametrize(
    ("given", "environ", "exporter", "ratio", "name"),
    [
        (TraceSettings(), {}, "none", 1.0, "svc"),
        (TraceSettings(), {"OTEL_TRACES_EXPORTER": "otlp"}, "otlp", 1.0, "svc"),
        (TraceSettings(), {"OTEL_TRACES_EXPORTER": "none"}, "none", 1.0, "svc"),
        (
            TraceSettings("otlp"),
            {"OTEL_SERVICE_NAME": "edge", "OTEL_TRACES_SAMPLER_ARG": "0.25"},
            "otlp",
            0.25,
            "edge",
        ),
        (
            TraceSettings("otlp", service_name="mine", sample_ratio=0.5),
            {"OTEL_SERVICE_NAME": "edge", "OTEL_TRACES_SAMPLER_ARG": "0.25"},
            "otlp",
            0.5,
            "mine",
        ),
        (TraceSettings("otlp"), {"OTEL_SDK_DISABLED": "true"}, "none", 1.0, "svc"),
        (TraceSettings("file", file=Path("t.jsonl")), {}, "file", 1.0, "svc"),
    ],
)
def test_settings_left_unset_follow_opentelemetrys_environment(
    given: TraceSettings, environ: dict[str, str], exporter: str, ratio: float, name: str
) -> None:
    resolved = given.resolved("svc", environ)
    assert (resolved.exporter, resolved.sample_ratio, resolved.service_name) == (
        exporter,
        ratio,
        name,
    )
    assert resolved.on == (exporter != "none")


@pytest.mark.parametrize(
    ("given", "environ", "says"),
    [
        (TraceSettings(), {"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER='jaeger'"),
        (TraceSettings("file"), {}, "needs a file"),
        (TraceSettings("otlp"), {"OTEL_TRACES_SAMPLER_ARG": "half"}, "not a ratio"),
        (TraceSettings("otlp", sample_ratio=2.0), {}, "not between 0 and 1"),
    ],
)
def test_settings_no_exporter_can_use_are_an_error_that_says_why(
    given: TraceSettings, environ: dict[str, str], says: str
) -> None:
    with pytest.raises(TracingError, match=says):
        given.resolved("svc", environ)


def test_the_fleet_files_tracing_section_is_checked_and_its_file_resolved(
    tmp_path: Path,
) -> None:
    config = parse_fleet(
        "gateway:\n  tracing: {exporter: file, file: spans.jsonl, sample_ratio: 0.1}\n" + BACKENDS,
        tmp_path,
    )
    assert config.gateway.tracing == TracingSettings(
        exporter="file", file=tmp_path / "spans.jsonl", sample_ratio=0.1
    )
    assert parse_fleet(BACKENDS, tmp_path).gateway.tracing.exporter is None  # off by default
    for bad, says in [
        ("{exporter: file}", "needs `file`"),
        ("{exporter: zipkin}", "exporter"),
        ("{sample_ratio: 1.5}", "sample_ratio"),
        ("{exporter: otlp, endpont: x}", "endpont"),
    ]:
        with pytest.raises(ConfigError, match=says):
            parse_fleet(f"gateway:\n  tracing: {bad}\n" + BACKENDS, tmp_path)


def test_w3c_context_is_read_and_written() -> None:
    context = parent_context(PARENT, "vendor=1")
    assert context is not None
    provider = TracerProvider()
    span = provider.get_tracer("t").start_span("child", context)
    assert traceparent_of(span).startswith(f"00-{TRACE_ID}-")
    assert traceparent_of(span).endswith("-01")
    assert span.get_span_context().trace_state.to_header() == "vendor=1"
    for malformed in (None, "", "00-zz-00f067aa0ba902b7-01", f"00-{'0' * 32}-00f067aa0ba902b7-01"):
        assert parent_context(malformed) is None
    assert first_value([("a", "1"), ("traceparent", b"x")], "traceparent") == "x"
    assert first_value(None, "traceparent") is None


def test_a_request_parameter_parents_a_streams_request_before_the_streams_metadata() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = GatewayTracing(provider)
    other = f"00-{'1' * 32}-{'2' * 16}-01"

    stream = tracing.carrier([("traceparent", PARENT)], stream=True)
    unary = tracing.carrier([("traceparent", PARENT)])
    for carrier, expected in [(stream, "1" * 32), (unary, TRACE_ID)]:
        trace = tracing.request(carrier, other, "grpc", 0, "m")
        trace.finish("OK", "none", "none", 0, None, None)
        assert f"{exporter.get_finished_spans()[-1].context.trace_id:032x}" == expected
    headers = tracing.carrier_of_headers({b"traceparent": PARENT.encode()})
    assert headers.traceparent == PARENT and headers.tracestate is None


def test_the_file_exporter_appends_one_json_line_a_span(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    exporter = JsonLinesExporter(path)
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    for name in ("one", "two"):
        tracer.start_span(name, parent_context(PARENT)).end()
    provider.shutdown()

    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["name"] for line in lines] == ["one", "two"]
    assert {line["context"]["trace_id"] for line in lines} == {f"0x{TRACE_ID}"}
    assert {line["parent_id"] for line in lines} == {"0x00f067aa0ba902b7"}
    with pytest.raises(TracingError, match="cannot open the trace file"):
        JsonLinesExporter(tmp_path / "missing" / "spans.jsonl")
