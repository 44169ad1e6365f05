"""The floor of a Python hop, for `make bench`: a bare grpc.aio proxy that forwards each
ModelInfer call's bytes to one backend over long-lived ModelStreamInfer streams, as the
gateway does, and nothing else: no routing, no queue model, no deadlines, retries, load
reports, metrics or checks beyond the wire.

Measured beside the gateway on the same worker, it splits the hop's cost in two: what
grpc.aio and the event loop cost a Python process that relays calls at all (this proxy),
and what the gateway's own work adds on top (the gateway against this proxy).

A request is tagged with an id of its stream's own by appending the `id` field to its
bytes (backends.protocol.streams), one writer task per stream sends what callers queued
(gRPC takes one message at a time on a stream), and one reader task per stream resolves
each caller's future by the id its answer names; the caller's own id goes back in place
of the stream's, as the gateway's answers carry it. Any other unary method (ServerReady,
ModelMetadata, ModelConfig, ...) is relayed as one unary call.

    python -m gateway.bench.bare_proxy --backend HOST:PORT [--listen 127.0.0.1:0]

prints `{"event": "listening", "address": ...}` once it serves, and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import grpc

from backends.process import stop_on_signals, use_uvloop
from backends.protocol.streams import id_field, message_id, read_answer

SERVICE = "inference.GRPCInferenceService"
INFER = "ModelInfer"
STREAM_METHOD = f"/{SERVICE}/ModelStreamInfer"
UNARY_METHODS = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelConfig",
    "ModelStatistics",
)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class ProxyStream:
    """One ModelStreamInfer call to the backend and the callers waiting on it."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self.call = call
        self.pending: dict[str, asyncio.Future[bytes]] = {}
        self.outbox: deque[bytes] = deque()
        self.wakeup: asyncio.Future[None] | None = None
        self.reader = asyncio.ensure_future(self._read())
        self.writer = asyncio.ensure_future(self._write())

    def send(self, data: bytes) -> None:
        self.outbox.append(data)
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self.outbox:
                await self.call.write(self.outbox.popleft())
            self.wakeup = loop.create_future()
            await self.wakeup

    async def _read(self) -> None:
        error: BaseException = ConnectionError("stream to the backend ended")
        try:
            while True:
                data = await self.call.read()
                if data is grpc.aio.EOF:
                    break
                answer = read_answer(data)
                future = self.pending.pop(answer.id, None)
                if future is None or future.done():
                    continue
                if answer.error_message:
                    future.set_exception(RuntimeError(answer.error_message))
                else:
                    future.set_result(answer.response)
        except grpc.aio.AioRpcError as exc:
            error = exc
        for future in self.pending.values():
            if not future.done():
                future.set_exception(error)
        self.pending.clear()


class BareProxy:
    """ModelInfer relayed over `streams` streams taken in turn; other methods unary."""

    def __init__(self, channel: grpc.aio.Channel, streams: int) -> None:
        self.channel = channel
        self.streams = [ProxyStream(channel.stream_stream(STREAM_METHOD)()) for _ in range(streams)]
        self.turn = itertools.cycle(self.streams)
        self.ids = itertools.count(1)

    async def infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        stream = next(self.turn)
        tag = str(next(self.ids))
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        stream.pending[tag] = future
        stream.send(request + id_field(tag))
        try:
            answer = await future
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
        except RuntimeError as exc:
            await context.abort(grpc.StatusCode.UNKNOWN, str(exc))
        finally:
            stream.pending.pop(tag, None)
        return answer + id_field(message_id(request))

    def relay(self, method: str) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
        call = self.channel.unary_unary(f"/{SERVICE}/{method}")

        async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                answer: bytes = await call(request, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")
            return answer

        return handler

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {INFER: grpc.unary_unary_rpc_method_handler(self.infer)}
        for method in UNARY_METHODS:
            methods[method] = grpc.unary_unary_rpc_method_handler(self.relay(method))
        return grpc.method_handlers_generic_handler(SERVICE, methods)


async def serve(backend: str, listen: str, streams: int) -> None:
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    async with grpc.aio.insecure_channel(backend, options=options) as channel:
        proxy = BareProxy(channel, streams)
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers([proxy.handler()])
        port = server.add_insecure_port(listen)
        await server.start()
        host = listen.rsplit(":", 1)[0]
        event = {"event": "listening", "address": f"{host}:{port}", "pid": os.getpid()}
        print(json.dumps(event), flush=True)
        await stop_on_signals().wait()
        await server.stop(grace=1.0)
        for stream in proxy.streams:
            stream.reader.cancel()
            stream.writer.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.bench.bare_proxy", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--backend", required=True, help="HOST:PORT of the backend")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--streams", type=int, default=2, help="as the gateway's default")
    args = parser.parse_args(argv)
    use_uvloop()
    asyncio.run(serve(args.backend, args.listen, args.streams))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
