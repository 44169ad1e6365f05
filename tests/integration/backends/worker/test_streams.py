"""The worker's ModelStreamInfer, over real gRPC with ONNX Runtime: requests on one
stream run concurrently and are answered as each finishes (out of order), each with its
`id`; an error is one request's answer (its status code and a shed request's retry hint
among the answer's parameters), and the stream goes on; a request's Triton `timeout` is
its deadline on the stream; the queue bound holds on a stream as on unary calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np

from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import launch_worker, output, raw_request, samples
from tests.waiting import wait_until


class Stream:
    """One ModelStreamInfer call whose requests the test sends one at a time."""

    def __init__(self, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
        self.outbox: asyncio.Queue[pb.ModelInferRequest | None] = asyncio.Queue()
        self.call = stub.ModelStreamInfer(self._requests())

    async def _requests(self) -> AsyncIterator[pb.ModelInferRequest]:
        while (request := await self.outbox.get()) is not None:
            yield request

    def send(self, request: pb.ModelInferRequest) -> None:
        self.outbox.put_nowait(request)

    async def read(self) -> pb.ModelStreamInferResponse:
        reply = await self.call.read()
        assert reply is not grpc.aio.EOF, "the stream ended"
        assert isinstance(reply, pb.ModelStreamInferResponse)
        return reply


def digits_row(repository: Path, row: int, request_id: str) -> pb.ModelInferRequest:
    rows = samples(repository, "digits")[0]["input"]
    request = raw_request("digits", {"input": rows[row : row + 1]}, {"input": "FP32"})
    request.id = request_id
    return request


def cnn_row(repository: Path, request_id: str) -> pb.ModelInferRequest:
    images = samples(repository, "cnn")[0]["image"]
    request = raw_request("cnn", {"image": images[:1]}, {"image": "FP32"})
    request.id = request_id
    return request


async def test_answers_come_as_requests_finish_each_with_its_id(repository: Path) -> None:
    worker = await launch_worker(repository, threads=1, models=["digits", "cnn"])
    try:
        held = await worker.hold("digits")
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stream = Stream(pb_grpc.GRPCInferenceServiceStub(channel))
            stream.send(digits_row(repository, 0, "slow"))
            await wait_until(lambda: held.gate.holding, what="the digits request to run")
            stream.send(cnn_row(repository, "fast"))
            first = await stream.read()  # while digits is still held
            assert (first.infer_response.id, first.error_message) == ("fast", "")
            expected = samples(repository, "cnn")[1]["probabilities"][:1]
            got = output(first.infer_response, "probabilities", np.float32)
            np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
            held.gate.open()
            second = await stream.read()
            assert second.infer_response.id == "slow"
            reference = samples(repository, "digits")[1]["label"][0]
            assert output(second.infer_response, "label", np.int64)[0] == reference
            stream.send(None)  # type: ignore[arg-type]
            assert await stream.call.read() is grpc.aio.EOF
            assert await stream.call.code() == grpc.StatusCode.OK
    finally:
        await worker.stop()


async def test_a_shed_request_is_answered_with_its_status_and_retry_hint(
    repository: Path,
) -> None:
    """With the model busy and its queue full, one more request on the stream is
    answered RESOURCE_EXHAUSTED with a retry hint, and the stream goes on: the others
    are answered once the model is free, and so are requests sent after."""
    worker = await launch_worker(repository, threads=1, models=["digits"])
    try:
        held = await worker.hold("digits")
        held.batcher.max_queue = 1
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stream = Stream(pb_grpc.GRPCInferenceServiceStub(channel))
            stream.send(digits_row(repository, 0, "running"))
            await wait_until(lambda: held.gate.holding, what="the first request to run")
            stream.send(digits_row(repository, 1, "queued"))
            await wait_until(lambda: held.batcher.arrived == 2, what="the second to queue")
            stream.send(digits_row(repository, 2, "shed"))
            shed = await stream.read()
            assert shed.infer_response.id == "shed"
            assert "queue full" in shed.error_message
            parameters = shed.infer_response.parameters
            assert parameters["switchyard_status"].string_param == "RESOURCE_EXHAUSTED"
            assert parameters["switchyard_retry_after_ms"].int64_param >= 1
            held.gate.open()
            answered = {(await stream.read()).infer_response.id for _ in range(2)}
            assert answered == {"running", "queued"}
            stream.send(digits_row(repository, 3, "after"))
            after = await stream.read()
            assert (after.infer_response.id, after.error_message) == ("after", "")
    finally:
        await worker.stop()


async def test_a_requests_timeout_is_its_deadline_on_the_stream(repository: Path) -> None:
    """A request whose Triton `timeout` passes while it waits behind a running one is
    answered DEADLINE_EXCEEDED without running; the one it waited behind is answered."""
    worker = await launch_worker(repository, threads=1, models=["digits"])
    try:
        held = await worker.hold("digits")
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stream = Stream(pb_grpc.GRPCInferenceServiceStub(channel))
            stream.send(digits_row(repository, 0, "running"))
            await wait_until(lambda: held.gate.holding, what="the first request to run")
            late = digits_row(repository, 1, "late")
            late.parameters["timeout"].int64_param = 1  # microseconds
            stream.send(late)
            await wait_until(lambda: held.batcher.arrived == 2, what="the second to queue")
            held.gate.open()
            replies = {}
            for _ in range(2):
                reply = await stream.read()
                replies[reply.infer_response.id] = reply
            assert replies["running"].error_message == ""
            status = replies["late"].infer_response.parameters["switchyard_status"]
            assert status.string_param == "DEADLINE_EXCEEDED"
            assert len(held.gate.ran) == 1  # the late request never ran
    finally:
        await worker.stop()


async def test_a_request_that_does_not_parse_is_answered_and_the_stream_goes_on(
    repository: Path,
) -> None:
    worker = await launch_worker(repository, threads=1, models=["cnn"])
    try:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")(
                iter([b"\x1a\x03bad\xff", cnn_row(repository, "good").SerializeToString()])
            )
            replies = [pb.ModelStreamInferResponse.FromString(r) async for r in call]
            by_id = {r.infer_response.id: r for r in replies}
            assert "not a valid ModelInferRequest" in by_id["bad"].error_message
            assert by_id["bad"].infer_response.parameters["switchyard_status"].string_param == (
                "INVALID_ARGUMENT"
            )
            assert by_id["good"].error_message == ""
    finally:
        await worker.stop()
