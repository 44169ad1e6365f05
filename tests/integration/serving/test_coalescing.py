"""Request coalescing on the gateway's hop, through real gRPC: concurrent requests
share backend calls, every caller gets exactly its own rows, and malformed or late
requests never disturb their neighbours."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from gateway.server import Gateway, start_gateway
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import (
    Worker,
    fleet_config,
    launch_worker,
    output,
    raw_request,
    samples,
)
from tests.waiting import wait_until


@pytest.fixture
async def slow_gateway(repository: Path) -> AsyncIterator[tuple[Gateway, Worker]]:
    # 30 ms per backend call, so requests arriving meanwhile wait and merge.
    worker = await launch_worker(repository, emulate_latency_ms=30, models=("digits",))
    gateway = await start_gateway(fleet_config({"slow": (worker.address, 0.1)}))
    yield gateway, worker
    await gateway.stop()
    await worker.stop()


async def _calls(worker: Worker) -> int:
    async with grpc.aio.insecure_channel(worker.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stats: pb.ModelStatisticsResponse = await stub.ModelStatistics(
            pb.ModelStatisticsRequest(name="digits")
        )
        return stats.model_stats[0].inference_stats.success.count


async def test_concurrent_requests_share_calls_and_get_their_own_rows(
    slow_gateway: tuple[Gateway, Worker], repository: Path
) -> None:
    gateway, worker = slow_gateway
    inputs, reference = samples(repository, "digits")
    x = inputs["input"]
    slices = []  # batches of 1, 2 and 3 rows, 30 requests over the 32 samples
    start = 0
    for i in range(30):
        rows = 1 + i % 3
        slices.append((start % 30, rows))
        start += rows
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        requests = []
        for i, (first, rows) in enumerate(slices):
            req = raw_request("digits", {"input": x[first : first + rows]}, {"input": "FP32"})
            req.id = f"r{i}"
            req.parameters["sla_ms"].int64_param = 500
            requests.append(req)
        replies = await asyncio.gather(*(stub.ModelInfer(r) for r in requests))
    for i, ((first, rows), reply) in enumerate(zip(slices, replies, strict=True)):
        assert reply.id == f"r{i}"
        labels = output(reply, "label", np.int64)
        assert labels.shape == (rows,)
        assert (labels == reference["label"][first : first + rows]).all()
        probabilities = output(reply, "probabilities", np.float32)
        np.testing.assert_allclose(
            probabilities, reference["probabilities"][first : first + rows], rtol=1e-4, atol=1e-6
        )
        assert reply.parameters["switchyard_backend"].string_param == "slow"
        assert reply.parameters["switchyard_variant"].string_param == "ort-cpu-fp32"
    assert gateway.servicer.coalescer.merged_calls > 0
    assert await _calls(worker) < len(requests)


async def test_malformed_neighbours_never_borrow_bytes(slow_gateway, repository: Path) -> None:  # type: ignore[no-untyped-def]
    gateway, _ = slow_gateway
    inputs, reference = samples(repository, "digits")
    x = inputs["input"]

    def req(rows_declared: int, data: np.ndarray, datatype: str = "FP32") -> pb.ModelInferRequest:
        r = pb.ModelInferRequest(model_name="digits")
        r.inputs.add(name="input", datatype=datatype, shape=[rows_declared, 64])
        r.raw_input_contents.append(data.tobytes())
        return r

    # Together these two would look like 3 valid rows; apart each is malformed.
    too_many = req(1, x[0:2])
    too_few = req(2, x[2:3])
    wrong_type = req(1, x[0:1].astype(np.float64), "FP64")
    good = [req(1, x[i : i + 1]) for i in range(12)]
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def call(r: pb.ModelInferRequest) -> object:
            try:
                return await stub.ModelInfer(r)
            except grpc.aio.AioRpcError as exc:
                return exc

        mixed = [*good[:4], too_many, *good[4:8], too_few, wrong_type, *good[8:]]
        results = await asyncio.gather(*(call(r) for r in mixed))
    by_request = dict(zip(map(id, mixed), results, strict=True))
    for i, r in enumerate(good):
        reply = by_request[id(r)]
        assert isinstance(reply, pb.ModelInferResponse), reply
        assert output(reply, "label", np.int64).tolist() == [reference["label"][i]]
    for bad, message in [
        (too_many, "raw contents hold 512 bytes"),
        (too_few, "raw contents hold 256 bytes"),
        (wrong_type, "datatype FP64"),
    ]:
        error = by_request[id(bad)]
        assert isinstance(error, grpc.aio.AioRpcError)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (error.details() or "")


async def test_a_waiting_request_keeps_its_own_deadline(slow_gateway) -> None:  # type: ignore[no-untyped-def]
    """While the route's one call slot is busy (its request held at the worker), a
    request with a 10 ms deadline waits at the gateway and is given up at its deadline
    with the slot still busy; those without one wait on and are answered."""
    gateway, worker = slow_gateway
    held = await worker.hold("digits")
    state = gateway.fleet.backends["slow"]
    req = raw_request("digits", {"input": np.zeros((1, 64), np.float32)}, {"input": "FP32"})
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        first = stub.ModelInfer(req)  # takes the call slot
        await wait_until(lambda: held.gate.holding, what="the first request to hold the slot")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(req, timeout=0.01)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_until(lambda: state.in_flight == 1, what="the gateway to let it go")
        assert held.gate.holding  # the slot was busy all the while
        patient = [stub.ModelInfer(req) for _ in range(3)]
        await wait_until(lambda: state.in_flight == 4, what="the patient requests to wait")
        held.gate.open()
        for reply in [await first, *[await p for p in patient]]:
            assert reply.outputs
