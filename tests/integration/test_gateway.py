"""The gateway over real gRPC, in front of two real backend workers."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.server import start_gateway
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.backends.worker.test_worker import BAD_REQUESTS
from tests.integration.conftest import (
    fleet_config,
    launch_worker,
    output,
    raw_request,
    samples,
)


async def test_health_metadata_and_config_come_from_the_fleet(gateway, gw_stub) -> None:  # type: ignore[no-untyped-def]
    assert (await gw_stub.ServerLive(pb.ServerLiveRequest())).live
    assert (await gw_stub.ServerReady(pb.ServerReadyRequest())).ready
    assert (await gw_stub.ModelReady(pb.ModelReadyRequest(name="cnn"))).ready
    assert (await gw_stub.ModelReady(pb.ModelReadyRequest(name="cnn", version="1"))).ready
    assert not (await gw_stub.ModelReady(pb.ModelReadyRequest(name="cnn", version="2"))).ready
    assert not (await gw_stub.ModelReady(pb.ModelReadyRequest(name="nope"))).ready
    meta = await gw_stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "switchyard"
    model = await gw_stub.ModelMetadata(pb.ModelMetadataRequest(name="digits"))
    assert list(model.inputs[0].shape) == [-1, 64]
    config = (await gw_stub.ModelConfig(pb.ModelConfigRequest(name="digits"))).config
    assert config.max_batch_size == 64 and list(config.input[0].dims) == [64]
    assert config.parameters["switchyard_variants"].string_value == "ort-cpu-fp32"
    index = await gw_stub.RepositoryIndex(pb.RepositoryIndexRequest())
    assert {m.name: m.state for m in index.models} == {
        "cnn": "READY",
        "digits": "READY",
        "echo": "READY",
        "echo_typed": "READY",
        "magika": "READY",
        "mobilenet": "READY",
        "resnet": "READY",
        "transformer": "READY",
    }
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await gw_stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_inference_through_the_gateway(gateway, gw_stub, repository: Path) -> None:  # type: ignore[no-untyped-def]
    inputs, reference = samples(repository, "digits")
    req = raw_request("digits", inputs, {"input": "FP32"})
    req.id = "abc"
    reply = await gw_stub.ModelInfer(req)
    assert reply.id == "abc" and reply.model_name == "digits"
    assert (output(reply, "label", np.int64) == reference["label"]).all()
    np.testing.assert_allclose(
        output(reply, "probabilities", np.float32), reference["probabilities"], rtol=1e-4, atol=1e-6
    )
    params = {k: v.string_param for k, v in reply.parameters.items()}
    assert params["switchyard_backend"] in {"cheap", "dear"}
    assert params["switchyard_variant"] == "ort-cpu-fp32"
    assert params["switchyard_attempts"] == "1"
    stats = (await gw_stub.ModelStatistics(pb.ModelStatisticsRequest(name="digits"))).model_stats[0]
    assert stats.inference_stats.success.count == 1
    assert stats.inference_count == len(reference["label"])
    assert stats.inference_stats.queue.count == stats.inference_stats.compute_infer.count == 1
    body = (
        (
            await asyncio.to_thread(
                urllib.request.urlopen, f"http://127.0.0.1:{gateway.metrics_port}/metrics"
            )
        )
        .read()
        .decode()
    )
    assert 'switchyard_requests_total{backend="' in body
    assert 'model="digits",outcome="OK"' in body
    assert 'switchyard_backend_healthy{backend="cheap"} 1.0' in body


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_stub(repository: Path) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    """A stub of one gateway (in front of two workers) for the module's bad-request cases,
    which change nothing there: one gateway for them all, not one each."""
    a = await launch_worker(repository, threads=1, hardware_class="test-1c")
    b = await launch_worker(repository, threads=1, hardware_class="test-1c")
    gw = await start_gateway(fleet_config({"cheap": (a.address, 0.04), "dear": (b.address, 0.08)}))
    try:
        async with grpc.aio.insecure_channel(gw.address) as channel:
            yield pb_grpc.GRPCInferenceServiceStub(channel)
    finally:
        await gw.stop()
        await a.stop()
        await b.stop()


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(
    ("case", "request_", "code", "message"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
async def test_bad_input_through_the_gateway(shared_stub, case, request_, code, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await shared_stub.ModelInfer(request_)
    assert info.value.code() == code, info.value.details()
    assert message in (info.value.details() or "")


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"sla_ms": pb.InferParameter(string_param="fast")}, "'sla_ms' must be a number"),
        ({"sla_ms": pb.InferParameter(int64_param=-5)}, "'sla_ms' must be positive"),
        ({"sla_class": pb.InferParameter(string_param="platinum")}, "unknown sla_class 'platinum'"),
        ({"timeout": pb.InferParameter(int64_param=0)}, "'timeout' must be positive"),
        (
            {"priority": pb.InferParameter(int64_param=-1)},
            "'priority' must be a non-negative integer",
        ),
        ({"priority": pb.InferParameter(string_param="urgent")}, "'priority' must be a number"),
    ],
)
async def test_bad_routing_parameters(shared_stub, params, message) -> None:  # type: ignore[no-untyped-def]
    req = raw_request("digits", {"input": np.zeros((1, 64), np.float32)}, {"input": "FP32"})
    for key, value in params.items():
        req.parameters[key].CopyFrom(value)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await shared_stub.ModelInfer(req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (info.value.details() or "")


async def test_garbage_bytes_are_invalid_argument(gateway) -> None:  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(b"\xff\xff\xff\xff")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_oversized_message_is_resource_exhausted(two_workers) -> None:  # type: ignore[no-untyped-def]
    a, _ = two_workers
    gw = await start_gateway(fleet_config({"only": (a.address, 0.1)}, max_message_bytes=64 * 1024))
    try:
        async with grpc.aio.insecure_channel(gw.address) as channel:
            from protos import inference_pb2_grpc as pb_grpc

            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            big = raw_request(
                "digits", {"input": np.zeros((300, 64), np.float32)}, {"input": "FP32"}
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(big)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            small = raw_request(
                "digits", {"input": np.zeros((1, 64), np.float32)}, {"input": "FP32"}
            )
            assert (await stub.ModelInfer(small)).outputs
    finally:
        await gw.stop()


async def test_deadline_travels_to_the_backend(repository: Path) -> None:
    slow = await launch_worker(repository, emulate_latency_ms=300, models=("digits",))
    gw = await start_gateway(fleet_config({"slow": (slow.address, 0.1)}))
    try:
        async with grpc.aio.insecure_channel(gw.address) as channel:
            from protos import inference_pb2_grpc as pb_grpc

            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            req = raw_request("digits", {"input": np.zeros((1, 64), np.float32)}, {"input": "FP32"})
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(req, timeout=0.05)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            req.parameters["timeout"].int64_param = 50_000  # Triton's timeout, microseconds
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(req)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            del req.parameters["timeout"]
            assert (await stub.ModelInfer(req, timeout=5)).outputs
    finally:
        await gw.stop()
        await slow.stop()


async def test_a_dead_backend_costs_no_request(two_workers, repository: Path) -> None:  # type: ignore[no-untyped-def]
    a, b = two_workers
    gw = await start_gateway(fleet_config({"a": (a.address, 0.01), "b": (b.address, 0.02)}))
    try:
        async with grpc.aio.insecure_channel(gw.address) as channel:
            from protos import inference_pb2_grpc as pb_grpc

            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            req = raw_request("digits", {"input": np.zeros((1, 64), np.float32)}, {"input": "FP32"})
            await a.stop()  # dies before the gateway's prober notices
            replies = await asyncio.gather(*(stub.ModelInfer(req) for _ in range(20)))
            assert {r.parameters["switchyard_backend"].string_param for r in replies} == {"b"}
            await b.stop()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(req)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
            assert {m.state for m in index.models} == {"UNAVAILABLE"}
    finally:
        await gw.stop()


async def test_streaming_through_the_gateway(gw_stub, repository: Path) -> None:  # type: ignore[no-untyped-def]
    inputs, reference = samples(repository, "digits")

    async def requests() -> AsyncIterator[pb.ModelInferRequest]:
        for i in range(8):
            req = raw_request("digits", {"input": inputs["input"][i : i + 1]}, {"input": "FP32"})
            req.id = str(i)
            yield req
        yield pb.ModelInferRequest(model_name="nope")

    replies = [r async for r in gw_stub.ModelStreamInfer(requests())]
    assert [r.infer_response.id for r in replies[:8]] == [str(i) for i in range(8)]
    for i, r in enumerate(replies[:8]):
        assert output(r.infer_response, "label", np.int64)[0] == reference["label"][i]
        assert r.infer_response.parameters["switchyard_backend"].string_param in {"cheap", "dear"}
    assert "unknown model 'nope'" in replies[8].error_message


async def test_load_fills_the_cheap_backend_then_spills_under_a_tight_sla(two_workers) -> None:  # type: ignore[no-untyped-def]
    # A request's cost is the backend's price times its estimated busy time, and the
    # busy time is measured: the backend taking a burst answers slower while the burst,
    # the gateway and the other worker share this machine's two cores (its estimates
    # here rose to 2.2x the idle one's), so at twice the price "dear" could be the
    # cheaper per request. At eight times the price it is not. The same slowing makes
    # 40 requests queued on one slot about 4 ms each: 160 ms, over the default 100 ms
    # SLA, so the loose SLA is a second.
    a, b = two_workers
    gw = await start_gateway(fleet_config({"cheap": (a.address, 0.01), "dear": (b.address, 0.08)}))
    try:
        async with grpc.aio.insecure_channel(gw.address) as channel:
            from protos import inference_pb2_grpc as pb_grpc

            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            image = {"image": np.zeros((1, 3, 32, 32), np.float32)}
            req = raw_request("cnn", image, {"image": "FP32"})
            # A loose SLA: the cheap backend takes the whole burst.
            req.parameters["sla_ms"].double_param = 1000.0
            replies = await asyncio.gather(*(stub.ModelInfer(req) for _ in range(40)))
            used = {r.parameters["switchyard_backend"].string_param for r in replies}
            assert used == {"cheap"}
            # A tight one: the queue on the cheap backend soon predicts a miss; the rest spill.
            req.parameters["sla_ms"].double_param = 3.0
            replies = await asyncio.gather(*(stub.ModelInfer(req) for _ in range(40)))
            used = {r.parameters["switchyard_backend"].string_param for r in replies}
            assert used == {"cheap", "dear"}
    finally:
        await gw.stop()
