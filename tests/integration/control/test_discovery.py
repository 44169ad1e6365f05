"""DNS discovery against a real DNS server run by the test (dnslib, UDP on 127.0.0.1
port 0, its records changed while it serves) and real workers in process, each on a
loopback address of its own (127.0.0.2, 127.0.0.3: Linux routes all of 127/8 to lo)
and one shared port, as a headless Service's pods share theirs: a gateway serves
through the discovered workers, takes a new one once it is ready, drains one whose
record went under concurrent load without losing a request, and keeps serving the
last known set when the DNS server stops."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from dnslib.server import DNSServer

from gateway.server import Gateway, start_gateway
from protos import admin_pb2 as apb
from tests.integration.conftest import Worker, gateway_clients, raw_request, samples
from tests.integration.control.dns import (
    Records,
    answered_by,
    discovery_config,
    running_dns,
    worker_on,
)
from tests.waiting import wait_until

TOKEN = "test-discovery"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture
def dns_server() -> Iterator[tuple[DNSServer, Records]]:
    with running_dns() as served:
        yield served


@asynccontextmanager
async def discovered_fleet(
    repository: Path, dns: DNSServer, records: Records, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Gateway, Worker, int]]:
    """A gateway whose one backend group is NAME, and a worker on 127.0.0.2 (its port
    the group's) that the records name."""
    first = await worker_on(repository, "127.0.0.2", 0)
    port = int(first.address.rsplit(":", 1)[1])
    records.addresses = {"127.0.0.2"}
    monkeypatch.setenv("SWITCHYARD_ADMIN_TOKEN", TOKEN)
    config = discovery_config(dns, port)
    gw = await start_gateway(config)
    try:
        yield gw, first, port
    finally:
        await gw.stop()
        await first.stop()


def discovery_gauge(gw: Gateway, name: str) -> float | None:
    return gw.registry.get_sample_value(f"switchyard_discovery_{name}", {"group": "workers"})


async def test_discovered_workers_join_when_ready_and_drain_under_load(
    repository: Path, dns_server: tuple[DNSServer, Records], monkeypatch: pytest.MonkeyPatch
) -> None:
    dns, records = dns_server
    inputs, _ = samples(repository, "digits")
    request = raw_request("digits", {"input": inputs["input"][:1]}, {"input": "FP32"})
    two, three = "workers-127-0-0-2", "workers-127-0-0-3"
    async with discovered_fleet(repository, dns, records, monkeypatch) as (gw, _, port):
        async with gateway_clients(gw) as (stub, admin):
            assert answered_by(await stub.ModelInfer(request, timeout=10)) == two
            assert discovery_gauge(gw, "up") == 1
            assert discovery_gauge(gw, "backends") == 1

            # A record for an address where nothing listens yet: a backend, never routed to.
            records.addresses = {"127.0.0.2", "127.0.0.3"}
            await wait_until(lambda: three in gw.fleet.backends, what="127.0.0.3 to join")
            listed = await admin.ListBackends(apb.ListBackendsRequest(), metadata=AUTH)
            assert {b.backend for b in listed.backends} == {two, three}
            assert not gw.fleet.backends[three].healthy
            for _ in range(5):
                assert answered_by(await stub.ModelInfer(request, timeout=10)) == two

            # The worker comes up: once probed ready it takes traffic (made the cheaper
            # one through the admin API, as for any backend).
            worker = await worker_on(repository, "127.0.0.3", port)
            try:
                await wait_until(
                    lambda: gw.fleet.backends[three].available, what="127.0.0.3 probed ready"
                )
                await admin.SetPrice(
                    apb.SetPriceRequest(backend=two, usd_per_hour=1.0), metadata=AUTH
                )
                routes = await admin.ListRoutes(apb.ListRoutesRequest(), metadata=AUTH)
                assert {r.backend for r in routes.routes if r.model == "digits"} == {two, three}

                async def served_by_three() -> bool:
                    return answered_by(await stub.ModelInfer(request, timeout=10)) == three

                await wait_until(served_by_three, what="a request served by 127.0.0.3")

                # Its record goes while callers keep sending and requests are held on it.
                held = await worker.hold("digits")
                leaving = gw.fleet.backends[three]
                answers: list[tuple[bool, str]] = []
                """(sent after 3 left, answered by)"""
                errors: list[grpc.aio.AioRpcError] = []
                stop, left = asyncio.Event(), asyncio.Event()

                async def caller() -> None:
                    while not stop.is_set():
                        late = left.is_set()
                        try:
                            reply = await stub.ModelInfer(request, timeout=30)
                        except grpc.aio.AioRpcError as exc:
                            errors.append(exc)
                        else:
                            answers.append((late, answered_by(reply)))

                callers = [asyncio.create_task(caller()) for _ in range(6)]
                await wait_until(lambda: leaving.in_flight > 0, what="requests held on 3")
                records.addresses = {"127.0.0.2"}
                await wait_until(lambda: three not in gw.fleet.backends, what="3 to leave")
                left.set()
                in_flight = leaving.in_flight
                assert in_flight > 0  # it left the routes with requests still out on it
                held.gate.open()
                await wait_until(lambda: leaving.in_flight == 0, what="3's requests to finish")
                await wait_until(
                    lambda: sum(late for late, _ in answers) >= 10, what="10 answers since"
                )
                await wait_until(
                    lambda: (
                        gw.registry.get_sample_value(
                            "switchyard_backend_healthy", {"backend": three}
                        )
                        is None
                    ),
                    what="3 released (its gauges gone)",
                )
                stop.set()
                await asyncio.gather(*callers)
                assert errors == []
                # The requests out on it when it left finished there; none went to it since.
                assert sum(1 for late, b in answers if b == three and not late) >= in_flight
                assert {b for late, b in answers if late} == {two}
                assert discovery_gauge(gw, "backends") == 1
            finally:
                await worker.stop()


async def test_a_dns_outage_keeps_the_last_known_backends_serving(
    repository: Path, dns_server: tuple[DNSServer, Records], monkeypatch: pytest.MonkeyPatch
) -> None:
    dns, records = dns_server
    inputs, _ = samples(repository, "digits")
    request = raw_request("digits", {"input": inputs["input"][:1]}, {"input": "FP32"})
    async with discovered_fleet(repository, dns, records, monkeypatch) as (gw, _, _port):
        async with gateway_clients(gw) as (stub, _admin):
            assert answered_by(await stub.ModelInfer(request, timeout=10)) == "workers-127-0-0-2"
            dns.stop()
            dns.server.server_close()
            await wait_until(
                lambda: discovery_gauge(gw, "up") == 0, what="switchyard_discovery_up 0"
            )
            assert discovery_gauge(gw, "backends") == 1
            for _ in range(5):
                reply = await stub.ModelInfer(request, timeout=10)
                assert answered_by(reply) == "workers-127-0-0-2"
            assert gw.fleet.backends["workers-127-0-0-2"].available
