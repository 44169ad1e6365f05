"""Gateways in process that share one store: each member with its admin and inference
stubs, over the control tests' two digits workers (`pair`), and how long a change took
to reach another member."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.control.redis_server import RedisServer
from gateway.control.shared_state import KEY
from gateway.control.state import ControlState, decode_state
from gateway.server import Gateway, start_gateway
from protos import admin_pb2_grpc
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import Worker, fleet_config, gateway_clients, raw_request, samples
from tests.waiting import wait_until

GENEROUS_S = 10.0
"""How long a test waits for a change to reach another gateway (the target is 1 s; the
delay each test saw is printed)."""


@dataclass
class Member:
    """One gateway of the group, with its admin and inference stubs."""

    gateway: Gateway
    admin: admin_pb2_grpc.AdminStub
    stub: pb_grpc.GRPCInferenceServiceStub

    def price(self, backend: str) -> float:
        return self.gateway.fleet.backends[backend].price_usd_per_hour

    def drained(self, backend: str) -> bool:
        return self.gateway.fleet.backends[backend].drained

    def status(self, backend: str) -> str:
        return self.gateway.fleet.backends[backend].status

    def store_up(self) -> float | None:
        return self.gateway.registry.get_sample_value("switchyard_state_store_up")

    def metric(self, name: str, backend: str) -> float:
        value = self.gateway.registry.get_sample_value(name, {"backend": backend})
        return 0.0 if value is None else value

    async def infer(self, repository: Path) -> str:
        """One digits request; the backend that answered it."""
        inputs, _ = samples(repository, "digits")
        request = raw_request("digits", {"input": inputs["input"][:1]}, {"input": "FP32"})
        reply = await self.stub.ModelInfer(request, timeout=10)
        return str(reply.parameters["switchyard_backend"].string_param)

    async def eject_through(self, backend: str, repository: Path) -> None:
        """Sends requests (each retried on the other backend, so answered) until this
        gateway's outlier detection ejects `backend`."""
        for _ in range(20):
            assert await self.infer(repository) in ("cheap", "dear")
            if self.status(backend) == "ejected":
                return
        pytest.fail(f"{backend} not ejected: {self.gateway.fleet.backends[backend].last_error}")


@asynccontextmanager
async def member(
    pair: tuple[Worker, Worker],
    url: str,
    prices: tuple[float, float] = (0.04, 0.08),
    **gateway: object,
) -> AsyncIterator[Member]:
    """A gateway over `pair` ("cheap" and "dear" at `prices`, USD per hour) keeping its
    control state at `url`; `gateway` adds settings."""
    a, b = pair
    config = fleet_config(
        {"cheap": (a.address, prices[0]), "dear": (b.address, prices[1])},
        admin="127.0.0.1:0",
        state=url,
        **gateway,
    )
    gw = await start_gateway(config)
    try:
        async with gateway_clients(gw) as (stub, admin):
            yield Member(gw, admin, stub)
    finally:
        await gw.stop()


async def timed(what: str, predicate: object) -> float:
    """Waits for `predicate`; prints and returns how long it took."""
    start = time.perf_counter()
    await wait_until(predicate, GENEROUS_S, what)  # type: ignore[arg-type]
    took = time.perf_counter() - start
    print(f"{what}: {took * 1000:.1f} ms")
    return took


def stored_state(server: RedisServer) -> ControlState:
    """The control state the store holds now (its `state` field, decoded)."""
    client = server.client()
    try:
        text = client.hget(KEY, "state")
    finally:
        client.close()
    assert isinstance(text, str), "nothing stored"
    return decode_state(text, "store")
