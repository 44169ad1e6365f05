"""Ejections shared by gateways over one store: a worker that fails requests sent
through one gateway is ejected there, and leaves the other gateway's routes too, without
that gateway having sent it anything; both route to it again after the ejection's end.
A store that is down leaves each gateway ejecting on its own, and the ejection made
meanwhile reaches the other once the store is back. Real gateways in process over real
workers and a real redis-server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from backends.runtimes.base import Array
from backends.worker.batching import Batcher, RunFn
from backends.worker.served import LoadedVariant
from gateway.control.redis_server import RedisServer
from protos import admin_pb2 as apb
from tests.integration.conftest import Worker
from tests.integration.control.group import GENEROUS_S, member, timed
from tests.waiting import wait_until

TOKEN = "shared-ejections-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
PRICES = (0.01, 1.0)
"""cheap's and dear's, far apart: cheap stays the cheaper per request whatever either's
first measured service times (cost is price x service time)."""


class Broken(Exception):
    """What the failing runtime raises."""


class Faulty:
    """A model's runtime that fails every execution while `failing` (the worker answers
    INTERNAL), and runs it otherwise."""

    def __init__(self, run: RunFn) -> None:
        self._run = run
        self.failing = False

    def __call__(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> list[Array]:
        if self.failing:
            raise Broken("the accelerator fell off the bus")
        return self._run(inputs, outputs)


@asynccontextmanager
async def faulty(worker: Worker, model: str = "digits") -> AsyncIterator[Faulty]:
    """`worker`'s `model` behind a Faulty runtime, for the test's length."""
    served = worker.models[model]
    loaded = served.variants[served.default]
    assert worker.executor is not None
    await loaded.batcher.stop()
    runtime = Faulty(loaded.adapter.run)
    outputs = [spec.name for spec in loaded.adapter.outputs]
    batcher = Batcher(runtime, worker.executor, outputs, 1)
    batcher.start()
    served.variants[served.default] = LoadedVariant(loaded.variant, loaded.adapter, batcher)
    try:
        yield runtime
    finally:
        await batcher.stop()


@pytest.fixture(autouse=True)
def token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHYARD_ADMIN_TOKEN", TOKEN)


async def test_one_gateways_ejection_leaves_the_others_routes_until_its_end(
    pair: tuple[Worker, Worker], redis_server: RedisServer, repository: Path
) -> None:
    # Long enough that the other gateway sees it before it ends, on a busy machine.
    settings = {"eject_base_s": 3.0, "latency_probe_interval_s": 0}
    async with (
        faulty(pair[0]) as runtime,
        member(pair, redis_server.url, PRICES, **settings) as one,
        member(pair, redis_server.url, PRICES, **settings) as two,
    ):
        assert await one.infer(repository) == "cheap"
        assert await two.infer(repository) == "cheap"

        runtime.failing = True
        await one.eject_through("cheap", repository)
        assert one.metric("switchyard_backend_ejections_total", "cheap") == 1
        await timed("the ejection on the other gateway", lambda: two.status("cheap") == "ejected")
        made = one.gateway.control.state.ejections["cheap"]
        print(
            f"the ejection on the other gateway, from its making: {time.time() - made.at_s:.3f} s"
        )
        assert two.metric("switchyard_backend_ejections_shared_total", "cheap") == 1
        assert two.metric("switchyard_backend_ejections_total", "cheap") == 0
        assert one.metric("switchyard_backend_ejections_shared_total", "cheap") == 0
        # The other gateway sent it nothing that failed: its callers are spared it.
        cheap = [r for r in two.gateway.fleet.all_routes() if r.backend == "cheap"]
        assert cheap and all(r.failures == 0 for r in cheap)
        assert await two.infer(repository) == "dear"
        # Its routes say so: ejected, until when, by which gateway, why.
        routes = await two.admin.ListRoutes(apb.ListRoutesRequest(model="digits"), metadata=AUTH)
        (shown,) = [r for r in routes.routes if r.backend == "cheap"]
        assert shown.status == "ejected"
        assert (
            f"by gateway {one.gateway.control.gateway_id} after 3 failures in a row" in shown.detail
        )
        assert "INTERNAL" in shown.detail and "ejected until 20" in shown.detail, shown.detail

        # Fixed; after the ejection's end, both route to it again.
        runtime.failing = False
        await timed(
            "the backend back on both gateways",
            lambda: one.status("cheap") == "ready" and two.status("cheap") == "ready",
        )
        assert await two.infer(repository) == "cheap"
        assert await one.infer(repository) == "cheap"


async def test_with_the_store_down_each_gateway_ejects_on_its_own(
    pair: tuple[Worker, Worker], redis_server: RedisServer, repository: Path
) -> None:
    """The ejection made while the store is gone is written once it is back, and the
    other gateway applies it then (it lasts long enough here)."""
    settings = {"eject_base_s": 30.0, "latency_probe_interval_s": 0}
    async with (
        faulty(pair[0]) as runtime,
        member(pair, redis_server.url, PRICES, **settings) as one,
        member(pair, redis_server.url, PRICES, **settings) as two,
    ):
        redis_server.stop()
        await wait_until(
            lambda: one.metric("switchyard_state_store_up", "") == 0,
            GENEROUS_S,
            "the store down",
        )
        runtime.failing = True
        await one.eject_through("cheap", repository)
        assert await one.infer(repository) == "dear"
        assert two.status("cheap") == "ready"

        redis_server.start()
        await timed(
            "the outage's ejection on the other gateway", lambda: two.status("cheap") == "ejected"
        )
        assert two.metric("switchyard_backend_ejections_shared_total", "cheap") == 1
