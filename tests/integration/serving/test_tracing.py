"""Tracing through a real gateway and real workers in this process, their spans in
memory: one request's spans (the gateway's request, decision and attempt; the worker's
request, queue wait and run) form one trace under the caller's `traceparent`, over
unary calls (metadata) and over streams (a request parameter) to the workers alike; a
hedge gets a span of its own; the REST binding takes the `traceparent` header."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import cast

import grpc
import orjson
import pytest
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from backends.worker.served import WorkerSettings
from backends.worker.server import start_worker
from backends.worker.tracing import WorkerTracing
from gateway.server import Gateway, start_gateway
from gateway.serving.tracing import GatewayTracing
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import Worker, fleet_config, raw_request, samples, server_ready
from tests.waiting import wait_until

DEAR_USD_PER_HOUR = 0.8
"""Twenty times cheap's price: the first request goes to cheap whatever the two
workers' sub-millisecond warm-up samples say."""

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CALLER_SPAN_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{CALLER_SPAN_ID:016x}-01"


def provider(exporter: InMemorySpanExporter, service: str) -> TracerProvider:
    traced = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    traced.add_span_processor(SimpleSpanProcessor(exporter))
    return traced


async def traced_worker(
    repository: Path, exporter: InMemorySpanExporter, **settings: object
) -> Worker:
    server, port, models, executor, _ = await start_worker(
        WorkerSettings(
            repository=repository,
            threads=1,
            hardware_class="test-1c",
            models=("digits",),
            **settings,  # type: ignore[arg-type]
        ),
        "127.0.0.1:0",
        tracing=WorkerTracing(provider(exporter, "switchyard-backend")),
    )
    return Worker(f"127.0.0.1:{port}", server, models, executor)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def workers(
    repository: Path, exporter: InMemorySpanExporter
) -> AsyncIterator[tuple[Worker, Worker]]:
    cheap = await traced_worker(repository, exporter)
    dear = await traced_worker(repository, exporter)
    yield cheap, dear
    await cheap.stop()
    await dear.stop()


async def traced_gateway(config: object, exporter: InMemorySpanExporter) -> Gateway:
    gw = await start_gateway(config)  # type: ignore[arg-type]
    gw.servicer.trace(GatewayTracing(provider(exporter, "switchyard-gateway")))
    await wait_until(lambda: server_ready(gw), what="the gateway to be ready")
    return gw


def of_trace(exporter: InMemorySpanExporter, trace_id: int = TRACE_ID) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]


def named(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def parent_of(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def the_request(repository: Path) -> object:
    inputs, _ = samples(repository, "digits")
    return raw_request("digits", {"input": inputs["input"][:1]}, {"input": "FP32"})


@pytest.mark.parametrize("backend_streams", [0, 2], ids=["unary", "streams"])
async def test_one_requests_spans_from_gateway_and_worker_form_one_trace(
    workers: tuple[Worker, Worker],
    exporter: InMemorySpanExporter,
    repository: Path,
    backend_streams: int,
) -> None:
    cheap, dear = workers
    gw = await traced_gateway(
        fleet_config(
            {"cheap": (cheap.address, 0.04), "dear": (dear.address, DEAR_USD_PER_HOUR)},
            backend_streams=backend_streams,
        ),
        exporter,
    )
    try:
        async with grpc.aio.insecure_channel(gw.address) as channel:
            reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                the_request(repository), metadata=(("traceparent", TRACEPARENT),)
            )
        assert reply.parameters["switchyard_backend"].string_param == "cheap"

        await wait_until(
            lambda: len(of_trace(exporter)) >= 6, what="the request's six spans to end"
        )
        spans = of_trace(exporter)
        [request] = named(spans, "switchyard.request")
        [route] = named(spans, "switchyard.route")
        [attempt] = named(spans, "switchyard.attempt")
        [served] = named(spans, "switchyard.backend.request")
        [queue] = named(spans, "switchyard.backend.queue")
        [run] = named(spans, "switchyard.backend.run")

        assert parent_of(request) == CALLER_SPAN_ID  # the caller's span is the parent
        assert request.resource.attributes[SERVICE_NAME] == "switchyard-gateway"
        assert request.attributes is not None
        assert request.attributes["switchyard.backend"] == "cheap"
        assert request.attributes["switchyard.outcome"] == "OK"
        assert request.attributes["rpc.grpc.status_code"] == 0

        assert parent_of(route) == request.context.span_id
        assert route.attributes is not None
        assert route.attributes["switchyard.backend"] == "cheap"
        assert route.attributes["switchyard.route.reason"] == "cheapest-feasible"
        assert route.attributes["switchyard.route.predicted_ms"] > 0  # type: ignore[operator]
        [rejected] = cast("Sequence[str]", route.attributes["switchyard.route.rejected"])
        assert rejected.startswith("dear/") and "dearer than the chosen route" in rejected

        assert parent_of(attempt) == request.context.span_id
        assert attempt.attributes is not None
        assert attempt.attributes["switchyard.attempt.kind"] == "first"
        assert attempt.attributes["switchyard.backend"] == "cheap"
        assert attempt.attributes["switchyard.attempt.outcome"] == "answered"

        # The worker's spans hang under the gateway's attempt, across the gRPC hop.
        assert parent_of(served) == attempt.context.span_id
        assert served.resource.attributes[SERVICE_NAME] == "switchyard-backend"
        assert parent_of(queue) == parent_of(run) == served.context.span_id
        assert queue.end_time is not None and run.start_time is not None
        assert queue.end_time <= run.start_time
        assert run.attributes is not None and run.attributes["switchyard.batch.rows"] == 1
    finally:
        await gw.stop()


async def test_a_hedge_gets_a_span_of_its_own(
    repository: Path, exporter: InMemorySpanExporter
) -> None:
    slow = await traced_worker(repository, exporter, emulate_latency_ms=400)
    fast = await traced_worker(repository, exporter)
    config = fleet_config(
        {"cheap-slow": (slow.address, 0.0001), "dear-fast": (fast.address, 0.4)},
        latency_probe_interval_s=0,
    )
    config = config.model_copy(
        update={
            "policies": config.policies.model_validate(
                {"default": {"latency_ms": 2000, "hedge": True}}
            )
        }
    )
    gw = await traced_gateway(config, exporter)
    try:
        # Nothing is known of the slow route yet (a 1 ms guess): the request goes there,
        # runs past its predicted p95, and is hedged to the fast route, which wins.
        async with grpc.aio.insecure_channel(gw.address) as channel:
            reply = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                the_request(repository), metadata=(("traceparent", TRACEPARENT),)
            )
        assert reply.parameters["switchyard_backend"].string_param == "dear-fast"

        def attempts() -> list[ReadableSpan]:
            return named(of_trace(exporter), "switchyard.attempt")

        await wait_until(lambda: len(attempts()) == 2, what="both attempts' spans to end")
        [request] = named(of_trace(exporter), "switchyard.request")
        kinds = {
            s.attributes["switchyard.attempt.kind"]: s.attributes
            for s in attempts()
            if s.attributes is not None
        }
        assert set(kinds) == {"first", "hedge"}
        assert kinds["first"]["switchyard.backend"] == "cheap-slow"
        assert kinds["first"]["switchyard.attempt.outcome"] == "abandoned"  # it lost
        assert kinds["hedge"]["switchyard.backend"] == "dear-fast"
        assert kinds["hedge"]["switchyard.attempt.outcome"] == "answered"
        assert {parent_of(s) for s in attempts()} == {request.context.span_id}
        hedge = next(s for s in attempts() if s.attributes == kinds["hedge"])
        await wait_until(
            lambda: any(
                parent_of(s) == hedge.context.span_id
                for s in named(of_trace(exporter), "switchyard.backend.request")
            ),
            what="the fast worker's span under the hedge",
        )
    finally:
        await gw.stop()
        await slow.stop()
        await fast.stop()


async def test_rest_takes_the_traceparent_header(
    workers: tuple[Worker, Worker], exporter: InMemorySpanExporter, repository: Path
) -> None:
    cheap, dear = workers
    gw = await traced_gateway(
        fleet_config({"cheap": (cheap.address, 0.04), "dear": (dear.address, DEAR_USD_PER_HOUR)}),
        exporter,
    )
    try:
        assert gw.rest is not None
        inputs, _ = samples(repository, "digits")
        row = inputs["input"][:1]
        body = {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": list(row.shape),
                    "data": row.ravel().tolist(),
                }
            ]
        }
        call = urllib.request.Request(
            f"http://127.0.0.1:{gw.rest.port}/v2/models/digits/infer",
            orjson.dumps(body),
            {"traceparent": TRACEPARENT, "content-type": "application/json"},
        )
        with await asyncio.to_thread(urllib.request.urlopen, call, timeout=30) as answer:
            assert answer.status == 200
        await wait_until(
            lambda: bool(named(of_trace(exporter), "switchyard.backend.request")),
            what="the worker's span of the REST request",
        )
        [request] = named(of_trace(exporter), "switchyard.request")
        assert parent_of(request) == CALLER_SPAN_ID
        assert request.attributes is not None
        assert request.attributes["switchyard.protocol"] == "rest"
    finally:
        await gw.stop()


async def test_untraced_again_the_gateway_sends_no_trace_context(
    workers: tuple[Worker, Worker], exporter: InMemorySpanExporter, repository: Path
) -> None:
    cheap, dear = workers
    gw = await traced_gateway(
        # No latency probes: the workers' only request is the test's.
        fleet_config(
            {"cheap": (cheap.address, 0.04), "dear": (dear.address, DEAR_USD_PER_HOUR)},
            latency_probe_interval_s=0,
        ),
        InMemorySpanExporter(),  # its own: stopping the gateway's tracing stops it
    )
    try:
        gw.servicer.stop_tracing()
        async with grpc.aio.insecure_channel(gw.address) as channel:
            await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                the_request(repository), metadata=(("traceparent", TRACEPARENT),)
            )
        # The workers still trace: their span of this request begins a trace of its own,
        # the gateway having sent no context.
        await wait_until(
            lambda: bool(named(exporter.get_finished_spans(), "switchyard.backend.request")),
            what="the worker's span",
        )
        [served] = named(exporter.get_finished_spans(), "switchyard.backend.request")
        assert served.parent is None
        assert of_trace(exporter) == []
    finally:
        await gw.stop()
