"""What changes in a running gateway without a restart, seen from outside it: a
price schedule replayed against the clock (in a loop), and edits of the fleet file
on disk (backends' carbon figures, the policies), through the admin API
(ListRoutes, GetPolicy, `switchyard admin --json routes`) and through where the
next request goes."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from gateway.config import load_fleet
from gateway.control import admin_cli
from gateway.server import start_gateway
from protos import admin_pb2 as apb
from protos import admin_pb2_grpc
from protos import inference_pb2 as pb
from tests.integration.conftest import Worker, gateway_clients, raw_request, samples
from tests.waiting import wait_until

TOKEN = "live-changes-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def write_fleet(
    path: Path,
    backends: list[dict[str, Any]],
    policies: dict[str, Any] | None = None,
    **gateway: object,
) -> Path:
    fleet: dict[str, Any] = {
        "gateway": {
            "listen": "127.0.0.1:0",
            "metrics": "127.0.0.1:0",
            "http": "127.0.0.1:0",
            "admin": "127.0.0.1:0",
            "probe_interval_s": 0.2,
            "latency_probe_interval_s": 0,
            "watch_config_s": 0.05,
            **gateway,
        },
        "backends": backends,
    }
    if policies is not None:
        fleet["policies"] = policies
    path.write_text(yaml.safe_dump(fleet))
    return path


async def routes(admin: admin_pb2_grpc.AdminStub) -> dict[str, apb.RouteStatus]:
    reply = await admin.ListRoutes(apb.ListRoutesRequest(model="digits"), metadata=AUTH)
    return {r.backend: r for r in reply.routes}


def carbon_per_usd(route: apb.RouteStatus) -> float:
    """A route's grams of CO2 per USD: both are its busy time at the backend's rate, so
    this is carbon_g_per_kwh x power_w / 1000 / price_usd_per_hour, whatever the
    route's latency estimate; -1 when its backend has no carbon figures."""
    if route.carbon_g_per_1m < 0:
        return -1.0
    return route.carbon_g_per_1m / route.cost_usd_per_1m


async def policies_are(
    policies: Callable[[], Awaitable[dict[str, Any]]], expected: dict[str, Any]
) -> bool:
    """The policies in force hold `expected`'s sections, key for key."""
    got = await policies()
    return all(got.get(section) == value for section, value in expected.items())


def admin_command(target: str, *argv: str) -> int:
    """`switchyard admin --target TARGET ARGV...`, in this process."""
    parser = argparse.ArgumentParser()
    admin_cli.add_arguments(parser)
    return admin_cli.run(parser.parse_args(["--target", target, *argv]))


async def test_a_looping_price_schedule_changes_prices_as_listed(
    pair: tuple[Worker, Worker],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A schedule with rows out of order, a comment and an unknown backend: each
    price changes at its offset from the gateway's start, the unknown backend's row
    is logged and skipped, and with `price_schedule_loop` the schedule starts over
    after its last offset (its period). The admin API shows each price."""
    monkeypatch.setenv("SWITCHYARD_ADMIN_TOKEN", TOKEN)
    caplog.set_level(logging.ERROR, logger="switchyard")
    a, b = pair
    (tmp_path / "prices.csv").write_text(
        "offset_s,backend,usd_per_hour\n"
        "# a spot-price trace\n"
        "1.0,a,0.9\n"
        "0.5,a,0.5\n"
        "0.5,nope,1.0\n"
        "1.0,b,0.02\n"
    )
    fleet = write_fleet(
        tmp_path / "fleet.yaml",
        [
            {"name": "a", "address": a.address, "price_usd_per_hour": 0.1},
            {"name": "b", "address": b.address, "price_usd_per_hour": 0.3},
        ],
        price_schedule="prices.csv",
        price_schedule_loop=True,
    )
    gw = await start_gateway(load_fleet(fleet), fleet)
    try:
        assert gw.admin_address is not None
        async with grpc.aio.insecure_channel(gw.admin_address) as channel:
            admin = admin_pb2_grpc.AdminStub(channel)

            async def prices() -> dict[str, float]:
                return {n: r.price_usd_per_hour for n, r in (await routes(admin)).items()}

            async def a_costs(price: float) -> bool:
                return (await prices())["a"] == price

            # 0.5 s in, then 1.0 s, then (the loop) 1.5 s: a's price goes 0.5, 0.9, 0.5.
            # Sorted by offset: replayed in file order, 0.9 would give way to 0.5 at once.
            for price in (0.5, 0.9, 0.5):
                await wait_until(partial(a_costs, price), what=f"a's price to become {price}")
            # b's one change came with a's at 1.0 s and is never undone by the loop.
            assert (await prices())["b"] == 0.02
            assert "price schedule: unknown backend 'nope' (backends: a, b)" in caplog.text

            # The command line shows what the API does.
            code = await asyncio.to_thread(
                admin_command, gw.admin_address, "--json", "routes", "--model", "digits"
            )
            out, _ = capsys.readouterr()
            assert code == 0
            listed = {r["backend"]: r["price_usd_per_hour"] for r in json.loads(out)["routes"]}
            assert listed["b"] == 0.02 and listed["a"] in (0.5, 0.9)
    finally:
        await gw.stop()


async def test_fleet_file_edits_of_carbon_and_policies_apply_live(
    pair: tuple[Worker, Worker], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repository: Path
) -> None:
    """Editing the fleet file on disk: new carbon figures and new policies show in the
    admin API and decide the next request's route, with no restart. An edit leaves
    alone what it does not change (a price set through the admin API), and replaces
    policies set through the admin API."""
    monkeypatch.setenv("SWITCHYARD_ADMIN_TOKEN", TOKEN)
    a, b = pair

    def write(
        carbon_a: tuple[float, float], carbon_b: tuple[float, float] | None, policies: Any
    ) -> Path:
        backends: list[dict[str, Any]] = [
            {
                "name": "cheap",
                "address": a.address,
                "price_usd_per_hour": 0.01,
                "carbon_g_per_kwh": carbon_a[0],
                "power_w": carbon_a[1],
            },
            {"name": "dear", "address": b.address, "price_usd_per_hour": 0.5},
        ]
        if carbon_b is not None:
            backends[1].update(carbon_g_per_kwh=carbon_b[0], power_w=carbon_b[1])
        return write_fleet(tmp_path / "fleet.yaml", backends, policies)

    cost_policy = {"default": {"latency_ms": 1000, "objective": "cost"}}
    fleet = write((350, 20), None, cost_policy)
    gw = await start_gateway(load_fleet(fleet), fleet)
    inputs, _ = samples(repository, "digits")
    request = raw_request("digits", {"input": inputs["input"][:1]}, {"input": "FP32"})
    try:
        async with gateway_clients(gw) as (stub, admin):

            async def backend_used() -> str:
                reply: pb.ModelInferResponse = await stub.ModelInfer(request)
                return reply.parameters["switchyard_backend"].string_param

            async def policies() -> dict[str, Any]:
                doc = await admin.GetPolicy(apb.GetPolicyRequest(), metadata=AUTH)
                return yaml.safe_load(doc.yaml)  # type: ignore[no-any-return]

            listed = await routes(admin)
            assert carbon_per_usd(listed["cheap"]) == pytest.approx(350 * 20 / 1000 / 0.01)
            assert carbon_per_usd(listed["dear"]) == -1.0
            assert (await policies())["default"]["objective"] == "cost"
            assert await backend_used() == "cheap"

            # The edit: the cheap backend's power is dirty, the dear one's clean, and
            # the policy's objective is carbon.
            carbon_policy = {
                "default": {"latency_ms": 1000, "objective": "carbon", "retries": 1},
                "classes": {"gold": {"latency_ms": 10}},
            }
            write((900, 100), (20, 50), carbon_policy)

            async def carbon_reloaded() -> bool:
                listed = await routes(admin)
                return carbon_per_usd(listed["dear"]) == pytest.approx(20 * 50 / 1000 / 0.5)

            await wait_until(carbon_reloaded, what="the dear backend's carbon from the edit")
            listed = await routes(admin)
            assert carbon_per_usd(listed["cheap"]) == pytest.approx(900 * 100 / 1000 / 0.01)
            await wait_until(
                lambda: policies_are(policies, carbon_policy), what="the edited policies"
            )
            assert [await backend_used() for _ in range(5)] == ["dear"] * 5

            # Set through the admin API: the dear backend's price, and other policies.
            await admin.SetPrice(
                apb.SetPriceRequest(backend="dear", usd_per_hour=0.7), metadata=AUTH
            )
            await admin.SetPolicy(
                apb.PolicyDocument(yaml="default: {latency_ms: 1000, objective: latency}"),
                metadata=AUTH,
            )
            assert (await policies())["default"]["objective"] == "latency"

            # The next edit swaps the carbon figures and leaves prices and policies as
            # they were in the file: the admin API's price and policies stay.
            write((20, 50), (900, 100), carbon_policy)

            async def swapped() -> bool:
                listed = await routes(admin)
                return carbon_per_usd(listed["cheap"]) == pytest.approx(20 * 50 / 1000 / 0.01)

            await wait_until(swapped, what="the cheap backend's carbon from the second edit")
            listed = await routes(admin)
            assert listed["dear"].price_usd_per_hour == 0.7
            assert carbon_per_usd(listed["dear"]) == pytest.approx(900 * 100 / 1000 / 0.7)
            assert (await policies())["default"]["objective"] == "latency"

            # An edit of the file's policies replaces the admin API's: carbon again,
            # and the cheap backend, now the cleaner, takes the requests.
            carbon_policy = {"default": {"latency_ms": 1000, "objective": "carbon", "retries": 0}}
            write((20, 50), (900, 100), carbon_policy)
            await wait_until(
                lambda: policies_are(policies, carbon_policy), what="the file's policies again"
            )
            assert (await policies())["classes"] == {}
            assert [await backend_used() for _ in range(5)] == ["cheap"] * 5
    finally:
        await gw.stop()
