"""The gateway's stream multiplexer (gateway/serving/streams.py) against a scripted
backend over real gRPC on 127.0.0.1: the backend holds each request until the test
answers it, in any order. Answers reach the requests they name; a request given up
(cancelled, or past its deadline) leaves the others waiting; a stream that breaks fails
every request in flight on it with UNAVAILABLE and the next request opens a new one; a
backend without ModelStreamInfer is found out (StreamsUnsupported)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from gateway.serving.streams import BackendCallError, StreamMux, StreamsUnsupported
from protos import inference_pb2 as pb
from tests.waiting import wait_until

METHOD = "ModelStreamInfer"
SERVICE = "inference.GRPCInferenceService"


class ScriptedBackend:
    """ModelStreamInfer that answers only when told: `received` holds each request as
    it came (the stream it came on, the request); `answer` echoes a request's id back
    on its stream, with the model name set to what the test says."""

    def __init__(self) -> None:
        self.received: list[tuple[int, pb.ModelInferRequest]] = []
        self.outboxes: list[asyncio.Queue[pb.ModelStreamInferResponse | None]] = []
        self.streams_opened = 0

    async def handle(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        stream = self.streams_opened
        self.streams_opened += 1
        outbox: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        self.outboxes.append(outbox)

        async def read() -> None:
            async for data in requests:
                self.received.append((stream, pb.ModelInferRequest.FromString(data)))

        reader = asyncio.ensure_future(read())
        try:
            while (reply := await outbox.get()) is not None:
                yield reply.SerializeToString()
        finally:
            reader.cancel()

    def answer(self, request: pb.ModelInferRequest, model: str, error: str = "") -> None:
        stream = next(s for s, r in self.received if r is request)
        reply = pb.ModelStreamInferResponse(error_message=error)
        reply.infer_response.id = request.id
        reply.infer_response.model_name = model
        if error:
            reply.infer_response.parameters["switchyard_status"].string_param = "RESOURCE_EXHAUSTED"
            reply.infer_response.parameters["switchyard_retry_after_ms"].int64_param = 25
        self.outboxes[stream].put_nowait(reply)

    def end(self, stream: int) -> None:
        self.outboxes[stream].put_nowait(None)


async def serve(handlers: dict[str, grpc.RpcMethodHandler]) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def backend() -> AsyncIterator[tuple[ScriptedBackend, str]]:
    scripted = ScriptedBackend()
    server, address = await serve({METHOD: grpc.stream_stream_rpc_method_handler(scripted.handle)})
    yield scripted, address
    await server.stop(None)


def request(model: str, client_id: str = "") -> bytes:
    return pb.ModelInferRequest(model_name=model, id=client_id).SerializeToString()


def model_of(reply: bytes) -> str:
    return pb.ModelInferResponse.FromString(reply).model_name


async def test_answers_in_any_order_reach_the_requests_they_name(
    backend: tuple[ScriptedBackend, str],
) -> None:
    scripted, address = backend
    async with grpc.aio.insecure_channel(address) as channel:
        mux = StreamMux(channel, address, 2)
        calls = [
            asyncio.ensure_future(mux.infer(request(f"m{i}", "client"), 30.0)) for i in range(6)
        ]
        await wait_until(lambda: len(scripted.received) == 6, what="six requests to arrive")
        assert scripted.streams_opened == 2
        sent = {r.model_name: r for _, r in scripted.received}
        # Each request carries an id of the multiplexer's own (the client's is replaced
        # on the wire), distinct from every other, and the timeout as Triton's parameter.
        assert len({r.id for r in sent.values()}) == 6
        assert "client" not in {r.id for r in sent.values()}
        assert all(0 < r.parameters["timeout"].int64_param <= 30_000_000 for r in sent.values())
        for i in reversed(range(6)):
            scripted.answer(sent[f"m{i}"], f"answer to m{i}")
        replies = await asyncio.gather(*calls)
        assert [model_of(r) for r in replies] == [f"answer to m{i}" for i in range(6)]
        await mux.close()


async def test_an_error_answer_carries_its_status_and_retry_hint(
    backend: tuple[ScriptedBackend, str],
) -> None:
    scripted, address = backend
    async with grpc.aio.insecure_channel(address) as channel:
        mux = StreamMux(channel, address, 1)
        call = asyncio.ensure_future(mux.infer(request("m"), None))
        await wait_until(lambda: len(scripted.received) == 1, what="the request to arrive")
        scripted.answer(scripted.received[0][1], "m", error="queue full")
        with pytest.raises(BackendCallError) as caught:
            await call
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (caught.value.details, caught.value.retry_after_ms) == ("queue full", 25)
        await mux.close()


async def test_a_request_given_up_leaves_the_others_waiting(
    backend: tuple[ScriptedBackend, str],
) -> None:
    scripted, address = backend
    async with grpc.aio.insecure_channel(address) as channel:
        mux = StreamMux(channel, address, 1)
        cancelled = asyncio.ensure_future(mux.infer(request("cancelled"), None))
        expiring = asyncio.ensure_future(mux.infer(request("expiring"), 0.05))
        kept = asyncio.ensure_future(mux.infer(request("kept"), None))
        await wait_until(lambda: len(scripted.received) == 3, what="three requests to arrive")
        cancelled.cancel()
        with pytest.raises(BackendCallError) as caught:
            await expiring  # nobody answers it
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        sent = {r.model_name: r for _, r in scripted.received}
        # Late answers to the requests given up are dropped; the one kept is answered.
        scripted.answer(sent["cancelled"], "late")
        scripted.answer(sent["expiring"], "late")
        scripted.answer(sent["kept"], "answer to kept")
        assert model_of(await kept) == "answer to kept"
        assert cancelled.cancelled()
        await mux.close()


async def test_a_broken_stream_fails_its_requests_unavailable_and_is_reopened(
    backend: tuple[ScriptedBackend, str],
) -> None:
    scripted, address = backend
    async with grpc.aio.insecure_channel(address) as channel:
        mux = StreamMux(channel, address, 1)
        calls = [asyncio.ensure_future(mux.infer(request(f"m{i}"), None)) for i in range(3)]
        await wait_until(lambda: len(scripted.received) == 3, what="three requests to arrive")
        scripted.answer(scripted.received[0][1], "answered")
        assert model_of(await calls[0]) == "answered"
        scripted.end(0)  # the backend ends the stream with two requests in flight
        for call in calls[1:]:
            with pytest.raises(BackendCallError) as caught:
                await call
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        again = asyncio.ensure_future(mux.infer(request("again"), None))
        await wait_until(lambda: len(scripted.received) == 4, what="a request on a new stream")
        assert scripted.received[3][0] == 1  # the second stream the backend saw
        scripted.answer(scripted.received[3][1], "answered again")
        assert model_of(await again) == "answered again"
        await mux.close()


async def test_a_backend_without_streams_is_found_out() -> None:
    server, address = await serve(
        {"ModelInfer": grpc.unary_unary_rpc_method_handler(lambda r, c: r)}
    )
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            mux = StreamMux(channel, address, 2)
            with pytest.raises(StreamsUnsupported):
                await mux.infer(request("m"), 5.0)
            assert mux.unsupported
            with pytest.raises(StreamsUnsupported):  # at once, for good
                await mux.infer(request("m"), 5.0)
            await mux.close()
    finally:
        await server.stop(None)


async def test_streams_ended_internal_before_any_answer_send_their_requests_unary() -> None:
    async def broken(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        await context.abort(grpc.StatusCode.INTERNAL, "Internal error from Core")
        yield b""  # an async generator: gRPC's stream handler shape

    server, address = await serve(
        {"ModelStreamInfer": grpc.stream_stream_rpc_method_handler(broken)}
    )
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            mux = StreamMux(channel, address, 2)
            with pytest.raises(StreamsUnsupported):  # its caller resends it unary
                await mux.infer(request("m"), 5.0)
            assert not mux.unsupported, "one such stream may be a backend's own fault"
            with pytest.raises(StreamsUnsupported):
                await mux.infer(request("m"), 5.0)
            assert mux.unsupported and not mux.carries(request("m"))
            await mux.close()
    finally:
        await server.stop(None)
