"""Triton's `priority` end to end: `switchyard serve` launching one worker that runs
one request at a time (one thread, no batching, 400 ms per request), and requests
sent through the gateway while the worker is busy. They run by priority level (1
first, then 2, then 3, the default 0 last), whatever the order they came in, both
where they wait at the worker (`coalesce_in_flight: 0`, each sent on at once) and
where they wait at the gateway (`coalesce_in_flight: 1`; requests with different
parameters never merge, so they leave one by one). Each run takes 400 ms, so the
order the answers come back in is the order the worker ran them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import pytest

from protos import admin_pb2 as apb
from protos import admin_pb2_grpc
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.e2e.conftest import ADMIN_TOKEN, RunningGateway, start_serve, stop, write_fleet
from tests.waiting import wait_until

AUTH = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
SERVICE_MS = 400


@pytest.fixture(params=[0, 1], ids=["wait-at-worker", "wait-at-gateway"])
def one_slot(
    request: pytest.FixtureRequest, repository: Path, tmp_path: Path
) -> Iterator[RunningGateway]:
    backend = {
        "name": "one",
        "address": "127.0.0.1:0",
        "price_usd_per_hour": 0.04,
        "launch": {
            "threads": 1,
            "models": ["digits"],
            "emulate_latency_ms": SERVICE_MS,
            "max_batch_rows": 1,
        },
    }
    fleet = write_fleet(
        tmp_path / "fleet.yaml",
        repository,
        [backend],
        latency_probe_interval_s=0,
        coalesce_in_flight=request.param,
    )
    gateway = start_serve(fleet, tmp_path)
    yield gateway
    stop(gateway)


async def test_requests_through_the_gateway_run_by_priority(one_slot: RunningGateway) -> None:
    # (name, priority): the first occupies the worker; the rest arrive while it runs,
    # in an order that is no priority order. The first has the best level, so it is
    # first whenever it reaches the worker.
    arrivals = [("first", 1), ("p0", None), ("p3", 3), ("p2", 2), ("p1", 1)]
    finished: list[str] = []
    rows = np.random.default_rng(7).random((1, 64), dtype=np.float32)
    async with (
        grpc.aio.insecure_channel(one_slot.address) as channel,
        grpc.aio.insecure_channel(str(one_slot.info["admin"])) as admin_channel,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        admin = admin_pb2_grpc.AdminStub(admin_channel)

        async def in_flight_is(count: int) -> bool:
            """The gateway holds `count` requests in flight on the worker's one route."""
            reply: apb.ListRoutesResponse = await admin.ListRoutes(
                apb.ListRoutesRequest(model="digits"), metadata=AUTH
            )
            (route,) = reply.routes
            return route.in_flight == count

        async def infer(name: str, priority: int | None) -> pb.ModelInferResponse:
            request = pb.ModelInferRequest(model_name="digits")
            request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
            request.raw_input_contents.append(rows.tobytes())
            # A parameter of its own: requests waiting at the gateway do not merge.
            request.parameters["tag"].string_param = name
            if priority is not None:
                request.parameters["priority"].uint64_param = priority
            reply: pb.ModelInferResponse = await stub.ModelInfer(request, timeout=30)
            finished.append(name)
            return reply

        calls = []
        for count, (name, priority) in enumerate(arrivals, start=1):
            calls.append(asyncio.ensure_future(infer(name, priority)))
            await wait_until(partial(in_flight_is, count), what=f"{name} to be in flight")
        replies = await asyncio.gather(*calls)
    assert finished == ["first", "p1", "p2", "p3", "p0"]
    assert {r.parameters["switchyard_backend"].string_param for r in replies} == {"one"}
