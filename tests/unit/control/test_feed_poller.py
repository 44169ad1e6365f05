"""The feed poller with its time injected: figures applied when they change, a failed
poll keeping the last good ones (the metric and one log line per reason), backoff, and
the fall back to list figures once the feed is stale. The fetch and the target are
fakes of the real interfaces; the metrics are real, on a registry of the test's own."""

from __future__ import annotations

import json
import logging

import pytest
from prometheus_client import CollectorRegistry

from gateway.config import FeedSelector, FeedSettings
from gateway.control.feeds.formats import FeedError
from gateway.control.feeds.poller import FeedPoller
from gateway.serving.metrics import GatewayMetrics

NOW_S = 1_714_564_800.0  # 2024-05-01T12:00:00Z


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


class Target:
    """A FeedTarget that records what it was told; `list_prices` stand for the fleet
    file's."""

    def __init__(self, backends: dict[str, str]) -> None:
        self.backends = backends
        """name -> hardware class"""
        self.applied: list[tuple[str, float | None, str]] = []

    def covered(self, selector: FeedSelector) -> list[str]:
        return [n for n, hw in self.backends.items() if selector.covers(n, hw)]

    def apply(self, backend: str, value: float | None, source: str) -> None:
        self.applied.append((backend, value, source))


class Answers:
    """A fetch that returns (or raises) what the test put next."""

    def __init__(self) -> None:
        self.next: bytes | FeedError = b""
        self.calls: list[str | None] = []

    async def __call__(self, feed: FeedSettings, page_token: str | None) -> bytes:
        self.calls.append(page_token)
        if isinstance(self.next, FeedError):
            raise self.next
        return self.next


def spot(*prices: tuple[str, float, float]) -> bytes:
    """A DescribeSpotPriceHistory answer: (instance type, price, seconds before NOW_S)."""
    return json.dumps(
        {
            "SpotPriceHistory": [
                {
                    "InstanceType": kind,
                    "AvailabilityZone": "us-east-1a",
                    "ProductDescription": "Linux/UNIX",
                    "SpotPrice": f"{price:.6f}",
                    "Timestamp": NOW_S - ago_s,
                }
                for kind, price, ago_s in prices
            ]
        }
    ).encode()


def feed(**overrides: object) -> FeedSettings:
    return FeedSettings.model_validate(
        {
            "name": "spot",
            "kind": "aws-spot",
            "url": "http://127.0.0.1:9/spot?key=secret",
            "interval_s": 10,
            "stale_after_s": 60,
            "selectors": [
                {"backends": ["gpu"], "instance_type": "g5.xlarge"},
                {"hardware_class": "cpu-4c", "instance_type": "c7i.xlarge", "multiplier": 0.5},
            ],
            **overrides,
        }
    )


def sample(registry: CollectorRegistry, name: str) -> float | None:
    return registry.get_sample_value(name, {"feed": "spot"})


Rig = tuple[FeedPoller, Target, Answers, Clock, CollectorRegistry]


@pytest.fixture
def rig() -> Rig:
    registry = CollectorRegistry()
    clock = Clock()
    target = Target({"gpu": "gpu-a10g", "c1": "cpu-4c", "c2": "cpu-4c", "other": "cpu-2c"})
    answers = Answers()
    poller = FeedPoller(
        feed(),
        target,
        GatewayMetrics(registry),
        clock=clock,
        wall_clock=lambda: NOW_S,
        fetch=answers,
    )
    return poller, target, answers, clock, registry


async def test_a_good_poll_applies_each_backends_figure_once(rig: Rig) -> None:
    poller, target, answers, clock, registry = rig
    answers.next = spot(
        ("g5.xlarge", 0.40, 300), ("c7i.xlarge", 0.18, 60), ("g5.xlarge", 0.99, -60)
    )
    assert await poller.poll()
    # The future entry is not in force; the hardware class covers c1 and c2, at half.
    # pytest.approx stands for a float: mypy sees no overlap in the tuples.
    assert sorted(target.applied) == [  # type: ignore[comparison-overlap]
        ("c1", pytest.approx(0.09), "feed spot"),
        ("c2", pytest.approx(0.09), "feed spot"),
        ("gpu", pytest.approx(0.40), "feed spot"),
    ]
    assert sample(registry, "switchyard_feed_up") == 1
    assert sample(registry, "switchyard_feed_last_success_timestamp_seconds") == NOW_S
    assert sample(registry, "switchyard_feed_stale") == 0
    # The same answer again: nothing changed, nothing applied (an admin price stands).
    target.applied.clear()
    clock.now_s += 10
    assert await poller.poll()
    assert target.applied == []
    # The GPU's price changes: only it is applied.
    answers.next = spot(("g5.xlarge", 0.55, 5), ("c7i.xlarge", 0.18, 60))
    assert await poller.poll()
    assert target.applied == [("gpu", pytest.approx(0.55), "feed spot")]  # type: ignore[comparison-overlap]


async def test_a_malformed_answer_keeps_the_last_good_figures_and_says_why(
    rig: Rig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    poller, target, answers, _, registry = rig
    caplog.set_level(logging.INFO, logger="switchyard")
    answers.next = spot(("g5.xlarge", 0.40, 300), ("c7i.xlarge", 0.18, 60))
    assert await poller.poll()
    target.applied.clear()
    answers.next = b'{"SpotPriceHistory": "throttled"}'
    for _ in range(3):
        assert not await poller.poll()
    assert target.applied == []
    assert sample(registry, "switchyard_feed_up") == 0
    lines = [r.getMessage() for r in caplog.records if "keeps the last good" in r.getMessage()]
    # Once per reason, with the URL but not its query (an API key may be there).
    assert lines == [
        "feed spot (http://127.0.0.1:9/spot) keeps the last good prices: "
        "SpotPriceHistory missing or not a list (DescribeSpotPriceHistory's answer)"
    ]
    # An answer without one selector's entry is refused whole.
    answers.next = spot(("g5.xlarge", 0.70, 1))
    assert not await poller.poll()
    assert target.applied == []
    assert poller.problem == "no spot price in force for c7i.xlarge in any zone (Linux/UNIX)"
    # Retries back off: 1, 2, 4, 8 s, then the interval.
    assert poller.failures == 4
    assert poller.delay_s() == 8.0
    poller.failures = 5
    assert poller.delay_s() == 10.0


async def test_a_stale_feed_falls_back_to_list_figures_until_a_good_poll(
    rig: Rig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    poller, target, answers, clock, registry = rig
    caplog.set_level(logging.INFO, logger="switchyard")
    answers.next = spot(("g5.xlarge", 0.40, 300), ("c7i.xlarge", 0.18, 60))
    assert await poller.poll()
    target.applied.clear()
    answers.next = FeedError("HTTP 503 Service Unavailable from http://127.0.0.1:9/spot")
    clock.now_s += 30
    assert not await poller.poll()
    assert not poller.check_stale()
    assert poller.delay_s() == 1.0  # the first retry
    # The next wait ends no later than the moment it goes stale.
    clock.now_s += 29.5
    assert poller.delay_s() == pytest.approx(0.5)
    clock.now_s += 0.5  # 60 s since the good poll
    assert poller.check_stale()
    assert sorted(target.applied) == [
        ("c1", None, "feed spot stale"),
        ("c2", None, "feed spot stale"),
        ("gpu", None, "feed spot stale"),
    ]
    assert sample(registry, "switchyard_feed_stale") == 1
    assert (
        "feed spot is stale (no good poll for 60 s, stale_after_s 60): c1, c2, gpu fall back to their list prices (last problem: HTTP 503"
        in caplog.text
    )
    target.applied.clear()
    assert poller.check_stale()
    assert target.applied == []  # once
    # Good again: every figure applies anew (even one equal to what it was).
    answers.next = spot(("g5.xlarge", 0.40, 300), ("c7i.xlarge", 0.18, 60))
    assert await poller.poll()
    assert sorted(b for b, _, _ in target.applied) == ["c1", "c2", "gpu"]
    assert sample(registry, "switchyard_feed_stale") == 0
    assert sample(registry, "switchyard_feed_up") == 1


async def test_gcp_pages_are_followed_by_token() -> None:
    registry = CollectorRegistry()
    pages = {
        None: {"skus": [_sku("A", "1", 0)], "nextPageToken": "p2"},
        "p2": {"skus": [_sku("B", "0", 500_000_000)], "nextPageToken": ""},
    }

    async def fetch(settings: FeedSettings, token: str | None) -> bytes:
        return json.dumps(pages[token]).encode()

    gcp = FeedSettings.model_validate(
        {
            "name": "spot",
            "kind": "gcp-billing",
            "url": "https://cloudbilling.googleapis.com/v1/services/6F81-5844-456A/skus",
            "selectors": [
                {"backends": ["g"], "sku_id": "A"},
                {"backends": ["g"], "sku_id": "B", "multiplier": 4},
            ],
        }
    )
    target = Target({"g": "gpu"})
    poller = FeedPoller(
        gcp, target, GatewayMetrics(registry), clock=Clock(), wall_clock=lambda: NOW_S, fetch=fetch
    )
    assert await poller.poll()
    assert target.applied == [("g", pytest.approx(3.0), "feed spot")]  # type: ignore[comparison-overlap]


def _sku(sku_id: str, units: str, nanos: int) -> dict[str, object]:
    return {
        "skuId": sku_id,
        "pricingInfo": [
            {
                "pricingExpression": {
                    "usageUnit": "h",
                    "tieredRates": [
                        {"startUsageAmount": 0, "unitPrice": {"units": units, "nanos": nanos}}
                    ],
                },
                "effectiveTime": "2024-01-01T00:00:00Z",
            }
        ],
    }
