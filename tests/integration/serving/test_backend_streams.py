"""A real gateway forwarding over streams (`backend_streams`) to a real worker: every
datatype of the `echo` model comes back exactly as over unary calls, with the caller's
own `id` (or none) in the answer; a backend that serves no ModelStreamInfer (a hop that
forwards unary calls only, as KServe serves) is answered over unary calls."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from backends.protocol.tensors import encode_bytes_tensor
from gateway.server import start_gateway
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.backends.worker.test_worker import _echo_inputs
from tests.integration.conftest import Worker, fleet_config, launch_worker

INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture
async def worker(repository: Path) -> AsyncIterator[Worker]:
    w = await launch_worker(repository, threads=1, models=["echo"])
    yield w
    await w.stop()


def echo_request(request_id: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="echo", id=request_id)
    for datatype, array in _echo_inputs().items():
        request.inputs.add(name=f"in_{datatype.lower()}", datatype=datatype, shape=array.shape)
        data = encode_bytes_tensor(array) if datatype == "BYTES" else array.tobytes()
        request.raw_input_contents.append(data)
    return request


async def infer_through(
    address: str, streams: int, request: pb.ModelInferRequest
) -> pb.ModelInferResponse:
    gateway = await start_gateway(
        fleet_config({"w": (address, 0.1)}, backend_streams=streams, latency_probe_interval_s=0)
    )
    try:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            reply: pb.ModelInferResponse = await pb_grpc.GRPCInferenceServiceStub(
                channel
            ).ModelInfer(request, timeout=30)
            return reply
    finally:
        await gateway.stop()


@pytest.mark.parametrize("request_id", ["client-7", ""])
async def test_every_datatype_comes_back_as_over_unary_calls(
    worker: Worker, request_id: str
) -> None:
    request = echo_request(request_id)
    unary = await infer_through(worker.address, 0, request)
    streamed = await infer_through(worker.address, 2, request)
    assert streamed.id == unary.id == request_id
    assert list(streamed.outputs) == list(unary.outputs)
    assert list(streamed.raw_output_contents) == list(unary.raw_output_contents)
    assert len(streamed.outputs) == len(request.inputs)


class UnaryHop(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc is untyped here (Any)
    """Forwards every unary call's bytes to `channel` (so the gateway's probes and
    metadata calls pass); serves no streaming method (UNIMPLEMENTED), as KServe."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.infers = 0

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = str(details.method)
        if method.endswith("StreamInfer") or method.endswith("/Watch"):
            return None
        forward = self.channel.unary_unary(method)

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if method == INFER:
                self.infers += 1
            reply: bytes = await forward(request, timeout=context.time_remaining())
            return reply

        return grpc.unary_unary_rpc_method_handler(handle)


async def test_a_backend_without_streams_is_answered_over_unary_calls(worker: Worker) -> None:
    async with grpc.aio.insecure_channel(worker.address) as channel:
        hop = UnaryHop(channel)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([hop])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            for _ in range(2):  # the first finds out, the second goes unary at once
                reply = await infer_through(f"127.0.0.1:{port}", 2, echo_request("mine"))
                assert reply.id == "mine"
                assert len(reply.outputs) == len(echo_request("").inputs)
            assert hop.infers >= 2
        finally:
            await server.stop(None)


async def test_a_request_over_the_stream_limit_goes_as_a_unary_call(worker: Worker) -> None:
    small, large = echo_request("small"), echo_request("large")
    gateway = await start_gateway(
        fleet_config({"w": (worker.address, 0.1)}, backend_streams=2, latency_probe_interval_s=0)
    )
    try:
        streams = gateway.pool.client(worker.address).streams
        assert streams is not None
        streams.max_request_bytes = small.ByteSize() + 100  # room for what the gateway appends
        large.id = "large-" + "x" * 200
        assert large.ByteSize() > streams.max_request_bytes
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await stub.ModelInfer(small, timeout=30)
            assert streams.sent == 1
            reply = await stub.ModelInfer(large, timeout=30)
            assert reply.id == large.id and len(reply.outputs) == len(large.inputs)
            assert streams.sent == 1, "the large request went as a unary call"
    finally:
        await gateway.stop()
