"""The backend client pool: one gRPC channel per backend address, the lean
forwarding call (serialized bytes in, serialized bytes out), and the typed calls
the prober uses. The caller's deadline travels with every call.

The gRPC edge towards backends: imports grpc and the generated stubs; no routing and no
fleet state.
"""

from __future__ import annotations

import grpc

from backends.protocol.status import StatusError
from protos import inference_pb2_grpc as pb_grpc

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"


class BackendCallError(StatusError):
    """A backend answered a call with an error status (passed to callers unchanged)."""


class BackendClient:
    """Channel and calls for one backend address."""

    def __init__(self, address: str, max_message_bytes: int) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                # Reconnect fast when a backend comes back.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
                ("grpc.enable_retries", 0),
            ],
        )
        # Identity (de)serializers: the gateway forwards bytes without re-encoding.
        self.infer = self.channel.unary_unary(INFER_METHOD)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()


class BackendPool:
    """Clients by address, created on first use and replaced when an address changes."""

    def __init__(self, max_message_bytes: int) -> None:
        self._max_message_bytes = max_message_bytes
        self._clients: dict[str, BackendClient] = {}

    def client(self, address: str) -> BackendClient:
        client = self._clients.get(address)
        if client is None:
            client = BackendClient(address, self._max_message_bytes)
            self._clients[address] = client
        return client

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
