"""Live price and carbon feeds in a running gateway: recorded answers of each format
served by a local HTTP server (127.0.0.1, port 0, in a thread), two real workers, and
where the next request goes. A spot price change reaches routing within one poll
interval plus 1 s; a stale feed falls back to the list price; a malformed answer keeps
the last good prices and says why; a carbon feed moves a carbon-objective policy; with a
shared store only the lease holder polls and every gateway gets its prices."""

from __future__ import annotations

import http.server
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest

from gateway.config import FleetConfig
from gateway.control.redis_server import RedisServer
from gateway.server import Gateway, start_gateway
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import Worker, raw_request, samples
from tests.waiting import wait_until

FIXTURES = Path(__file__).parents[2] / "fixtures" / "feeds"
INTERVAL_S = 0.5


class FeedServer:
    """Answers GET PATH with what the test put at PATH (status, body); `?pageToken=T`
    asks for PATH#T. Keeps each request's path and headers."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, bytes]] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                token = parse_qs(parts.query).get("pageToken", [""])[0]
                key = parts.path + (f"#{token}" if token else "")
                server.requests.append((key, dict(self.headers)))
                status, body = server.answers.get(key, (404, b"not found"))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def serve(self, path: str, body: bytes | dict[str, Any], status: int = 200) -> None:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        self.answers[path] = (status, data)

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()


@pytest.fixture
def feeds() -> Iterator[FeedServer]:
    server = FeedServer()
    yield server
    server.stop()


def spot(prices: dict[str, float]) -> dict[str, Any]:
    """A DescribeSpotPriceHistory answer whose every price took effect a minute ago."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - 60))
    return {
        "SpotPriceHistory": [
            {
                "AvailabilityZone": "us-east-1a",
                "InstanceType": instance_type,
                "ProductDescription": "Linux/UNIX",
                "SpotPrice": f"{price:.6f}",
                "Timestamp": stamp,
            }
            for instance_type, price in prices.items()
        ],
        "NextToken": "",
    }


def fleet(
    pair: tuple[Worker, Worker],
    feeds: list[dict[str, Any]],
    backends: dict[str, dict[str, Any]] | None = None,
    **gateway: object,
) -> FleetConfig:
    a, b = pair
    extra = backends or {}
    return FleetConfig.model_validate(
        {
            "gateway": {
                "listen": "127.0.0.1:0",
                "metrics": "127.0.0.1:0",
                "http": None,
                "probe_interval_s": 0.2,
                "latency_probe_interval_s": 0,
                "warmup_samples": 0,
                **gateway,
            },
            "backends": [
                {
                    "name": "a",
                    "address": a.address,
                    "price_usd_per_hour": 0.10,
                    **extra.get("a", {}),
                },
                {
                    "name": "b",
                    "address": b.address,
                    "price_usd_per_hour": 0.30,
                    **extra.get("b", {}),
                },
            ],
            "policies": {"default": {"latency_ms": 1000, "on_infeasible": "fastest"}},
            "feeds": feeds,
        }
    )


def spot_feed(url: str, **settings: object) -> dict[str, Any]:
    return {
        "name": "spot",
        "kind": "aws-spot",
        "url": url,
        "interval_s": INTERVAL_S,
        "stale_after_s": 2.0,
        "timeout_s": 2.0,
        "selectors": [
            {"backends": ["a"], "instance_type": "m7i.large"},
            {"backends": ["b"], "instance_type": "c7i.large"},
        ],
        **settings,
    }


@asynccontextmanager
async def running(config: FleetConfig) -> AsyncIterator[Gateway]:
    gw = await start_gateway(config)
    try:
        yield gw
    finally:
        await gw.stop()


def price(gw: Gateway, backend: str) -> float:
    return gw.fleet.backends[backend].price_usd_per_hour


def feed_metric(gw: Gateway, name: str, feed: str = "spot") -> float | None:
    return gw.registry.get_sample_value(f"switchyard_feed_{name}", {"feed": feed})


async def backend_used(gw: Gateway, repository: Path) -> str:
    inputs, _ = samples(repository, "digits")
    request = raw_request("digits", {"input": inputs["input"][:1]}, {"input": "FP32"})
    async with grpc.aio.insecure_channel(gw.address) as channel:
        reply: pb.ModelInferResponse = await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, timeout=10
        )
    return reply.parameters["switchyard_backend"].string_param


async def test_a_spot_price_change_moves_traffic_within_one_interval_plus_1_s(
    pair: tuple[Worker, Worker], feeds: FeedServer, repository: Path, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    feeds.serve("/spot", spot({"m7i.large": 0.12, "c7i.large": 0.20}))
    config = fleet(pair, [spot_feed(feeds.url("/spot"), auth_token_file=str(token))])
    async with running(config) as gw:
        await wait_until(lambda: price(gw, "a") == 0.12, what="a's first spot price")
        assert price(gw, "b") == 0.20
        assert feed_metric(gw, "up") == 1 and feed_metric(gw, "stale") == 0
        stamp = feed_metric(gw, "last_success_timestamp_seconds")
        assert stamp is not None and abs(stamp - time.time()) < 60
        assert feeds.requests[0][1]["Authorization"] == "Bearer s3cret"
        assert await backend_used(gw, repository) == "a"

        # a's spot price jumps past b's list: routing has it within one interval + 1 s.
        feeds.serve("/spot", spot({"m7i.large": 0.90, "c7i.large": 0.20}))
        changed = time.perf_counter()
        await wait_until(
            lambda: price(gw, "a") == 0.90,
            timeout_s=INTERVAL_S + 1.0,
            what="a's new spot price in the fleet the router reads",
        )
        print(f"spot change in force after {(time.perf_counter() - changed) * 1000:.0f} ms")
        assert await backend_used(gw, repository) == "b"
        sample = gw.registry.get_sample_value(
            "switchyard_backend_price_usd_per_hour", {"backend": "a"}
        )
        assert sample == 0.90


async def test_a_stale_feed_falls_back_to_the_list_price_and_comes_back(
    pair: tuple[Worker, Worker],
    feeds: FeedServer,
    repository: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="switchyard")
    feeds.serve("/spot", spot({"m7i.large": 0.50, "c7i.large": 0.20}))
    async with running(fleet(pair, [spot_feed(feeds.url("/spot"))])) as gw:
        await wait_until(lambda: price(gw, "a") == 0.50, what="a's spot price")
        assert await backend_used(gw, repository) == "b"
        feeds.serve("/spot", b"upstream unavailable", status=503)
        await wait_until(lambda: feed_metric(gw, "up") == 0, what="the failed poll's gauge")
        assert price(gw, "a") == 0.50  # kept until stale
        await wait_until(lambda: feed_metric(gw, "stale") == 1, what="the feed to go stale")
        assert (price(gw, "a"), price(gw, "b")) == (0.10, 0.30)  # the fleet file's
        assert await backend_used(gw, repository) == "a"
        assert "keeps the last good prices: HTTP 503 Service Unavailable from" in caplog.text
        assert "feed spot is stale" in caplog.text
        assert "a, b fall back to their list prices" in caplog.text
        feeds.serve("/spot", spot({"m7i.large": 0.50, "c7i.large": 0.20}))
        await wait_until(lambda: feed_metric(gw, "stale") == 0, what="the feed to be good again")
        assert (price(gw, "a"), price(gw, "b")) == (0.50, 0.20)


async def test_a_malformed_answer_keeps_the_last_good_prices_and_says_why(
    pair: tuple[Worker, Worker], feeds: FeedServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="switchyard")
    feeds.serve("/spot", spot({"m7i.large": 0.05, "c7i.large": 0.07}))
    async with running(fleet(pair, [spot_feed(feeds.url("/spot"), stale_after_s=60)])) as gw:
        await wait_until(lambda: price(gw, "b") == 0.07, what="b's spot price")
        polls = len(feeds.requests)
        feeds.serve("/spot", b'{"SpotPriceHistory": [{"InstanceType": "m7i.large"')
        await wait_until(lambda: feed_metric(gw, "up") == 0, what="the malformed poll's gauge")
        await wait_until(lambda: len(feeds.requests) >= polls + 3, what="more polls")
        assert (price(gw, "a"), price(gw, "b")) == (0.05, 0.07)
        assert feed_metric(gw, "stale") == 0
        lines = [r.getMessage() for r in caplog.records if "keeps the last good" in r.getMessage()]
        assert len(lines) == 1, lines  # once, however many polls fail the same way
        assert (
            f"feed spot (http://127.0.0.1:{feeds.port}/spot) keeps the last good prices: not valid JSON"
            in lines[0]
        )


@pytest.mark.parametrize(
    ("kind", "paths", "selector", "expected"),
    [
        (
            "aws-spot",
            ["aws-spot-history.json"],
            {"instance_type": "g5.xlarge", "availability_zone": "us-east-1a"},
            0.4521,
        ),
        (
            "gcp-billing",
            ["gcp-skus-page1.json", "gcp-skus-page2.json"],
            {"sku_id": "4D19-A3B5-77E0"},
            11.0609,
        ),
        ("schedule", ["schedule.csv"], {"key": "gpu"}, 3.10),
        ("schedule", ["schedule.jsonl"], {"key": "cpu", "multiplier": 2}, 0.08),
    ],
)
async def test_each_recorded_format_prices_a_backend(
    pair: tuple[Worker, Worker],
    feeds: FeedServer,
    kind: str,
    paths: list[str],
    selector: dict[str, Any],
    expected: float,
) -> None:
    feeds.serve("/feed", (FIXTURES / paths[0]).read_bytes())
    if len(paths) > 1:  # the second page, asked for with the first's nextPageToken
        feeds.serve("/feed#CiA2RjgxLTU4NDQtNDU2QQ", (FIXTURES / paths[1]).read_bytes())
    feed = {
        "name": "recorded",
        "kind": kind,
        "url": feeds.url("/feed"),
        "interval_s": INTERVAL_S,
        "selectors": [{"backends": ["a"], **selector}],
    }
    async with running(fleet(pair, [feed])) as gw:
        await wait_until(
            lambda: price(gw, "a") == pytest.approx(expected), what=f"a's price from {kind}"
        )
        assert feed_metric(gw, "up", "recorded") == 1
        assert price(gw, "b") == 0.30  # not covered


async def test_a_carbon_feed_moves_a_carbon_objective(
    pair: tuple[Worker, Worker], feeds: FeedServer, repository: Path, tmp_path: Path
) -> None:
    grid = tmp_path / "grid.json"

    def intensities(de: float, fr: float) -> None:
        grid.write_text(
            json.dumps(
                [{"zone": "DE", "carbonIntensity": de}, {"zone": "FR", "carbonIntensity": fr}]
            )
        )

    intensities(900, 30)
    config = fleet(
        pair,
        [
            {
                "name": "grid",
                "kind": "electricity-maps",
                "file": str(grid),
                "interval_s": INTERVAL_S,
                "selectors": [{"backends": ["a"], "zone": "DE"}, {"backends": ["b"], "zone": "FR"}],
            }
        ],
        backends={
            "a": {"carbon_g_per_kwh": 400, "power_w": 50},
            "b": {"carbon_g_per_kwh": 400, "power_w": 50},
        },
    )
    config = config.model_copy(
        update={
            "policies": config.policies.model_validate(
                {"default": {"latency_ms": 1000, "objective": "carbon"}}
            )
        }
    )
    async with running(config) as gw:
        await wait_until(
            lambda: gw.fleet.backends["a"].carbon_g_per_kwh == 900, what="a's grid intensity"
        )
        assert gw.fleet.backends["b"].carbon_g_per_kwh == 30
        assert await backend_used(gw, repository) == "b"  # the dearer, cleaner one
        intensities(20, 700)
        await wait_until(
            lambda: gw.fleet.backends["a"].carbon_g_per_kwh == 20, what="the grids' change"
        )
        assert await backend_used(gw, repository) == "a"
        assert feed_metric(gw, "up", "grid") == 1


async def test_with_a_shared_store_one_gateway_polls_and_both_get_its_prices(
    pair: tuple[Worker, Worker], feeds: FeedServer, redis_server: RedisServer
) -> None:
    feeds.serve("/spot", spot({"m7i.large": 0.44, "c7i.large": 0.22}))
    config = fleet(pair, [spot_feed(feeds.url("/spot"))], state=redis_server.url)
    async with running(config) as one, running(config) as two:
        for gw in (one, two):

            def fed(gw: Gateway = gw) -> bool:
                return price(gw, "a") == 0.44

            await wait_until(fed, what="the feed's price")
        # The lease holder alone polls and reports the feed.
        reporting = [gw for gw in (one, two) if feed_metric(gw, "up") is not None]
        assert len(reporting) == 1
        feeds.serve("/spot", spot({"m7i.large": 0.66, "c7i.large": 0.22}))
        for gw in (one, two):

            def changed(gw: Gateway = gw) -> bool:
                return price(gw, "a") == 0.66

            await wait_until(changed, what="the shared change")
