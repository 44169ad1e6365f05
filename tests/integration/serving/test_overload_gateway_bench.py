"""The gateway overload bench's sender (gateway.bench.overload_gateway) against a real
gateway in front of a real worker: it records every call's send time, answer time and
status; under a reject policy a call no route can serve in time is shed at once with
RESOURCE_EXHAUSTED and a pushback trailer, which the report counts as shed; the closed
loop it measures capacity with waits as each trailer asks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.bench.overload_gateway import (
    figures,
    flood_payload,
    send_closed_loop,
    send_open_loop,
)
from gateway.config import FleetConfig
from gateway.server import Gateway, start_gateway
from tests.integration.conftest import Worker, launch_worker
from tests.waiting import wait_until

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def resnet_worker(repository: Path) -> AsyncIterator[Worker]:
    w = await launch_worker(repository, threads=1, hardware_class="test-1c", models=["resnet"])
    yield w
    await w.stop()


@pytest.fixture
async def gateway(resnet_worker: Worker) -> AsyncIterator[Gateway]:
    config = FleetConfig.model_validate(
        {
            "gateway": {"listen": "127.0.0.1:0", "metrics": "127.0.0.1:0", "http": "127.0.0.1:0"},
            "backends": [
                {"name": "cpu", "address": resnet_worker.address, "price_usd_per_hour": 0.04}
            ],
            "policies": {
                "default": {"latency_ms": 100},
                "models": {"resnet": {"latency_ms": 1000, "on_infeasible": "reject"}},
            },
        }
    )
    gw = await start_gateway(config)
    await wait_until(lambda: gw.servicer.fleet.model_ready("resnet"), what="resnet ready")
    yield gw
    await gw.stop()


async def test_an_impossible_sla_is_shed_at_once_and_recorded_as_shed(
    gateway: Gateway, repository: Path
) -> None:
    # 1 us: no route can meet it, so every call is refused before it reaches a backend.
    payload = flood_payload(repository, "resnet", sla_ms=0.001)
    sent = await send_open_loop(gateway.address, payload, 200.0, 0.5, 2)
    assert len(sent.sent_s) == 100
    assert set(sent.codes) == {"RESOURCE_EXHAUSTED"}
    assert sent.pushback == 100
    assert all(hint is not None and hint >= 1 for hint in sent.pushback_ms)
    (message,) = sent.messages
    assert "no route for model 'resnet' meets p99 <= 0.001 ms" in message
    found = figures(sent)
    assert len(found.shed_ms) == 100 and not found.ok_ms
    assert found.shed_reasons == {"SLA infeasible (policy reject)": 100}
    assert found.unanswered == 0 and not found.other
    assert all(a is not None and a >= s for s, a in zip(sent.sent_s, sent.answered_s, strict=True))


async def test_calls_within_the_sla_are_answered_ok(gateway: Gateway, repository: Path) -> None:
    payload = flood_payload(repository, "resnet")
    sent = await send_closed_loop(gateway.address, payload, 4, 0.5, 2)
    assert sent.codes and set(sent.codes) == {"OK"}
    found = figures(sent)
    assert len(found.ok_ms) == len(sent.codes)
    assert found.unanswered == 0 and not found.shed_ms


async def test_the_closed_loop_waits_as_the_pushback_trailer_asks(
    gateway: Gateway, repository: Path
) -> None:
    # Every call shed; one stream, so each call goes once the one before it was
    # answered and its trailer's wait (at least 1 ms) has passed.
    payload = flood_payload(repository, "resnet", sla_ms=0.001)
    sent = await send_closed_loop(gateway.address, payload, 1, 0.3, 1)
    assert len(sent.codes) > 2 and set(sent.codes) == {"RESOURCE_EXHAUSTED"}
    for answered, hint_ms, following in zip(
        sent.answered_s, sent.pushback_ms, sent.sent_s[1:], strict=False
    ):
        assert answered is not None and hint_ms is not None and hint_ms >= 1
        assert following - answered >= min(hint_ms, 1000) / 1000 - 0.001
