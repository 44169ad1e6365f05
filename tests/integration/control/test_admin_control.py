"""Failure drills and routing through the admin API, on a real gateway in process
supervising real worker processes: kill holds a worker down, restart brings it
back on its port, and the routing rule switches between the SLA router and the
baselines (what `switchyard load` drives)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from gateway.config import FleetConfig
from gateway.control import admin_cli
from gateway.control.supervisor import MIN_BACKOFF_S
from gateway.routing.router import ROUTING
from gateway.server import Gateway, start_gateway
from protos import admin_pb2 as apb
from protos import admin_pb2_grpc
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import (
    Worker,
    gateway_clients,
    launch_worker,
    raw_request,
    samples,
    server_ready,
)
from tests.waiting import wait_until

TOKEN = "test-admin-control"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
LAUNCHED = ("cheap", "dear")
Clients = tuple[pb_grpc.GRPCInferenceServiceStub, admin_pb2_grpc.AdminStub]


@pytest.fixture
async def outside(repository: Path) -> AsyncIterator[Worker]:
    """A backend the gateway does not launch (an external address)."""
    worker = await launch_worker(
        repository, threads=1, hardware_class="test-1c", models=("digits",)
    )
    yield worker
    await worker.stop()


@pytest.fixture
async def supervised(
    repository: Path, outside: Worker, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Gateway]:
    monkeypatch.setenv("SWITCHYARD_ADMIN_TOKEN", TOKEN)
    launch = {"threads": 1, "models": ["digits"]}
    config = FleetConfig.model_validate(
        {
            "repository": str(repository),
            "gateway": {
                "listen": "127.0.0.1:0",
                "metrics": "127.0.0.1:0",
                "http": "127.0.0.1:0",
                "admin": "127.0.0.1:0",
                "probe_interval_s": 0.2,
                # Warm-up probes only (no later ones to count among the requests): every
                # route measured before Ready, as the workers' priors time compute alone.
                "latency_probe_interval_s": 3600,
            },
            "backends": [
                {
                    "name": "cheap",
                    "address": "127.0.0.1:0",
                    "price_usd_per_hour": 0.01,
                    "launch": launch,
                },
                {
                    "name": "dear",
                    "address": "127.0.0.1:0",
                    "price_usd_per_hour": 0.5,
                    "launch": launch,
                },
                {"name": "outside", "address": outside.address, "price_usd_per_hour": 20.0},
            ],
            "policies": {"default": {"latency_ms": 2000}},
        }
    )
    gw = await start_gateway(config)
    yield gw
    pids = list(gw.supervisor.pids().values())
    await gw.stop()
    for pid in pids:
        assert not _alive(pid), f"worker {pid} outlived the gateway"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
async def clients(
    supervised: Gateway,
) -> AsyncIterator[Clients]:
    async with gateway_clients(supervised) as (stub, admin):
        await wait_until(
            lambda: server_ready(supervised),
            timeout_s=60,
            what="the gateway ready (its routes warmed up)",
        )
        yield stub, admin


def digits_request(repository: Path) -> pb.ModelInferRequest:
    inputs, _ = samples(repository, "digits")
    return raw_request("digits", {"input": inputs["input"][:1]}, {"input": "FP32"})


async def backends_used(
    stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest, count: int
) -> Counter[str]:
    replies = [await stub.ModelInfer(request, timeout=10) for _ in range(count)]
    return Counter(r.parameters["switchyard_backend"].string_param for r in replies)


async def listed(admin: admin_pb2_grpc.AdminStub) -> dict[str, apb.BackendProcess]:
    reply = await admin.ListBackends(apb.ListBackendsRequest(), metadata=AUTH)
    return {b.backend: b for b in reply.backends}


async def wait_for(
    admin: admin_pb2_grpc.AdminStub,
    backend: str,
    status: str,
    timeout_s: float,
    also: Callable[[apb.BackendProcess], bool] = lambda _: True,
) -> apb.BackendProcess:
    """The backend's state once its status is `status` (and `also` holds); an
    AssertionError if it is not by `timeout_s`."""
    seen: list[apb.BackendProcess] = []

    async def reached() -> bool:
        seen.append((await listed(admin))[backend])
        return seen[-1].status == status and also(seen[-1])

    await wait_until(reached, timeout_s, what=f"{backend} to be {status}", interval_s=0.05)
    return seen[-1]


async def test_kill_holds_a_worker_down_until_restart(
    supervised: Gateway, clients: Clients, repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stub, admin = clients
    request = digits_request(repository)
    before = await listed(admin)
    assert list(before) == ["cheap", "dear", "outside"]
    for name in LAUNCHED:
        assert before[name].supervised and before[name].pid > 0 and not before[name].held_down
        assert before[name].status == "ready" and before[name].restarts == 0
    assert not before["outside"].supervised and before["outside"].pid == 0
    assert before["outside"].address == supervised.fleet.backends["outside"].address
    assert before["cheap"].price_usd_per_hour == 0.01
    assert await backends_used(stub, request, 3) == {"cheap": 3}

    # Requests keep flowing while the cheap worker is killed under them.
    failures: list[str] = []
    used: Counter[str] = Counter()
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            try:
                used.update(await backends_used(stub, request, 1))
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")

    loaders = [asyncio.create_task(load()) for _ in range(3)]
    await wait_until(lambda: sum(used.values()) >= 6, what="the load to flow")
    old_pid = before["cheap"].pid
    dear_before = used["dear"]
    killed = await admin.KillBackend(apb.BackendRequest(backend="cheap"), metadata=AUTH)
    assert (killed.backend, killed.pid, killed.held_down, killed.supervised) == (
        "cheap",
        0,
        True,
        True,
    )
    assert killed.status != "ready"
    assert not _alive(old_pid)
    await wait_until(
        lambda: used["dear"] >= dear_before + 6 or bool(failures),
        what="the load to move to the dear worker",
    )
    stop.set()
    await asyncio.gather(*loaders)
    assert failures == []

    # Held down: once the supervisor has seen the worker exit and held it, and well
    # past its first back-off (the time passing is what this checks), nothing restarts it.
    await wait_until(
        lambda: any(
            r.name == "switchyard.supervisor"
            and r.getMessage().startswith("backend cheap: worker exited")
            and r.getMessage().endswith("held down")
            for r in caplog.records
        ),
        what="the supervisor to hold the killed worker down",
    )
    await asyncio.sleep(2 * MIN_BACKOFF_S)
    held = (await listed(admin))["cheap"]
    assert (held.pid, held.held_down, held.status) == (0, True, "unhealthy")
    assert await backends_used(stub, request, 3) == {"dear": 3}
    # A second kill of a held worker changes nothing.
    again = await admin.KillBackend(apb.BackendRequest(backend="cheap"), metadata=AUTH)
    assert (again.pid, again.held_down) == (0, True)

    restarted = await admin.RestartBackend(apb.BackendRequest(backend="cheap"), metadata=AUTH)
    assert restarted.pid > 0 and restarted.pid != old_pid and not restarted.held_down
    assert restarted.restarts == 1
    ready = await wait_for(admin, "cheap", "ready", 15.0)
    assert ready.status == "ready", ready
    assert ready.address == before["cheap"].address  # the same port
    assert await backends_used(stub, request, 3) == {"cheap": 3}

    # Restarting a running worker is a no-op that reports its state.
    same = await admin.RestartBackend(apb.BackendRequest(backend="cheap"), metadata=AUTH)
    assert (same.pid, same.restarts, same.status) == (restarted.pid, 1, "ready")
    # The other worker was never touched; when it crashes (no hold), the supervisor
    # restarts it by itself as before.
    dear_pid = (await listed(admin))["dear"].pid
    assert dear_pid == before["dear"].pid
    os.kill(dear_pid, signal.SIGKILL)
    back = await wait_for(admin, "dear", "ready", 15.0, lambda b: b.pid not in (0, dear_pid))
    assert back.status == "ready" and back.pid not in (0, dear_pid), back
    assert (back.restarts, back.held_down) == (1, False)


async def test_routing_switches_between_the_router_and_baselines(
    supervised: Gateway, clients: Clients, repository: Path
) -> None:
    stub, admin = clients
    request = digits_request(repository)
    routing = await admin.GetRouting(apb.GetRoutingRequest(), metadata=AUTH)
    assert routing.name == "switchyard" and tuple(routing.available) == ROUTING
    assert await backends_used(stub, request, 6) == {"cheap": 6}

    spread = await admin.SetRouting(apb.Routing(name="round-robin"), metadata=AUTH)
    assert spread.name == "round-robin" and tuple(spread.available) == ROUTING
    assert set(await backends_used(stub, request, 12)) == {"cheap", "dear", "outside"}
    got = await admin.GetRouting(apb.GetRoutingRequest(), metadata=AUTH)
    assert got.name == "round-robin"

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await admin.SetRouting(apb.Routing(name="fastest"), metadata=AUTH)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert "unknown routing 'fastest'" in details
    assert all(name in details for name in ROUTING)
    # A bad name leaves the routing in force.
    got = await admin.GetRouting(apb.GetRoutingRequest(), metadata=AUTH)
    assert got.name == "round-robin"

    await admin.SetRouting(apb.Routing(name="switchyard"), metadata=AUTH)
    assert await backends_used(stub, request, 6) == {"cheap": 6}


async def test_bad_backends_and_missing_tokens_are_refused(
    supervised: Gateway, clients: Clients
) -> None:
    _, admin = clients
    pids = supervised.supervisor.pids()
    for method in (admin.KillBackend, admin.RestartBackend):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await method(apb.BackendRequest(backend="nope"), metadata=AUTH)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        details = info.value.details() or ""
        assert "unknown backend 'nope'" in details and "cheap, dear, outside" in details

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await method(apb.BackendRequest(backend="outside"), metadata=AUTH)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "'outside' has no worker process of this gateway's" in (info.value.details() or "")

    calls: list[Callable[[tuple[tuple[str, str], ...]], Awaitable[object]]] = [
        lambda md: admin.ListBackends(apb.ListBackendsRequest(), metadata=md),
        lambda md: admin.KillBackend(apb.BackendRequest(backend="cheap"), metadata=md),
        lambda md: admin.RestartBackend(apb.BackendRequest(backend="cheap"), metadata=md),
        lambda md: admin.GetRouting(apb.GetRoutingRequest(), metadata=md),
        lambda md: admin.SetRouting(apb.Routing(name="round-robin"), metadata=md),
    ]
    for call in calls:
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Nothing changed.
    assert supervised.supervisor.pids() == pids
    routing = await admin.GetRouting(apb.GetRoutingRequest(), metadata=AUTH)
    assert routing.name == "switchyard"


def admin_command(target: str, *argv: str) -> int:
    parser = argparse.ArgumentParser()
    admin_cli.add_arguments(parser)
    return admin_cli.run(parser.parse_args(["--target", target, *argv]))


async def test_admin_cli_lists_kills_restarts_and_sets_routing(
    supervised: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    target = supervised.admin_address
    assert target is not None

    async def cli(*argv: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(admin_command, target, *argv)
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = await cli("backends")
    assert code == 0
    for needle in ("cheap", "dear", "outside", "held", "restarts", "0.0100"):
        assert needle in out
    code, out, _ = await cli("--json", "backends")
    assert code == 0
    rows = {b["backend"]: b for b in json.loads(out)["backends"]}
    assert rows["cheap"]["supervised"] and int(rows["cheap"]["pid"]) > 0

    code, out, _ = await cli("kill", "cheap")
    assert code == 0 and "cheap: not running, held down" in out
    code, out, _ = await cli("--json", "restart", "cheap")
    assert code == 0
    assert int(json.loads(out)["pid"]) > 0 and "held_down" not in json.loads(out)

    code, out, _ = await cli("routing")
    assert code == 0 and "routing: switchyard (available: switchyard, fastest-only" in out
    code, out, _ = await cli("--json", "routing", "least-loaded")
    assert code == 0 and json.loads(out)["name"] == "least-loaded"
    code, _, err = await cli("routing", "nope")
    assert code == 1 and "INVALID_ARGUMENT: unknown routing 'nope'" in err
    code, _, err = await cli("kill", "outside")
    assert code == 1 and "FAILED_PRECONDITION" in err


async def test_admin_cli_routes_says_why_a_backend_has_no_routes(
    outside: Worker,
    repository: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A backend whose address refuses connections was never ready, so it has no
    routes: `switchyard admin routes` names it below the table with its address, its
    status and the probe's error (as `backends` shows it), `--json` carries it in
    `without_routes`, and a backend with routes is not among them."""
    monkeypatch.setenv("SWITCHYARD_ADMIN_TOKEN", TOKEN)
    # A port bound but not listening: connections to it are refused while it is held.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        refusing = f"127.0.0.1:{held.getsockname()[1]}"
        config = FleetConfig.model_validate(
            {
                "repository": str(repository),
                "gateway": {
                    "listen": "127.0.0.1:0",
                    "metrics": "127.0.0.1:0",
                    "admin": "127.0.0.1:0",
                    "probe_interval_s": 0.2,
                    "latency_probe_interval_s": 0,
                },
                "backends": [
                    {"name": "outside", "address": outside.address, "price_usd_per_hour": 0.1},
                    {"name": "nowhere", "address": refusing, "price_usd_per_hour": 0.01},
                ],
            }
        )
        gw = await start_gateway(config)
        try:
            async with gateway_clients(gw) as (_, admin):

                async def probed() -> bool:
                    reply = await admin.ListRoutes(apb.ListRoutesRequest(), metadata=AUTH)
                    return any(r.backend == "outside" for r in reply.routes) and any(
                        b.backend == "nowhere" and b.detail for b in reply.without_routes
                    )

                await wait_until(probed, timeout_s=30, what="both backends probed")
                detail = (await listed(admin))["nowhere"].detail
            assert detail.startswith("UNAVAILABLE: ")
            target = gw.admin_address
            assert target is not None

            code = await asyncio.to_thread(admin_command, target, "routes")
            out, err = capsys.readouterr()
            assert code == 0, err
            table, _, below = out.partition("backends with no routes:")
            assert "outside" in table and "digits" in table and "nowhere" not in table
            # The console wraps long lines: compare the words (the probe's error, which
            # the next probe writes again, may word the refusal differently).
            words = " ".join(below.split())
            assert words.startswith(f"nowhere at {refusing}: no routes, unhealthy: UNAVAILABLE: ")

            code = await asyncio.to_thread(admin_command, target, "--json", "routes")
            out, err = capsys.readouterr()
            assert code == 0, err
            reply = json.loads(out)
            assert {r["backend"] for r in reply["routes"]} == {"outside"}
            [unrouted] = reply["without_routes"]
            assert (unrouted["backend"], unrouted["status"], unrouted["address"]) == (
                "nowhere",
                "unhealthy",
                refusing,
            )
            assert unrouted["detail"].startswith("UNAVAILABLE: ")

            code = await asyncio.to_thread(admin_command, target, "routes", "--model", "digits")
            out, _ = capsys.readouterr()
            assert code == 0 and f"nowhere at {refusing}: no routes, unhealthy" in out

            code = await asyncio.to_thread(admin_command, target, "backends")
            out, _ = capsys.readouterr()
            assert code == 0 and "UNAVAILABLE" in out and "detail" in out
        finally:
            await gw.stop()
