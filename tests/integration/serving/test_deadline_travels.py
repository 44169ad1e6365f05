"""The caller's deadline travels with the gateway's call to the backend: a recording
hop between a real gateway and a real worker sees each forwarded ModelInfer arrive
with no more time than the client gave (a gRPC deadline or Triton's `timeout`), and
sees it ended when that time is up, not when the slow worker would have answered."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from gateway.server import start_gateway
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import fleet_config, launch_worker, raw_request
from tests.waiting import wait_until

INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass
class Seen:
    time_remaining_s: float | None
    ended: str = ""
    """How the forwarded call ended: OK, or the status the hop saw."""


@dataclass
class RecordingHop:
    """A gRPC server that forwards every unary call's bytes to `target` under the
    deadline it received, and records what each ModelInfer brought."""

    target: str
    infers: list[Seen] = field(default_factory=list)
    server: grpc.aio.Server | None = None
    channel: grpc.aio.Channel | None = None
    address: str = ""

    async def start(self) -> RecordingHop:
        self.channel = grpc.aio.insecure_channel(self.target)
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers([_Forward(self)])
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.address = f"127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        assert self.server is not None and self.channel is not None
        await self.server.stop(None)
        await self.channel.close()

    async def forward(
        self, method: str, request: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        assert self.channel is not None
        remaining = context.time_remaining()
        seen = Seen(remaining) if method == INFER else None
        if seen is not None:
            self.infers.append(seen)
        call = self.channel.unary_unary(method)
        try:
            reply: bytes = await call(request, timeout=remaining)
        except grpc.aio.AioRpcError as exc:
            if seen is not None:
                seen.ended = exc.code().name
            await context.abort(exc.code(), exc.details() or "")
        except asyncio.CancelledError:
            if seen is not None:
                seen.ended = "CANCELLED"
            raise
        if seen is not None:
            seen.ended = "OK"
        return reply


class _Forward(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc is untyped here (Any)
    def __init__(self, hop: RecordingHop) -> None:
        self.hop = hop

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = str(details.method)
        if method.endswith("StreamInfer") or method.endswith("/Watch"):
            return None  # unary calls only (UNIMPLEMENTED): the gateway forwards unary

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await self.hop.forward(method, request, context)

        return grpc.unary_unary_rpc_method_handler(handle)


@pytest.mark.parametrize("how", ["grpc deadline", "triton timeout"])
async def test_the_callers_deadline_reaches_the_backend(repository: Path, how: str) -> None:
    worker = await launch_worker(repository, emulate_latency_ms=1500, models=("digits",))
    hop = await RecordingHop(worker.address).start()
    # No latency probes (nor their warm-up): the hop's one inference is the caller's.
    gw = await start_gateway(fleet_config({"slow": (hop.address, 0.1)}, latency_probe_interval_s=0))
    try:
        async with grpc.aio.insecure_channel(gw.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            req = raw_request("digits", {"input": np.zeros((1, 64), np.float32)}, {"input": "FP32"})
            timeout = None
            if how == "grpc deadline":
                timeout = 0.3
            else:
                req.parameters["timeout"].int64_param = 300_000  # microseconds
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(req, timeout=timeout)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_until(
            lambda: bool(hop.infers) and hop.infers[-1].ended != "", what="the hop's call to end"
        )
        (seen,) = hop.infers
        # It arrived with the client's 300 ms or less left (without a deadline it would
        # have none; gRPC's timeout header rounds up to its unit, hence the 10 ms), and
        # ended unanswered: the worker takes 1.5 s.
        assert seen.time_remaining_s is not None and 0.0 < seen.time_remaining_s <= 0.31
        assert seen.ended in {"DEADLINE_EXCEEDED", "CANCELLED"}
    finally:
        await gw.stop()
        await hop.stop()
        await worker.stop()
