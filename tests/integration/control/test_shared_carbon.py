"""Carbon figures shared by the gateways of one store, as prices are: `SetCarbon`
through either gateway moves the other's carbon-objective routing; two gateways' figures
for different backends both stand; a write by a gateway that does not know carbon
figures leaves them alone; with the store down a figure stands where it was set (the
call says it is not shared yet) and reaches the other once the store is back; a carbon
feed is polled by the lease holder alone and its figures reach both. Real gateways in
process over real workers and a real redis-server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from gateway.control.admin_token import NOT_SHARED
from gateway.control.redis_server import RedisServer
from gateway.control.shared_state import KEY, LEASE_PREFIX
from gateway.control.state import (
    CarbonFigures,
    ControlState,
    StateError,
    decode_carbon,
    decode_state,
    encode_carbon,
    encode_state,
)
from protos import admin_pb2 as apb
from tests.integration.conftest import Worker
from tests.integration.control.group import GENEROUS_S, Member, member, timed
from tests.integration.control.test_feeds import backend_used, feed_metric, fleet, running
from tests.waiting import wait_until

TOKEN = "shared-carbon-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
CARBON_POLICY = yaml.safe_dump({"default": {"latency_ms": 1000, "objective": "carbon"}})


@pytest.fixture(autouse=True)
def token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHYARD_ADMIN_TOKEN", TOKEN)


def carbon(gw: Member, backend: str) -> tuple[float | None, float | None]:
    state = gw.gateway.fleet.backends[backend]
    return state.carbon_g_per_kwh, state.power_w


def stored(server: RedisServer) -> dict[str, str]:
    client = server.client()
    try:
        fields = client.hgetall(KEY)
    finally:
        client.close()
    assert isinstance(fields, dict) and fields, "nothing stored"
    return fields


def set_carbon(backend: str, g_per_kwh: float, power_w: float = 0) -> apb.SetCarbonRequest:
    return apb.SetCarbonRequest(backend=backend, g_per_kwh=g_per_kwh, power_w=power_w)


async def test_set_carbon_through_one_gateway_moves_the_others_routing(
    pair: tuple[Worker, Worker], redis_server: RedisServer, repository: Path
) -> None:
    async with member(pair, redis_server.url) as one, member(pair, redis_server.url) as two:
        await one.admin.SetPolicy(apb.PolicyDocument(yaml=CARBON_POLICY), metadata=AUTH)
        await timed(
            "the carbon objective on the other gateway",
            lambda: two.gateway.control.policies.settings.default.objective == "carbon",
        )
        # Through each gateway at once, for different backends: both stand on both.
        dirty = one.admin.SetCarbon(set_carbon("cheap", 900, 50), metadata=AUTH)
        clean = two.admin.SetCarbon(set_carbon("dear", 10, 50), metadata=AUTH)
        assert (await dirty).carbon_g_per_kwh == 900 and (await clean).carbon_g_per_kwh == 10
        for gw in (one, two):
            await timed(
                "both figures on each gateway",
                lambda gw=gw: carbon(gw, "cheap") == (900, 50) and carbon(gw, "dear") == (10, 50),
            )
        assert await two.infer(repository) == "dear"
        assert await one.infer(repository) == "dear"

        # The other way round, with the power the gateway taking the call knows.
        reply = await two.admin.SetCarbon(set_carbon("cheap", 1), metadata=AUTH)
        assert (reply.carbon_g_per_kwh, reply.power_w) == (1, 50)
        await timed("the new intensity on the first gateway", lambda: carbon(one, "cheap")[0] == 1)
        assert carbon(one, "cheap") == (1, 50)
        assert await one.infer(repository) == "cheap"
        figures = decode_carbon(stored(redis_server)["carbon"], "store")
        assert figures == {"cheap": CarbonFigures(1, 50), "dear": CarbonFigures(10, 50)}

        # A gateway of a version that knows no carbon figures writes the state field
        # alone (here: a drain): the figures stay, in the store and in force.
        fields = stored(redis_server)
        state = decode_state(fields["state"], "store").with_drained("dear", True)
        client = redis_server.client()
        try:
            client.hset(
                KEY, mapping={"state": encode_state(state), "version": int(fields["version"]) + 1}
            )
        finally:
            client.close()
        await timed(
            "the older writer's drain on both", lambda: one.drained("dear") and two.drained("dear")
        )
        assert carbon(one, "dear") == carbon(two, "dear") == (10, 50)
        assert carbon(one, "cheap") == carbon(two, "cheap") == (1, 50)
        assert decode_carbon(stored(redis_server)["carbon"], "store") == figures


async def test_with_the_store_down_set_carbon_stands_here_and_is_shared_once_back(
    pair: tuple[Worker, Worker], redis_server: RedisServer
) -> None:
    async with member(pair, redis_server.url) as one, member(pair, redis_server.url) as two:
        await one.admin.SetCarbon(set_carbon("cheap", 300, 40), metadata=AUTH)
        await timed("the figure before the outage", lambda: carbon(two, "cheap") == (300, 40))

        redis_server.stop()
        await timed("both gauges at 0", lambda: one.store_up() == 0 and two.store_up() == 0)
        call = one.admin.SetCarbon(set_carbon("dear", 20, 60), metadata=AUTH)
        reply = await call
        assert (reply.carbon_g_per_kwh, reply.power_w) == (20, 60)
        trailing = dict(await call.trailing_metadata())
        assert "not shared yet" in trailing[NOT_SHARED], trailing
        assert carbon(one, "dear") == (20, 60)
        assert carbon(two, "dear") == (None, None)

        # Back, empty: what each knew is written again, the outage's figure included.
        redis_server.start()
        await timed(
            "the outage's figure on the other gateway", lambda: carbon(two, "dear") == (20, 60)
        )
        assert carbon(two, "cheap") == (300, 40)
        await timed("both gauges at 1", lambda: one.store_up() == 1 and two.store_up() == 1)
        figures = decode_carbon(stored(redis_server)["carbon"], "store")
        assert figures == {"cheap": CarbonFigures(300, 40), "dear": CarbonFigures(20, 60)}


async def test_a_carbon_feed_is_polled_by_one_gateway_and_its_figures_reach_both(
    pair: tuple[Worker, Worker], redis_server: RedisServer, repository: Path, tmp_path: Path
) -> None:
    grid = tmp_path / "grid.json"

    def intensities(de: float, fr: float) -> None:
        body = [{"zone": "DE", "carbonIntensity": de}, {"zone": "FR", "carbonIntensity": fr}]
        grid.write_text(json.dumps(body))

    intensities(900, 30)
    feed = {
        "name": "grid",
        "kind": "electricity-maps",
        "file": str(grid),
        "interval_s": 0.5,
        "selectors": [{"backends": ["a"], "zone": "DE"}, {"backends": ["b"], "zone": "FR"}],
    }
    config = fleet(
        pair,
        [feed],
        backends={
            "a": {"carbon_g_per_kwh": 400, "power_w": 50},
            "b": {"carbon_g_per_kwh": 400, "power_w": 50},
        },
        state=redis_server.url,
        admin="127.0.0.1:0",
    )
    config = config.model_copy(
        update={"policies": config.policies.model_validate(yaml.safe_load(CARBON_POLICY))}
    )
    client = redis_server.client()
    try:
        async with running(config) as one, running(config) as two:
            for gw in (one, two):
                await wait_until(
                    lambda gw=gw: gw.fleet.backends["a"].carbon_g_per_kwh == 900,  # type: ignore[misc]
                    GENEROUS_S,
                    "the feed's intensity on each gateway",
                )
            # The lease holder alone polls and reports the feed.
            assert client.get(LEASE_PREFIX + "feed:grid") is not None
            reporting = [gw for gw in (one, two) if feed_metric(gw, "up", "grid") is not None]
            assert len(reporting) == 1
            other = two if reporting[0] is one else one
            assert await backend_used(other, repository) == "b"

            intensities(20, 700)
            for gw in (one, two):
                await wait_until(
                    lambda gw=gw: gw.fleet.backends["a"].carbon_g_per_kwh == 20,  # type: ignore[misc]
                    GENEROUS_S,
                    "the grids' change on each gateway",
                )
            assert other.fleet.backends["b"].carbon_g_per_kwh == 700
            assert other.fleet.backends["b"].power_w == 50
            assert await backend_used(other, repository) == "a"
    finally:
        client.close()


def test_carbon_figures_keep_a_format_of_their_own() -> None:
    state = ControlState(carbon={"a": CarbonFigures(120.5, 40), "b": CarbonFigures(None, 10)})
    assert decode_carbon(encode_carbon(state), "x") == state.carbon
    # Written by a gateway that knows none: no figures.
    assert decode_carbon(None, "x") == {}
    # The state's own JSON does not hold them (an older reader would refuse it).
    assert "carbon" not in json.loads(encode_state(state))
    for bad, words in (
        ('{"version": 2, "backends": {}}', "format version 2"),
        ('{"version": 1, "backends": {"a": {"g_per_kwh": -1, "power_w": 1}}}', "g_per_kwh"),
        ('{"version": 1, "backends": {"a": {"g_per_kwh": NaN, "power_w": 1}}}', "NaN"),
        ("[]", "format version None"),
    ):
        with pytest.raises(StateError, match=words):
            decode_carbon(bad, "the store")
