"""The backend client pool: one gRPC channel per backend address, the lean
forwarding call (serialized bytes in, serialized bytes out; unary, or over a few
long-lived streams: streams.py), and the typed calls the prober uses. The caller's
deadline travels with every call. A channel is plaintext, or TLS as the pool's
`security` says for its address (remote backends' `tls`, launched workers' mTLS).

The gRPC edge towards backends: channels (gateway.security) and the generated stubs; no
routing and no fleet state.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.security import ChannelSecurity, secure_channel
from gateway.serving.streams import BackendCallError as BackendCallError
from gateway.serving.streams import StreamMux
from protos import inference_pb2_grpc as pb_grpc

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"


class BackendClient:
    """Channel and calls for one backend address."""

    def __init__(
        self,
        address: str,
        max_message_bytes: int,
        security: ChannelSecurity | None = None,
        keepalive_s: float = 0.0,
        streams: int = 0,
    ) -> None:
        self.address = address
        options: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Reconnect fast when a backend comes back.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.enable_retries", 0),
        ]
        if keepalive_s > 0.0:
            # Pings while calls are out; one unanswered for keepalive_s closes the
            # connection, failing its calls over (a hung or partitioned backend).
            keepalive_ms = int(keepalive_s * 1000)
            options += [
                ("grpc.keepalive_time_ms", keepalive_ms),
                ("grpc.keepalive_timeout_ms", keepalive_ms),
                ("grpc.keepalive_permit_without_calls", 0),
                ("grpc.http2.max_pings_without_data", 0),
            ]
        self.channel = secure_channel(address, security, options)
        # Identity (de)serializers: the gateway forwards bytes without re-encoding.
        self.infer = self.channel.unary_unary(INFER_METHOD)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.streams = StreamMux(self.channel, address, streams) if streams > 0 else None
        """Forwarding over long-lived streams (None: unary calls only)."""

    async def close(self) -> None:
        if self.streams is not None:
            await self.streams.close()
        await self.channel.close()


def _plaintext(address: str) -> ChannelSecurity | None:
    return None


class BackendPool:
    """Clients by address, created on first use and replaced when an address changes;
    `security` says how the channel to an address is secured (None: plaintext);
    `streams`: how many ModelStreamInfer streams forward requests to each backend that
    serves them (0: one unary call per request)."""

    def __init__(
        self,
        max_message_bytes: int,
        security: Callable[[str], ChannelSecurity | None] = _plaintext,
        keepalive_s: float = 0.0,
        streams: int = 0,
    ) -> None:
        self._max_message_bytes = max_message_bytes
        self._security = security
        self._keepalive_s = keepalive_s
        self.streams = streams
        self._clients: dict[str, BackendClient] = {}

    def client(self, address: str) -> BackendClient:
        client = self._clients.get(address)
        if client is None:
            client = BackendClient(
                address,
                self._max_message_bytes,
                self._security(address),
                self._keepalive_s,
                self.streams,
            )
            self._clients[address] = client
        return client

    async def discard(self, address: str) -> None:
        """Closes the client of `address` (a backend that left the fleet), if any."""
        client = self._clients.pop(address, None)
        if client is not None:
            await client.close()

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
