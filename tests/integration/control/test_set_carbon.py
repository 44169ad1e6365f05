"""Carbon intensity set through the admin API (`SetCarbon`, `switchyard admin
set-carbon`) on a real gateway in process over two real workers: a carbon-objective
policy's requests move to the backend that became the cleaner, at once; bad input
is a clear status naming what was wrong."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import grpc
import pytest

from gateway.config import FleetConfig
from gateway.control import admin_cli
from gateway.server import start_gateway
from protos import admin_pb2 as apb
from protos import admin_pb2_grpc
from tests.integration.conftest import Worker, gateway_clients, raw_request, samples, server_ready
from tests.waiting import wait_until

TOKEN = "test-set-carbon"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


async def carbon_of(admin: admin_pb2_grpc.AdminStub) -> dict[str, tuple[float, float]]:
    reply = await admin.ListRoutes(apb.ListRoutesRequest(), metadata=AUTH)
    return {r.backend: (r.carbon_g_per_kwh, r.power_w) for r in reply.routes}


def admin_command(target: str, *argv: str) -> int:
    parser = argparse.ArgumentParser()
    admin_cli.add_arguments(parser)
    return admin_cli.run(parser.parse_args(["--target", target, *argv]))


async def test_set_carbon_moves_a_carbon_objective_policy_and_refuses_bad_input(
    pair: tuple[Worker, Worker],
    repository: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SWITCHYARD_ADMIN_TOKEN", TOKEN)
    a, b = pair
    config = FleetConfig.model_validate(
        {
            "repository": str(repository),
            "gateway": {
                "listen": "127.0.0.1:0",
                "metrics": "127.0.0.1:0",
                "admin": "127.0.0.1:0",
                "probe_interval_s": 0.2,
            },
            "backends": [
                {
                    "name": "north",
                    "address": a.address,
                    "price_usd_per_hour": 0.01,
                    "carbon_g_per_kwh": 100,
                    "power_w": 50,
                },
                # No carbon figures: carbon intensity alone says nothing per request.
                {"name": "south", "address": b.address, "price_usd_per_hour": 0.01},
            ],
            "policies": {
                "default": {"latency_ms": 1000, "objective": "carbon", "retries": 0},
            },
        }
    )
    gw = await start_gateway(config)
    inputs, _ = samples(repository, "digits")
    request = raw_request("digits", {"input": inputs["input"][:1]}, {"input": "FP32"})
    try:
        async with gateway_clients(gw) as (stub, admin):
            await wait_until(lambda: server_ready(gw), timeout_s=60, what="the gateway ready")

            async def backends_used(n: int = 6) -> set[str]:
                used = set()
                for _ in range(n):
                    reply = await stub.ModelInfer(request)
                    used.add(reply.parameters["switchyard_backend"].string_param)
                return used

            assert await backends_used() == {"north"}
            carbon = await carbon_of(admin)
            assert carbon == {"north": (100.0, 50.0), "south": (-1.0, -1.0)}

            # Bad input: a clear status naming what was wrong; nothing changes.
            for bad, status, words in (
                (
                    apb.SetCarbonRequest(backend="south", g_per_kwh=20),
                    "INVALID_ARGUMENT",
                    "power_w",
                ),
                (
                    apb.SetCarbonRequest(backend="north", g_per_kwh=-1),
                    "INVALID_ARGUMENT",
                    "g_per_kwh",
                ),
                (
                    apb.SetCarbonRequest(backend="north", g_per_kwh=float("nan")),
                    "INVALID_ARGUMENT",
                    "g_per_kwh",
                ),
                (
                    apb.SetCarbonRequest(backend="north", g_per_kwh=10, power_w=-5),
                    "INVALID_ARGUMENT",
                    "power_w",
                ),
                (apb.SetCarbonRequest(backend="nowhere", g_per_kwh=10), "NOT_FOUND", "nowhere"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await admin.SetCarbon(bad, metadata=AUTH)
                assert caught.value.code().name == status
                assert words in (caught.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await admin.SetCarbon(apb.SetCarbonRequest(backend="south", g_per_kwh=1))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert await carbon_of(admin) == carbon
            assert await backends_used() == {"north"}

            # south gets figures that make it the cleaner: the requests move at once.
            reply = await admin.SetCarbon(
                apb.SetCarbonRequest(backend="south", g_per_kwh=20, power_w=50), metadata=AUTH
            )
            assert (reply.backend, reply.carbon_g_per_kwh, reply.power_w) == ("south", 20, 50)
            assert await backends_used() == {"south"}

            # The CLI: north's intensity drops below south's (its power stays): back.
            target = gw.admin_address
            assert target is not None
            code = await asyncio.to_thread(admin_command, target, "set-carbon", "north", "5")
            out, _ = capsys.readouterr()
            assert code == 0, out
            assert "north" in out and "5 gCO2eq/kWh at 50 W" in out
            assert await backends_used() == {"north"}
            code = await asyncio.to_thread(
                admin_command, target, "--json", "set-carbon", "south", "1", "--power-w", "60"
            )
            out, _ = capsys.readouterr()
            assert code == 0, out
            assert json.loads(out)["power_w"] == 60.0
            assert await carbon_of(admin) == {"north": (5.0, 50.0), "south": (1.0, 60.0)}
            assert await backends_used() == {"south"}
    finally:
        await gw.stop()
