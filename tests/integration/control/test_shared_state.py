"""Several gateways that route as one over a shared store (`gateway.state: unix://...`):
a change made through one gateway's admin API is in force on the other; two gateways'
changes of different values both stand; an announcement that never came is made up
by the resync; a store that goes away leaves both serving (gauge 0), a change made
meanwhile stands where it was made and reaches the other once the store is back, even
empty; only one gateway plays the price schedule, and the other takes it over when
the first stops. Real gateways in process over real workers and a real redis-server."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml

from gateway.control.admin_client import AdminClient
from gateway.control.admin_token import NOT_SHARED
from gateway.control.redis_server import RedisServer
from gateway.control.shared_state import KEY, LEASE_PREFIX
from gateway.control.state import decode_state, encode_state
from protos import admin_pb2 as apb
from tests.integration.conftest import Worker
from tests.integration.control.group import GENEROUS_S, member, stored_state, timed
from tests.waiting import wait_until

TOKEN = "shared-state-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(autouse=True)
def token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHYARD_ADMIN_TOKEN", TOKEN)


async def test_changes_through_one_gateway_are_in_force_on_the_other(
    pair: tuple[Worker, Worker], redis_server: RedisServer, repository: Path
) -> None:
    async with member(pair, redis_server.url) as one, member(pair, redis_server.url) as two:
        assert one.store_up() == 1 and two.store_up() == 1
        await one.admin.SetPrice(
            apb.SetPriceRequest(backend="cheap", usd_per_hour=5.0), metadata=AUTH
        )
        await timed("the price on the other gateway", lambda: two.price("cheap") == 5.0)
        assert await two.infer(repository) == "dear"

        await one.admin.Drain(apb.DrainRequest(backend="dear"), metadata=AUTH)
        await timed("the drain on the other gateway", lambda: two.drained("dear"))
        assert await two.infer(repository) == "cheap"
        # The other way round: an undrain through the second gateway reaches the first.
        await two.admin.Undrain(apb.DrainRequest(backend="dear"), metadata=AUTH)
        await timed("the undrain on the first gateway", lambda: not one.drained("dear"))

        policy = {"default": {"latency_ms": 900}, "classes": {"gold": {"latency_ms": 777}}}
        await one.admin.SetPolicy(apb.PolicyDocument(yaml=yaml.safe_dump(policy)), metadata=AUTH)
        await timed(
            "the policies on the other gateway",
            lambda: two.gateway.control.policies.settings.classes.get("gold") is not None,
        )
        doc = await two.admin.GetPolicy(apb.GetPolicyRequest(), metadata=AUTH)
        assert yaml.safe_load(doc.yaml)["classes"]["gold"]["latency_ms"] == 777

        await one.admin.SetRouting(apb.Routing(name="cheapest-only"), metadata=AUTH)
        await timed(
            "the routing rule on the other gateway",
            lambda: two.gateway.control.routing == "cheapest-only",
        )
        reply = await two.admin.GetRouting(apb.GetRoutingRequest(), metadata=AUTH)
        assert reply.name == "cheapest-only"


async def test_two_gateways_changes_of_different_values_both_stand(
    pair: tuple[Worker, Worker], redis_server: RedisServer
) -> None:
    """Each change is a read-modify-write of its own value: a price set through one
    gateway and a drain through the other, at once, are both kept and in force on both."""
    async with member(pair, redis_server.url) as one, member(pair, redis_server.url) as two:
        price = one.admin.SetPrice(
            apb.SetPriceRequest(backend="cheap", usd_per_hour=3.0), metadata=AUTH
        )
        drain = two.admin.Drain(apb.DrainRequest(backend="dear"), metadata=AUTH)
        await price
        await drain
        for gw in (one, two):
            await timed(
                "both changes on each gateway",
                lambda gw=gw: gw.price("cheap") == 3.0 and gw.drained("dear"),
            )
        stored = stored_state(redis_server)
        assert stored.prices["cheap"].usd_per_hour == 3.0 and stored.drained == {"dear"}


async def test_a_lost_announcement_is_made_up_by_the_resync(
    pair: tuple[Worker, Worker], redis_server: RedisServer
) -> None:
    """A write whose announcement never came (made here without PUBLISH) is in force on
    both gateways all the same: each reads the version every resync."""
    async with member(pair, redis_server.url) as one, member(pair, redis_server.url) as two:
        await one.admin.SetPrice(
            apb.SetPriceRequest(backend="cheap", usd_per_hour=2.0), metadata=AUTH
        )
        await timed("the announced price", lambda: two.price("cheap") == 2.0)
        client = aioredis.Redis(unix_socket_path=str(redis_server.socket), decode_responses=True)
        try:
            fields = await client.hgetall(KEY)  # type: ignore[misc]
            state = decode_state(fields["state"], "store")
            state = state.with_drained("cheap", True)
            await client.hset(  # type: ignore[misc]
                KEY,
                mapping={"state": encode_state(state), "version": int(fields["version"]) + 1},
            )
        finally:
            await client.aclose()
        await timed(
            "the unannounced drain on both gateways",
            lambda: one.drained("cheap") and two.drained("cheap"),
        )


async def test_a_store_that_goes_away_leaves_both_serving_and_reconciles_when_back(
    pair: tuple[Worker, Worker],
    redis_server: RedisServer,
    repository: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="switchyard")
    async with member(pair, redis_server.url) as one, member(pair, redis_server.url) as two:
        await two.admin.Drain(apb.DrainRequest(backend="dear"), metadata=AUTH)
        await timed("the drain before the outage", lambda: one.drained("dear"))

        redis_server.stop()
        await timed("both gauges at 0", lambda: one.store_up() == 0 and two.store_up() == 0)
        assert "unreachable, serving on the last known state" in caplog.text
        # Readiness and serving are unaffected, on the state each knew.
        assert await one.infer(repository) == "cheap"
        assert await two.infer(repository) == "cheap"
        call = one.admin.SetPrice(
            apb.SetPriceRequest(backend="cheap", usd_per_hour=7.0), metadata=AUTH
        )
        await call
        trailing = dict(await call.trailing_metadata())
        assert "not shared yet" in trailing[NOT_SHARED], trailing
        assert one.price("cheap") == 7.0
        assert two.price("cheap") == 0.04
        # `switchyard admin`'s client says so too (it prints it as a warning).
        assert one.gateway.admin_address is not None
        async with AdminClient(one.gateway.admin_address, TOKEN) as client:
            await client.call("Undrain", apb.DrainRequest(backend="dear"))
            assert client.not_shared is not None and "not shared yet" in client.not_shared
            await client.call("Drain", apb.DrainRequest(backend="dear"))

        # Back, empty (nothing kept on disk): what each knew is written again, and the
        # change made during the outage reaches the other gateway.
        redis_server.start()
        await timed("the outage's change on the other gateway", lambda: two.price("cheap") == 7.0)
        await timed("both gauges at 1", lambda: one.store_up() == 1 and two.store_up() == 1)
        assert one.drained("dear") and two.drained("dear")
        assert "reachable: control state shared" in caplog.text
        stored = stored_state(redis_server)
        assert stored.prices["cheap"].usd_per_hour == 7.0 and stored.drained == {"dear"}


async def test_one_gateway_plays_the_price_schedule_and_the_other_takes_over(
    pair: tuple[Worker, Worker],
    redis_server: RedisServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="switchyard")
    schedule = tmp_path / "prices.csv"
    schedule.write_text(
        # A second a step: each price stands long enough to be seen on a busy machine.
        "offset_s,backend,usd_per_hour\n0,cheap,1.0\n1,cheap,2.0\n2,cheap,3.0\n3,dear,0.08\n"
    )
    settings: dict[str, Any] = {"price_schedule": str(schedule), "price_schedule_loop": True}
    lease_key = LEASE_PREFIX + "price-schedule"
    client = redis_server.client()
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(member(pair, redis_server.url, **settings))
        await wait_until(lambda: client.get(lease_key) is not None, GENEROUS_S, "the lease taken")
        first_owner = client.get(lease_key)
        async with member(pair, redis_server.url, **settings) as two:
            # The schedule's prices reach the gateway that does not play it.
            await timed("a scheduled price on the other gateway", lambda: two.price("cheap") == 2.0)
            await timed("the next one", lambda: two.price("cheap") == 3.0)
            assert client.get(lease_key) == first_owner
            played = [r for r in caplog.records if "taken by" in r.getMessage()]
            assert len(played) == 1, [r.getMessage() for r in played]

            await stack.aclose()  # the first gateway stops and lets the lease go
            await wait_until(
                lambda: client.get(lease_key) not in (None, first_owner),
                GENEROUS_S,
                "the other gateway taking the lease",
            )
            caplog.clear()
            await timed(
                "the schedule played by the other gateway",
                lambda: any("(price schedule)" in r.getMessage() for r in caplog.records),
            )
    client.close()
