"""Hostile input through a real gateway in front of a real worker: the hypothesis
fuzzer (gateway.bench.fuzz) sends malformed requests among good ones, and every answer
is a clean status; the routing parameters that once escaped as UNKNOWN are
INVALID_ARGUMENT naming the value; a fault of the gateway's own is INTERNAL and counted
as a failure; a stream holds at most STREAM_WINDOW requests in flight."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from gateway.bench.fuzz import BAD_CONTENTS_INPUT, fuzz
from gateway.routing.router import Decision, RouteRequest
from gateway.routing.sla import Policy
from gateway.server import Gateway, start_gateway
from gateway.serving.servicer import STREAM_WINDOW
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import Worker, fleet_config, launch_worker, raw_request
from tests.waiting import wait_until

FUZZ_REQUESTS = 400


@pytest.fixture
async def worker(repository: Path) -> AsyncIterator[Worker]:
    w = await launch_worker(repository, threads=1, models=["digits", "echo"])
    yield w
    await w.stop()


@pytest.fixture
async def gateway(worker: Worker) -> AsyncIterator[Gateway]:
    gw = await start_gateway(fleet_config({"cpu": (worker.address, 0.04)}))
    await wait_until(lambda: gw.servicer.fleet.model_ready("echo"), what="echo ready")
    yield gw
    await gw.stop()


def outcomes(gw: Gateway) -> dict[str, float]:
    """switchyard_requests_total by outcome."""
    totals: dict[str, float] = {}
    for metric in gw.servicer.metrics.registry.collect():
        if metric.name == "switchyard_requests":
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    outcome = sample.labels["outcome"]
                    totals[outcome] = totals.get(outcome, 0.0) + sample.value
    return totals


async def test_fuzzed_requests_get_clean_statuses_and_good_ones_are_served(
    gateway: Gateway, worker: Worker
) -> None:
    tally = await asyncio.to_thread(fuzz, gateway.address, FUZZ_REQUESTS, 0, 8)
    assert tally.requests >= FUZZ_REQUESTS
    assert tally.good > 0
    assert tally.clean, "\n".join(tally.examples)
    assert set(tally.codes) - {"OK"}, "no malformed request was refused: the fuzzer fuzzes nothing"
    # Both servers still answer, and the metrics saw no UNKNOWN and no INTERNAL.
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        reply = await stub.ModelInfer(
            raw_request("digits", {"input": np.zeros((1, 64), np.float32)}, {"input": "FP32"})
        )
        assert reply.parameters["switchyard_backend"].string_param == "cpu"
    seen = outcomes(gateway)
    assert seen.get("OK", 0) >= tally.good_ok
    assert "UNKNOWN" not in seen and "INTERNAL" not in seen, seen


@pytest.mark.parametrize(
    ("key", "param", "message"),
    [
        ("sla_ms", pb.InferParameter(double_param=math.nan), "'sla_ms' must be a finite number, got nan"),
        ("sla_ms", pb.InferParameter(double_param=1e30), "'sla_ms' must be at most 3600000 ms, got 1e+30"),
        ("sla_ms", pb.InferParameter(string_param="inf"), "'sla_ms' must be a finite number, got inf"),
        ("sla_ms", pb.InferParameter(bool_param=True), "'sla_ms' must be a number, got True"),
        ("timeout", pb.InferParameter(double_param=-math.inf), "'timeout' must be a finite number"),
        ("timeout", pb.InferParameter(uint64_param=2**64 - 1), "'timeout' must be at most 3600000000 us"),
        ("priority", pb.InferParameter(double_param=math.nan), "'priority' must be a non-negative integer, got nan"),
        ("priority", pb.InferParameter(string_param="9" * 30), "'priority' must be at most 18446744073709551615"),
        ("sla_class", pb.InferParameter(int64_param=1), "'sla_class' must be a string, got 1"),
    ],
)  # fmt: skip
async def test_bad_routing_values_are_invalid_argument_and_counted_so(
    gateway: Gateway, key: str, param: pb.InferParameter, message: str
) -> None:
    request = good_request_for(gateway)
    request.parameters[key].CopyFrom(param)
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert message in (caught.value.details() or "")
    assert outcomes(gateway) == {"INVALID_ARGUMENT": 1.0}


def good_request_for(gw: Gateway) -> pb.ModelInferRequest:
    return raw_request("digits", {"input": np.zeros((1, 64), np.float32)}, {"input": "FP32"})


class FailingChooser:
    """A chooser (the router's interface) with a fault of its own: raises."""

    def __call__(
        self, request: RouteRequest, routes: object, policy: Policy, now_s: float
    ) -> Decision:
        raise RuntimeError("the router broke")


async def test_a_fault_of_the_gateway_is_internal_logged_and_counted_as_a_failure(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    chooser = gateway.servicer.chooser
    gateway.servicer.chooser = FailingChooser()
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ModelInfer(good_request_for(gateway))
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert "RuntimeError: the router broke" in (caught.value.details() or "")
        logged = [r for r in caplog.records if r.exc_info and "router broke" in str(r.exc_info[1])]
        assert len(logged) == 1, caplog.text
        # On a stream too: the failure is that message's, and the stream goes on.
        gateway.servicer.chooser = chooser
        requests = [good_request_for(gateway) for _ in range(2)]

        async def stream() -> AsyncIterator[pb.ModelInferRequest]:
            for r in requests:
                yield r

        replies = [r async for r in stub.ModelStreamInfer(stream())]
        assert [r.error_message for r in replies] == ["", ""]
    assert outcomes(gateway) == {"INTERNAL": 1.0, "OK": 2.0}
    stats = gateway.servicer.counters["digits"]
    assert (stats.fail_count, stats.success_count) == (1, 2)


async def test_a_stream_holds_at_most_its_window_in_flight(
    gateway: Gateway, worker: Worker
) -> None:
    """With the model held busy, the gateway reads STREAM_WINDOW requests off the
    stream and no more (the client's iterator is not pulled further) until answers go
    out; then every request is answered, in order."""
    held = await worker.hold("digits")
    total = STREAM_WINDOW + 20
    pulled = 0

    async def requests() -> AsyncIterator[bytes]:
        nonlocal pulled
        for index in range(total):
            pulled += 1
            request = good_request_for(gateway)
            request.id = str(index)
            yield request.SerializeToString()

    class Context:
        """What the stream handler asks of its gRPC context."""

        def time_remaining(self) -> float | None:
            return None

    replies = gateway.servicer.model_stream_infer(requests(), Context())
    first = asyncio.ensure_future(anext(replies))
    registry = gateway.servicer.metrics.registry
    await wait_until(
        lambda: (
            registry.get_sample_value("switchyard_backend_in_flight", {"backend": "cpu"})
            == STREAM_WINDOW
        ),
        what="a full window of requests in flight",
    )
    await wait_until(lambda: held.gate.holding, what="the model busy")
    assert pulled == STREAM_WINDOW
    held.gate.open()
    answers = [pb.ModelStreamInferResponse.FromString(await first)]
    answers += [pb.ModelStreamInferResponse.FromString(r) async for r in replies]
    assert pulled == total
    assert [a.error_message for a in answers] == [""] * total
    assert [a.infer_response.id for a in answers] == [str(i) for i in range(total)]


async def test_a_body_only_a_full_parse_refuses_is_invalid_argument_and_no_fault_of_the_backend(
    gateway: Gateway, worker: Worker
) -> None:
    """The gateway parses only the header and forwards the bytes; the worker parses them
    whole. Contents that do not parse are INVALID_ARGUMENT there (gRPC's own parse
    answered UNKNOWN, which the gateway retried and held against the backend: a
    client could have had backends ejected), on ModelInfer and on a stream."""
    body = b"\x0a\x06digits" + BAD_CONTENTS_INPUT
    for address in (gateway.address, worker.address):
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            for _ in range(4):  # more than eject_after_failures
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call(body)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, address
                assert "not a valid ModelInferRequest" in (caught.value.details() or "")
            stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")

            async def bodies() -> AsyncIterator[bytes]:
                yield body
                yield good_request_for(gateway).SerializeToString()

            replies = [pb.ModelStreamInferResponse.FromString(r) async for r in stream(bodies())]
            assert "not a valid ModelInferRequest" in replies[0].error_message
            assert replies[1].error_message == ""
    backend = gateway.fleet.backends["cpu"]
    assert backend.available and backend.last_error == ""
