"""Attempts, retries and deadlines in a real gateway over real workers: a policy's
`retries` bounds the attempts a request makes when every route fails with a
retryable status, the attempts show in the response (`switchyard_attempts`) and in
the metrics (`switchyard_backend_attempts_total`, decisions with reason `retry`),
and a request whose Triton `timeout` passes first ends with the gateway's own
DEADLINE_EXCEEDED, naming how many attempts it made.

Workers refuse for real: a worker started with a small `max_message_bytes` answers a
request larger than that with its gRPC server's RESOURCE_EXHAUSTED (retryable), and
a stopped worker with UNAVAILABLE."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import FleetConfig, PoliciesSettings
from gateway.server import Gateway, start_gateway
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import Worker, fleet_config, launch_worker, raw_request

SMALL_MESSAGE_BYTES = 4096
"""What a refusing worker accepts: a one-row digits request (about 300 bytes) passes,
a 32-row one (8 KiB of FP32 input) does not."""
REFUSED = re.compile(r"SERVER: Received message larger than max \(\d+ vs\. 4096\)")
"""gRPC's RESOURCE_EXHAUSTED details for a request over a refusing worker's limit."""


def config(
    backends: dict[str, tuple[str, float]], policy: dict[str, object], **gateway: object
) -> FleetConfig:
    # No probe inferences: the routes' estimates and attempt counts are the test's
    # requests' alone; no attempt timeouts: a slow refusal on a busy host is still
    # one attempt, answered (timeouts have their own tests).
    fleet = fleet_config(
        backends, **{"latency_probe_interval_s": 0, "attempt_timeout_slack_s": 0, **gateway}
    )
    policies = PoliciesSettings.model_validate({"default": {"latency_ms": 1000, **policy}})
    return fleet.model_copy(update={"policies": policies})


def digits(rows: int) -> pb.ModelInferRequest:
    rng = np.random.default_rng(rows)
    return raw_request(
        "digits", {"input": rng.random((rows, 64), dtype=np.float32)}, {"input": "FP32"}
    )


async def scrape(gw: Gateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The gateway's /metrics, as (sample name, sorted labels) -> value."""
    url = f"http://127.0.0.1:{gw.metrics_port}/metrics"

    def get() -> str:
        with urllib.request.urlopen(url) as reply:
            return str(reply.read().decode())

    text = await asyncio.to_thread(get)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def attempts(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, float]:
    """`switchyard_backend_attempts_total` as {"backend/outcome": count}."""
    out = {}
    for (name, labels), value in metrics.items():
        if name == "switchyard_backend_attempts_total" and value:
            label = dict(labels)
            out[f"{label['backend']}/{label['outcome']}"] = value
    return out


def retries_counted(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    key = ("switchyard_decisions_total", (("model", "digits"), ("reason", "retry")))
    return metrics.get(key, 0.0)


async def stop_probing(gw: Gateway) -> None:
    """Ends the gateway's health probes (it has probed every backend once, at its
    start): a backend stopped after this is found out by the requests alone."""
    await gw.prober.stop()
    assert all(b.available for b in gw.fleet.backends.values())


@pytest.fixture
async def refusing(repository: Path) -> AsyncIterator[list[Worker]]:
    """Four one-thread workers serving digits that refuse requests over 4 KiB."""
    workers = [
        await launch_worker(
            repository,
            threads=1,
            hardware_class="test-1c",
            models=("digits",),
            max_message_bytes=SMALL_MESSAGE_BYTES,
        )
        for _ in range(4)
    ]
    yield workers
    for w in workers:
        await w.stop()


@pytest.fixture
async def serving(repository: Path) -> AsyncIterator[Worker]:
    """A worker that accepts the large request."""
    w = await launch_worker(repository, threads=1, hardware_class="test-1c", models=("digits",))
    yield w
    await w.stop()


@pytest.mark.parametrize("retries", [0, 1, 2])
async def test_every_route_refusing_costs_exactly_one_plus_retries_attempts(
    refusing: list[Worker], retries: int
) -> None:
    """Four routes, all refusing the request with RESOURCE_EXHAUSTED: the request makes
    1 + retries attempts, each on a route not tried before (one route is left over,
    never tried), then fails with the last backend's status and message."""
    gw = await start_gateway(
        config(
            {f"r{i}": (w.address, 0.01 * (i + 1)) for i, w in enumerate(refusing)},
            {"retries": retries},
        )
    )
    try:
        async with grpc.aio.insecure_channel(gw.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            # The workers accept a small request: each refusal below is the size alone.
            small = await stub.ModelInfer(digits(1))
            assert small.parameters["switchyard_attempts"].string_param == "1"
            before = attempts(await scrape(gw))
            assert before == {"r0/OK": 1}
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(digits(32))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert REFUSED.fullmatch(info.value.details() or ""), info.value.details()
        metrics = await scrape(gw)
        # One attempt on each of 1 + retries routes, none tried twice.
        counted = attempts(metrics)
        assert counted.pop("r0/OK") == 1
        assert set(counted.values()) == {1.0}, counted
        assert len(counted) == 1 + retries, counted
        assert all(key.endswith("/RESOURCE_EXHAUSTED") for key in counted), counted
        assert retries_counted(metrics) == retries
        failed = (
            "switchyard_requests_total",
            (
                ("backend", "none"),
                ("model", "digits"),
                ("outcome", "RESOURCE_EXHAUSTED"),
                ("protocol", "grpc"),
                ("variant", "none"),
            ),
        )
        assert metrics[failed] == 1
    finally:
        await gw.stop()


async def test_an_answer_after_retries_says_how_many_attempts_it_took(
    refusing: list[Worker], serving: Worker
) -> None:
    """Two cheap routes refuse the request, the dear one serves it: with `retries: 2`
    the third attempt answers (`switchyard_attempts` 3); with `retries: 1` the dear
    route is never tried and the request fails with the second refusal."""
    backends = {
        "cheap-a": (refusing[0].address, 0.01),
        "cheap-b": (refusing[1].address, 0.02),
        "dear": (serving.address, 0.5),
    }
    gw = await start_gateway(config(backends, {"retries": 2}))
    try:
        async with grpc.aio.insecure_channel(gw.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            reply = await stub.ModelInfer(digits(32))
            params = {k: v.string_param for k, v in reply.parameters.items()}
            assert (params["switchyard_backend"], params["switchyard_attempts"]) == ("dear", "3")
            assert len(reply.outputs) == 2 and list(reply.outputs[0].shape) == [32]
        metrics = await scrape(gw)
        assert attempts(metrics) == {
            "cheap-a/RESOURCE_EXHAUSTED": 1,
            "cheap-b/RESOURCE_EXHAUSTED": 1,
            "dear/OK": 1,
        }
        assert retries_counted(metrics) == 2
    finally:
        await gw.stop()

    gw = await start_gateway(config(backends, {"retries": 1}))
    try:
        async with grpc.aio.insecure_channel(gw.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(digits(32))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert REFUSED.fullmatch(info.value.details() or ""), info.value.details()
        metrics = await scrape(gw)
        assert attempts(metrics) == {
            "cheap-a/RESOURCE_EXHAUSTED": 1,
            "cheap-b/RESOURCE_EXHAUSTED": 1,
        }
        assert retries_counted(metrics) == 1
    finally:
        await gw.stop()


async def test_stopped_backends_are_retried_until_one_answers(
    refusing: list[Worker], serving: Worker
) -> None:
    """Two cheap workers stop after the gateway has seen them ready, with no health
    probe to tell it: the request is refused (UNAVAILABLE) by both and answered by
    the third route, in three attempts."""
    cheap_a, cheap_b = refusing[0], refusing[1]
    gw = await start_gateway(
        config(
            {
                "cheap-a": (cheap_a.address, 0.01),
                "cheap-b": (cheap_b.address, 0.02),
                "dear": (serving.address, 0.5),
            },
            {"retries": 2},
        )
    )
    try:
        backends = gw.fleet.backends
        await stop_probing(gw)
        await cheap_a.stop()
        await cheap_b.stop()
        async with grpc.aio.insecure_channel(gw.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            reply = await stub.ModelInfer(digits(1))
            params = {k: v.string_param for k, v in reply.parameters.items()}
            assert (params["switchyard_backend"], params["switchyard_attempts"]) == ("dear", "3")
        metrics = await scrape(gw)
        assert attempts(metrics) == {
            "cheap-a/UNAVAILABLE": 1,
            "cheap-b/UNAVAILABLE": 1,
            "dear/OK": 1,
        }
        assert retries_counted(metrics) == 2
        # A refused connection takes the backend out of routing at once.
        assert not backends["cheap-a"].available and not backends["cheap-b"].available
    finally:
        await gw.stop()


@pytest.fixture
async def slow(repository: Path) -> AsyncIterator[Worker]:
    """A worker that takes 2 s per row."""
    w = await launch_worker(
        repository,
        threads=1,
        hardware_class="test-slow",
        models=("digits",),
        emulate_latency_ms=2000,
    )
    yield w
    await w.stop()


async def test_the_timeout_parameter_ends_the_request_naming_its_attempts(
    slow: Worker, refusing: list[Worker]
) -> None:
    """Triton's `timeout` (microseconds), far shorter than the only route's service
    time: the gateway's own deadline ends the request with DEADLINE_EXCEEDED after one
    attempt, at the timeout rather than when the route answers. With a stopped backend
    ranked first, the deadline passes during the retry: after 2 attempts."""
    gw = await start_gateway(config({"slow": (slow.address, 0.5)}, {"retries": 2}))
    try:
        async with grpc.aio.insecure_channel(gw.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = digits(1)
            request.parameters["timeout"].int64_param = 100_000
            loop = asyncio.get_running_loop()
            sent = loop.time()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(request)
            waited = loop.time() - sent
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert info.value.details() == "deadline passed after 1 attempt(s) for model 'digits'"
        assert waited < 1.5, f"the gateway gave up after {waited:.2f} s, not at the timeout"
    finally:
        await gw.stop()

    gone = refusing[0]
    gw = await start_gateway(
        config(
            {"gone": (gone.address, 0.01), "slow": (slow.address, 0.5)},
            {"retries": 2},
        )
    )
    try:
        await stop_probing(gw)
        await gone.stop()
        async with grpc.aio.insecure_channel(gw.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = digits(1)
            request.parameters["timeout"].int64_param = 300_000
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(request)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert info.value.details() == "deadline passed after 2 attempt(s) for model 'digits'"
        # The slow attempt was given up at the deadline, so only the refusal is counted.
        assert attempts(await scrape(gw)) == {"gone/UNAVAILABLE": 1}
        assert retries_counted(await scrape(gw)) == 1
    finally:
        await gw.stop()
