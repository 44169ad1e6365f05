"""What survives a restart of the gateway, seen through the admin API and where
requests go: the admin API's prices, carbon figures, drains, policies and routing rule come back from
the state file; the price schedule resumes at its wall-clock offset; the fleet file's
watcher outlives files it cannot use; NaN and infinity are refused at the admin API and
its command line. Real gateways in process over real workers, started twice on the same
fleet and state file."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from gateway.config import load_fleet
from gateway.server import Gateway, start_gateway
from protos import admin_pb2 as apb
from protos import admin_pb2_grpc
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import Worker, gateway_clients, raw_request, samples
from tests.integration.control.test_live_changes import (
    AUTH,
    TOKEN,
    admin_command,
    routes,
    write_fleet,
)
from tests.waiting import wait_until


@dataclass
class Running:
    gateway: Gateway
    admin: admin_pb2_grpc.AdminStub
    stub: pb_grpc.GRPCInferenceServiceStub
    repository: Path

    async def backend_used(self) -> str:
        inputs, _ = samples(self.repository, "digits")
        request = raw_request("digits", {"input": inputs["input"][:1]}, {"input": "FP32"})
        reply: pb.ModelInferResponse = await self.stub.ModelInfer(request)
        return reply.parameters["switchyard_backend"].string_param

    async def prices(self) -> dict[str, float]:
        return {n: r.price_usd_per_hour for n, r in (await routes(self.admin)).items()}

    async def policies(self) -> dict[str, Any]:
        doc = await self.admin.GetPolicy(apb.GetPolicyRequest(), metadata=AUTH)
        return yaml.safe_load(doc.yaml)  # type: ignore[no-any-return]


@asynccontextmanager
async def running(fleet: Path, repository: Path) -> AsyncIterator[Running]:
    gw = await start_gateway(load_fleet(fleet), fleet)
    try:
        async with gateway_clients(gw) as (stub, admin):
            yield Running(gw, admin, stub, repository)
    finally:
        await gw.stop()


def two_backends(pair: tuple[Worker, Worker], cheap: float, dear: float) -> list[dict[str, Any]]:
    a, b = pair
    return [
        {"name": "cheap", "address": a.address, "price_usd_per_hour": cheap},
        {"name": "dear", "address": b.address, "price_usd_per_hour": dear},
    ]


async def test_admin_changes_are_restored_after_a_restart(
    pair: tuple[Worker, Worker],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    repository: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A price, a drain, policies and the routing rule set through the admin API are
    back after a restart (the fleet file still says otherwise), and requests follow
    them; an undrain is kept too."""
    monkeypatch.setenv("SWITCHYARD_ADMIN_TOKEN", TOKEN)
    caplog.set_level(logging.INFO, logger="switchyard")
    fleet = write_fleet(
        tmp_path / "fleet.yaml",
        two_backends(pair, cheap=0.01, dear=0.5),
        {"default": {"latency_ms": 1000}},
        state_file="state/gateway.json",
    )
    state_file = tmp_path / "state" / "gateway.json"
    policy = {"default": {"latency_ms": 900}, "classes": {"gold": {"latency_ms": 777}}}

    async with running(fleet, repository) as gw:
        assert await gw.backend_used() == "cheap"
        await gw.admin.SetPrice(
            apb.SetPriceRequest(backend="cheap", usd_per_hour=1000.0), metadata=AUTH
        )
        await gw.admin.Drain(apb.DrainRequest(backend="dear"), metadata=AUTH)
        await gw.admin.SetPolicy(apb.PolicyDocument(yaml=yaml.safe_dump(policy)), metadata=AUTH)
        await gw.admin.SetRouting(apb.Routing(name="cheapest-only"), metadata=AUTH)
    assert f"admin API changes kept in state file {state_file}" in caplog.text
    kept = json.loads(state_file.read_text())
    assert kept["drained"] == ["dear"] and kept["routing"] == "cheapest-only"

    async with running(fleet, repository) as gw:
        listed = await routes(gw.admin)
        assert listed["cheap"].price_usd_per_hour == 1000.0
        assert listed["dear"].price_usd_per_hour == 0.5
        assert listed["dear"].status == "drained" and listed["cheap"].status == "ready"
        routing = await gw.admin.GetRouting(apb.GetRoutingRequest(), metadata=AUTH)
        assert routing.name == "cheapest-only"
        got = await gw.policies()
        assert got["classes"] == policy["classes"]
        assert got["default"]["latency_ms"] == 900
        explained = await gw.admin.Explain(
            apb.ExplainRequest(model="digits", sla_class="gold"), metadata=AUTH
        )
        assert explained.sla_ms == 777 and explained.chosen_backend == "cheap"
        assert {r.route.backend: r.why for r in explained.routes}["dear"] == "drained"
        # Drained: dear takes nothing, although it is now the cheaper.
        assert [await gw.backend_used() for _ in range(3)] == ["cheap"] * 3
        await gw.admin.Undrain(apb.DrainRequest(backend="dear"), metadata=AUTH)
        assert [await gw.backend_used() for _ in range(3)] == ["dear"] * 3

    async with running(fleet, repository) as gw:
        # The undrain and the admin price are kept: dear, at 0.5 against cheap's 1000.0
        # (the fleet file's 0.01 would win without them), takes the requests.
        assert (await routes(gw.admin))["dear"].status == "ready"
        assert await gw.prices() == {"cheap": 1000.0, "dear": 0.5}
        assert [await gw.backend_used() for _ in range(3)] == ["dear"] * 3


async def test_a_fleet_file_edit_made_while_down_wins_over_an_older_admin_price(
    pair: tuple[Worker, Worker],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    repository: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The last change wins: a price edited in the fleet file while the gateway was
    down replaces the admin API's older price for that backend (logged); the other
    backend's admin price stays."""
    monkeypatch.setenv("SWITCHYARD_ADMIN_TOKEN", TOKEN)
    caplog.set_level(logging.WARNING, logger="switchyard")
    path = tmp_path / "fleet.yaml"
    fleet = write_fleet(path, two_backends(pair, 0.01, 0.5), state_file="state.json")
    async with running(fleet, repository) as gw:
        for backend, price in (("cheap", 0.3), ("dear", 0.2)):
            await gw.admin.SetPrice(
                apb.SetPriceRequest(backend=backend, usd_per_hour=price), metadata=AUTH
            )
    fleet = write_fleet(path, two_backends(pair, 0.05, 0.5), state_file="state.json")
    async with running(fleet, repository) as gw:
        assert await gw.prices() == {"cheap": 0.05, "dear": 0.2}
        assert "the fleet file changed cheap's price since the admin API set it" in caplog.text
        assert await gw.backend_used() == "cheap"


async def test_carbon_figures_set_through_the_admin_api_are_restored_after_a_restart(
    pair: tuple[Worker, Worker],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    repository: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`switchyard admin set-carbon` on a gateway with a state file: after a restart
    the figures are back (the fleet file still says otherwise), the carbon objective
    routes by them, and `admin backends` shows them. They are kept beside the state
    file, whose content a gateway of the version before carbon figures reads whole."""
    monkeypatch.setenv("SWITCHYARD_ADMIN_TOKEN", TOKEN)
    backends = two_backends(pair, cheap=0.01, dear=0.01)
    backends[0].update(carbon_g_per_kwh=900, power_w=50)
    backends[1].update(carbon_g_per_kwh=100, power_w=50)
    fleet = write_fleet(
        tmp_path / "fleet.yaml",
        backends,
        {"default": {"latency_ms": 1000, "objective": "carbon"}},
        state_file="state.json",
    )
    state_file = tmp_path / "state.json"

    async def carbon(gw: Running) -> dict[str, tuple[float, float]]:
        reply = await gw.admin.ListBackends(apb.ListBackendsRequest(), metadata=AUTH)
        return {b.backend: (b.carbon_g_per_kwh, b.power_w) for b in reply.backends}

    async with running(fleet, repository) as gw:
        assert [await gw.backend_used() for _ in range(3)] == ["dear"] * 3
        target = gw.gateway.admin_address
        assert target is not None
        code = await asyncio.to_thread(admin_command, target, "set-carbon", "cheap", "1")
        out, _ = capsys.readouterr()
        assert code == 0 and "1 gCO2eq/kWh at 50 W" in out, out
        assert [await gw.backend_used() for _ in range(3)] == ["cheap"] * 3
    kept = json.loads(state_file.read_text())
    assert "carbon" not in kept and kept["version"] == 1
    assert json.loads((tmp_path / "state.json.carbon").read_text())["backends"]["cheap"] == {
        "g_per_kwh": 1.0,
        "power_w": 50.0,
        "fleet": {"g_per_kwh": 900.0, "power_w": 50.0},
    }

    async with running(fleet, repository) as gw:
        assert await carbon(gw) == {"cheap": (1.0, 50.0), "dear": (100.0, 50.0)}
        assert [await gw.backend_used() for _ in range(3)] == ["cheap"] * 3
        target = gw.gateway.admin_address
        assert target is not None
        code = await asyncio.to_thread(admin_command, target, "backends")
        out, _ = capsys.readouterr()
        assert code == 0, out
        rows = {
            cells[0]: cells
            for line in out.splitlines()
            if len(cells := [c.strip() for c in re.split("[│┃]", line)[1:-1]]) > 8
        }
        assert rows["backend"][7:9] == ["gCO2/kWh", "W"]
        assert rows["cheap"][7:9] == ["1", "50"] and rows["dear"][7:9] == ["100", "50"]


SCHEDULE = "offset_s,backend,usd_per_hour\n0,cheap,0.1\n3600,cheap,0.9\n7200,cheap,0.05\n"


async def test_the_price_schedule_resumes_at_its_wall_clock_offset(
    pair: tuple[Worker, Worker],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    repository: Path,
) -> None:
    """The schedule's start is kept in the state file: a restart resumes the schedule
    where the clock says it is, not at offset 0. Steps an hour apart, and the kept
    start moved an hour and a minute back between two runs (the gateway was down that
    long): right after the restart the 3600 s step's price applies."""
    monkeypatch.setenv("SWITCHYARD_ADMIN_TOKEN", TOKEN)
    (tmp_path / "prices.csv").write_text(SCHEDULE)
    fleet = write_fleet(
        tmp_path / "fleet.yaml",
        two_backends(pair, cheap=0.3, dear=0.5),
        state_file="state.json",
        price_schedule="prices.csv",
    )
    state_file = tmp_path / "state.json"
    async with running(fleet, repository) as gw:
        await wait_until(lambda: _price_is(gw, "cheap", 0.1), what="the schedule's first price")
        assert await gw.backend_used() == "cheap"
    started = json.loads(state_file.read_text())["schedule_start_s"]
    assert isinstance(started, float)

    async with running(fleet, repository) as gw:
        # Resumed seconds in: still offset 0's price, and the start is the first run's.
        await wait_until(lambda: _price_is(gw, "cheap", 0.1), what="offset 0's price again")
    assert json.loads(state_file.read_text())["schedule_start_s"] == started

    kept = json.loads(state_file.read_text())
    kept["schedule_start_s"] = started - 3660.0
    state_file.write_text(json.dumps(kept))
    async with running(fleet, repository) as gw:
        await wait_until(lambda: _price_is(gw, "cheap", 0.9), what="the 3600 s step's price")
        assert await gw.backend_used() == "dear"
    assert json.loads(state_file.read_text())["schedule_start_s"] == started - 3660.0


async def _price_is(gw: Running, backend: str, price: float) -> bool:
    return (await gw.prices())[backend] == price


async def test_the_fleet_watcher_outlives_files_it_cannot_use(
    pair: tuple[Worker, Worker],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    repository: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bytes that are not UTF-8, YAML that does not parse, a NaN price and a file that
    is gone each leave the running prices alone and are logged once; the next good
    file applies."""
    monkeypatch.setenv("SWITCHYARD_ADMIN_TOKEN", TOKEN)
    caplog.set_level(logging.WARNING, logger="switchyard.control")
    path = tmp_path / "fleet.yaml"
    fleet = write_fleet(path, two_backends(pair, 0.1, 0.3))
    good = path.read_text()

    def logged(text: str) -> int:
        return caplog.text.count(text)

    async with running(fleet, repository) as gw:
        versions = [
            (b"\xff\xfe\x00\x01 not text", "not UTF-8 text"),
            (b"backends: [ {name: cheap, address", "not valid YAML"),
            (
                good.replace("price_usd_per_hour: 0.1", "price_usd_per_hour: .nan").encode(),
                "finite number",
            ),
        ]
        for content, reason in versions:
            path.write_bytes(content)

            def rejected(r: str = reason) -> bool:
                return logged(r) > 0

            await wait_until(rejected, what=f"the watcher to reject: {reason}")
            # The same content again (a touch): not logged again.
            stat = path.stat()
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        path.unlink()
        await wait_until(
            lambda: logged("is gone; keeping the running settings") > 0,
            what="the watcher to see the file gone",
        )
        assert await gw.prices() == {"cheap": 0.1, "dear": 0.3}

        path.write_text(good.replace("price_usd_per_hour: 0.1", "price_usd_per_hour: 0.7"))
        await wait_until(lambda: _price_is(gw, "cheap", 0.7), what="the good file's price")
        assert await gw.backend_used() == "dear"
        for _, reason in versions:
            assert logged(reason) == 1, reason
        assert logged("fleet file changed but is not valid") == len(versions)
        assert logged("is gone") == 1


async def test_nan_and_infinite_prices_are_refused_by_the_admin_api(
    pair: tuple[Worker, Worker],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    repository: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """INVALID_ARGUMENT naming the field, from the API and its command line; nothing
    changes and nothing is kept."""
    monkeypatch.setenv("SWITCHYARD_ADMIN_TOKEN", TOKEN)
    fleet = write_fleet(
        tmp_path / "fleet.yaml", two_backends(pair, 0.1, 0.3), state_file="state.json"
    )
    async with running(fleet, repository) as gw:
        assert gw.gateway.admin_address is not None
        for price in (math.nan, math.inf, -math.inf):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.admin.SetPrice(
                    apb.SetPriceRequest(backend="cheap", usd_per_hour=price), metadata=AUTH
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details() == f"usd_per_hour must be a finite number, not {price}"

            code = await asyncio.to_thread(
                admin_command, gw.gateway.admin_address, "set-price", "cheap", "--", str(price)
            )
            _, err = capsys.readouterr()
            assert code == 1
            assert f"INVALID_ARGUMENT: usd_per_hour must be a finite number, not {price}" in err

            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.admin.Explain(
                    apb.ExplainRequest(model="digits", sla_ms=price), metadata=AUTH
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details() == f"sla_ms must be a finite number, not {price}"

        for value in (".nan", ".inf"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.admin.SetPolicy(
                    apb.PolicyDocument(yaml=f"default: {{latency_ms: {value}}}"), metadata=AUTH
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details = caught.value.details() or ""
            assert "default.latency_ms" in details and "finite number" in details

        assert await gw.prices() == {"cheap": 0.1, "dear": 0.3}
        assert (await gw.policies())["default"]["latency_ms"] == 100
    assert not (tmp_path / "state.json").exists()


async def test_a_corrupt_state_file_is_set_aside_and_the_fleet_file_applies(
    pair: tuple[Worker, Worker],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    repository: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("SWITCHYARD_ADMIN_TOKEN", TOKEN)
    caplog.set_level(logging.ERROR, logger="switchyard")
    state_file = tmp_path / "state.json"
    state_file.write_bytes(b'{"version": 1, "prices": {"cheap": ')
    fleet = write_fleet(
        tmp_path / "fleet.yaml", two_backends(pair, 0.1, 0.3), state_file="state.json"
    )
    async with running(fleet, repository) as gw:
        assert await gw.prices() == {"cheap": 0.1, "dear": 0.3}
        assert "state file not valid, starting from the fleet file" in caplog.text
        assert (tmp_path / "state.json.corrupt").read_bytes().startswith(b'{"version": 1')
        assert not state_file.exists()
        await gw.admin.SetPrice(
            apb.SetPriceRequest(backend="dear", usd_per_hour=0.05), metadata=AUTH
        )
    assert json.loads(state_file.read_text())["prices"]["dear"]["usd_per_hour"] == 0.05
