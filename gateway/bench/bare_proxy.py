"""The floor of a Python hop, for `make bench`: a bare grpc.aio proxy that forwards each
ModelInfer call's bytes to one backend over long-lived ModelStreamInfer streams, as the
gateway does, and nothing else: no routing, no queue model, no deadlines, retries, load
reports, metrics or checks beyond the wire.

Measured beside the gateway on the same worker, it splits the hop's cost in two: what
grpc.aio and the event loop cost a Python process that relays calls at all (this proxy),
and what the gateway's own work adds on top (the gateway against this proxy).

The streams are the gateway's own multiplexer (gateway.serving.streams.StreamMux: each
request tagged with an id of its stream's, one writer and one reader task per stream),
with no deadline given; the caller's own id goes back in place of the stream's, as the
gateway's answers carry it. Any other unary method (ServerReady, ModelMetadata,
ModelConfig, ...) is relayed as one unary call.

    python -m gateway.bench.bare_proxy --backend HOST:PORT [--listen 127.0.0.1:0]

prints `{"event": "listening", "address": ...}` once it serves, and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Sequence

import grpc

from backends.process import stop_on_signals, use_uvloop
from backends.protocol.streams import id_field, message_id
from gateway.serving.streams import BackendCallError, StreamMux

SERVICE = "inference.GRPCInferenceService"
INFER = "ModelInfer"
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


class BareProxy:
    """ModelInfer relayed over `streams` streams to `backend`; other methods unary."""

    def __init__(self, channel: grpc.aio.Channel, backend: str, streams: int) -> None:
        self.channel = channel
        self.mux = StreamMux(channel, backend, streams, MAX_MESSAGE_BYTES)

    async def infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            answer = await self.mux.infer(request, None)
        except BackendCallError as exc:
            await context.abort(exc.code, exc.details)
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
        proxy = BareProxy(channel, backend, streams)
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers([proxy.handler()])
        port = server.add_insecure_port(listen)
        await server.start()
        host = listen.rsplit(":", 1)[0]
        event = {"event": "listening", "address": f"{host}:{port}", "pid": os.getpid()}
        print(json.dumps(event), flush=True)
        await stop_on_signals().wait()
        await server.stop(grace=1.0)
        await proxy.mux.close()


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
