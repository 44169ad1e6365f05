"""The SLA router in a real gateway over real workers: prices, SLAs, drains,
policies and `explain` through the admin API, and the response parameters."""

from __future__ import annotations

import asyncio
import itertools
import logging
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from gateway.server import Gateway, start_gateway
from protos import admin_pb2 as apb
from protos import admin_pb2_grpc
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import (
    Worker,
    fleet_config,
    gateway_clients,
    launch_worker,
    raw_request,
    samples,
)
from tests.waiting import wait_until

TOKEN = "test-token-123"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture
async def slow_and_fast(repository: Path) -> AsyncIterator[tuple[Worker, Worker]]:
    slow = await launch_worker(
        repository, threads=1, hardware_class="test-slow", emulate_latency_ms=25, models=("digits",)
    )
    fast = await launch_worker(
        repository, threads=1, hardware_class="test-fast", models=("digits",)
    )
    yield slow, fast
    await slow.stop()
    await fast.stop()


@pytest.fixture
async def routed(
    slow_and_fast: tuple[Worker, Worker], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Gateway]:
    monkeypatch.setenv("SWITCHYARD_ADMIN_TOKEN", TOKEN)
    slow, fast = slow_and_fast
    config = fleet_config(
        {"cheap-slow": (slow.address, 0.002), "dear-fast": (fast.address, 0.4)},
        admin="127.0.0.1:0",
        latency_probe_interval_s=0.5,
        request_overhead_ms=0.005,
    )
    config = config.model_copy(
        update={
            "policies": config.policies.model_validate(
                {
                    "default": {"latency_ms": 200, "on_infeasible": "fastest"},
                    "classes": {"gold": {"latency_ms": 10}, "tin": {"latency_ms": 0.01}},
                }
            )
        }
    )
    gw = await start_gateway(config)
    yield gw
    await gw.stop()


async def infer_many(
    stub: pb_grpc.GRPCInferenceServiceStub,
    request: pb.ModelInferRequest,
    count: int,
    **params: str | float,
) -> list[pb.ModelInferResponse]:
    request = pb.ModelInferRequest.FromString(request.SerializeToString())
    for key, value in params.items():
        if isinstance(value, str):
            request.parameters[key].string_param = value
        else:
            request.parameters[key].double_param = value
    return [await stub.ModelInfer(request) for _ in range(count)]


def backends(replies: list[pb.ModelInferResponse]) -> Counter[str]:
    return Counter(r.parameters["switchyard_backend"].string_param for r in replies)


async def test_sla_price_drain_and_policy_steer_traffic(routed: Gateway, repository: Path) -> None:
    inputs, _ = samples(repository, "digits")
    request = raw_request("digits", {"input": inputs["input"][:1]}, {"input": "FP32"})
    async with gateway_clients(routed) as (stub, admin):
        # A loose SLA: the cheap, slow route takes everything.
        loose = await infer_many(stub, request, 10)
        assert backends(loose) == {"cheap-slow": 10}
        cost = float(loose[-1].parameters["switchyard_cost_usd"].string_param)
        assert 0 < cost < 1e-6
        # Gold (10 ms at p99): the slow route is learnt to take ~25 ms, so gold goes fast.
        gold = await infer_many(stub, request, 10, sla_class="gold")
        assert backends(gold) == {"dear-fast": 10}
        # So does a request's own target.
        assert backends(await infer_many(stub, request, 5, sla_ms=8.0)) == {"dear-fast": 5}

        # A price change: new requests follow at once.
        await admin.SetPrice(
            apb.SetPriceRequest(backend="cheap-slow", usd_per_hour=4.0), metadata=AUTH
        )
        assert backends(await infer_many(stub, request, 20)) == {"dear-fast": 20}
        await admin.SetPrice(
            apb.SetPriceRequest(backend="cheap-slow", usd_per_hour=0.002), metadata=AUTH
        )
        assert backends(await infer_many(stub, request, 5)) == {"cheap-slow": 5}

        # Drain: traffic leaves with no error; undrain brings it back.
        drained = await admin.Drain(apb.DrainRequest(backend="cheap-slow"), metadata=AUTH)
        assert drained.status == "drained"
        assert backends(await infer_many(stub, request, 5)) == {"dear-fast": 5}
        await admin.Undrain(apb.DrainRequest(backend="cheap-slow"), metadata=AUTH)
        assert backends(await infer_many(stub, request, 5)) == {"cheap-slow": 5}

        # An infeasible class falls back to the fastest route...
        tin = await infer_many(stub, request, 3, sla_class="tin")
        assert backends(tin) == {"dear-fast": 3}
        # ...until the policy says reject.
        await admin.SetPolicy(
            apb.PolicyDocument(
                yaml="classes:\n  gold: {latency_ms: 10}\n"
                "  tin: {latency_ms: 0.01, on_infeasible: reject}\n"
            ),
            metadata=AUTH,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await infer_many(stub, request, 1, sla_class="tin")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The gateway's request overhead holds for the policies set at run time too.
        assert "no route for model 'digits' meets p99 <= 0.01 ms (less 0.005 ms overhead)" in (
            info.value.details() or ""
        )
        policy = await admin.GetPolicy(apb.GetPolicyRequest(), metadata=AUTH)
        assert "on_infeasible: reject" in policy.yaml

        # explain: the decision and every route's verdict (20 ms: well under the slow
        # route's 25 ms, well over the fast one's, even on a busy machine).
        why = await admin.Explain(apb.ExplainRequest(model="digits", sla_ms=20), metadata=AUTH)
        assert (why.chosen_backend, why.reason) == ("dear-fast", "cheapest-feasible")
        verdicts = {v.route.backend: v for v in why.routes}
        assert not verdicts["cheap-slow"].feasible
        assert "> SLA 20 ms" in verdicts["cheap-slow"].why

        # routes: live state, traffic shares, estimates.
        routes = {
            r.backend: r
            for r in (
                await admin.ListRoutes(apb.ListRoutesRequest(model="digits"), metadata=AUTH)
            ).routes
        }
        assert routes["cheap-slow"].predicted_p50_ms > 20
        assert routes["dear-fast"].predicted_p50_ms < 10
        assert routes["cheap-slow"].requests > 0 and routes["dear-fast"].requests > 0
        total_share = sum(r.traffic_share for r in routes.values())
        assert total_share == pytest.approx(1.0)

        # Metrics carry decisions, SLA outcomes, cost and prices.
        body = await asyncio.to_thread(
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{routed.metrics_port}/metrics")
                .read()
                .decode()
            )
        )
        for needle in (
            'switchyard_decisions_total{model="digits",reason="cheapest-feasible"}',
            'switchyard_decisions_total{model="digits",reason="infeasible-fallback"}',
            'switchyard_decisions_total{model="digits",reason="infeasible-reject"}',
            'switchyard_sla_requests_total{model="digits",outcome="met",sla_class="gold"}',
            'switchyard_cost_usd_total{backend="cheap-slow",model="digits"}',
            'switchyard_backend_price_usd_per_hour{backend="cheap-slow"} 0.002',
            'switchyard_route_latency_ms{backend="cheap-slow",kind="predicted"',
        ):
            assert needle in body, needle


async def test_admin_api_needs_the_token_and_names_bad_input(routed: Gateway) -> None:
    assert routed.admin_address is not None
    async with grpc.aio.insecure_channel(routed.admin_address) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin.ListRoutes(apb.ListRoutesRequest(), metadata=metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        cases = [
            (
                admin.SetPrice(apb.SetPriceRequest(backend="nope", usd_per_hour=1), metadata=AUTH),
                grpc.StatusCode.NOT_FOUND,
                "unknown backend 'nope'",
            ),
            (
                admin.SetPrice(
                    apb.SetPriceRequest(backend="dear-fast", usd_per_hour=-1), metadata=AUTH
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                "must not be negative",
            ),
            (
                admin.SetPolicy(
                    apb.PolicyDocument(yaml="default: {latency_msx: 3}"), metadata=AUTH
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                "latency_msx",
            ),
            (
                admin.SetPolicy(apb.PolicyDocument(yaml="[1, 2"), metadata=AUTH),
                grpc.StatusCode.INVALID_ARGUMENT,
                "not valid YAML",
            ),
            (
                admin.Explain(apb.ExplainRequest(model="nope"), metadata=AUTH),
                grpc.StatusCode.INVALID_ARGUMENT,
                "unknown model 'nope'",
            ),
            (
                admin.Drain(apb.DrainRequest(backend=""), metadata=AUTH),
                grpc.StatusCode.NOT_FOUND,
                "unknown backend ''",
            ),
        ]
        for call, code, text in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == code and text in (info.value.details() or "")
        # Nothing was changed by the bad calls.
        routes = (await admin.ListRoutes(apb.ListRoutesRequest(), metadata=AUTH)).routes
        assert {r.backend: r.price_usd_per_hour for r in routes} == {
            "cheap-slow": 0.002,
            "dear-fast": 0.4,
        }


async def test_fleet_file_changes_and_price_schedules_apply_live(
    slow_and_fast: tuple[Worker, Worker],
    tmp_path: Path,
    repository: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    slow, fast = slow_and_fast
    fleet = tmp_path / "fleet.yaml"
    schedule = tmp_path / "prices.csv"
    schedule.write_text("offset_s,backend,usd_per_hour\n0.5,b,0.01\n")

    def write(price_a: float) -> None:
        fleet.write_text(
            "gateway: {listen: '127.0.0.1:0', metrics: '127.0.0.1:0', http: '127.0.0.1:0',\n"
            "  admin: '127.0.0.1:0',\n"
            "  probe_interval_s: 0.2, watch_config_s: 0.1, price_schedule: prices.csv}\n"
            "backends:\n"
            f"  - {{name: a, address: '{fast.address}', price_usd_per_hour: {price_a}}}\n"
            f"  - {{name: b, address: '{slow.address}', price_usd_per_hour: 0.5}}\n"
        )

    write(0.1)
    from gateway.config import load_fleet

    gw = await start_gateway(load_fleet(fleet), fleet)
    try:
        assert gw.fleet.backends["a"].price_usd_per_hour == 0.1
        backends = gw.fleet.backends
        write(0.3)
        await wait_until(
            lambda: backends["a"].price_usd_per_hour == 0.3, what="a's price from the edit"
        )
        # The schedule sets b's price half a second after the start; a later edit
        # of a's price leaves it.
        await wait_until(
            lambda: backends["b"].price_usd_per_hour == 0.01, what="b's price from the schedule"
        )
        write(0.2)
        await wait_until(
            lambda: backends["a"].price_usd_per_hour == 0.2, what="a's price from the next edit"
        )
        assert backends["b"].price_usd_per_hour == 0.01
        # An invalid edit keeps the running settings: once the watcher has read it and
        # said so, nothing has changed.
        caplog.set_level(logging.ERROR, logger="switchyard")
        fleet.write_text("backends: [")
        await wait_until(
            lambda: "fleet file changed but is not valid" in caplog.text,
            what="the watcher to refuse the invalid edit",
        )
        assert backends["a"].price_usd_per_hour == 0.2
        assert backends["b"].price_usd_per_hour == 0.01
    finally:
        await gw.stop()


async def test_a_late_attempt_is_hedged_to_the_next_route(
    slow_and_fast: tuple[Worker, Worker], repository: Path
) -> None:
    slow, fast = slow_and_fast
    config = fleet_config(
        {"cheap-slow": (slow.address, 0.0001), "dear-fast": (fast.address, 0.4)},
        latency_probe_interval_s=0,
    )
    config = config.model_copy(
        update={
            "policies": config.policies.model_validate(
                {"default": {"latency_ms": 500, "hedge": True}}
            )
        }
    )
    gw = await start_gateway(config)
    try:
        # The slow route holds what it gets until the test ends: only a hedge answers.
        held = await slow.hold("digits")
        inputs, _ = samples(repository, "digits")
        request = raw_request("digits", {"input": inputs["input"][:1]}, {"input": "FP32"})
        async with grpc.aio.insecure_channel(gw.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            # Nothing is known of the slow route yet (a 1 ms guess): the first request
            # goes there, runs past its predicted p95, and is hedged to the fast route,
            # which answers first.
            reply = await stub.ModelInfer(request)
            params = {k: v.string_param for k, v in reply.parameters.items()}
            assert params["switchyard_backend"] == "dear-fast"
            assert params["switchyard_attempts"] == "2"
        assert held.batcher.arrived == 1 and held.gate.holding  # the first attempt, still held
        hedges = gw.registry.get_sample_value(
            "switchyard_decisions_total", {"model": "digits", "reason": "hedge"}
        )
        assert hedges == 1
        # The losing attempt was cancelled: nothing is left in flight.
        await wait_until(
            lambda: all(b.in_flight == 0 for b in gw.fleet.backends.values()),
            what="the losing attempt to leave the backend's queue",
        )
    finally:
        await gw.stop()


async def test_latency_probes_do_not_queue_behind_each_other(repository: Path) -> None:
    """A worker serving four models, each taking 40 ms of emulated work per execution:
    a round of latency probes measures each route alone, one after another, so no two
    executions on the worker ever overlap (probes sent together would queue behind
    each other, and each would measure the wait as well as its route)."""
    models = ("digits", "cnn", "resnet", "transformer")
    worker = await launch_worker(repository, threads=1, hardware_class="test-1c", models=models)
    watched = [await worker.hold(m, closed=False, delay_s=0.04) for m in models]
    gw = await start_gateway(
        # No warm-up: its probes take several samples after one wake-up call.
        fleet_config(
            {"one": (worker.address, 0.04)}, latency_probe_interval_s=0.2, warmup_samples=0
        )
    )
    try:

        def measured() -> bool:
            routes = [r for r in gw.fleet.all_routes() if r.default]
            return {r.model for r in routes} == set(models) and all(
                r.estimate.samples >= 2 for r in routes
            )

        await wait_until(
            measured, timeout_s=30.0, what="two rounds of latency probes on every route"
        )
        spans = sorted(span for w in watched for span in w.gate.spans)
        overlaps = [(a, b) for a, b in itertools.pairwise(spans) if b[0] < a[1]]
        assert overlaps == [], f"{len(overlaps)} of {len(spans)} executions overlapped"
        # Each probe is a warm-up call, unmeasured, and the measured one.
        routes = [r for r in gw.fleet.all_routes() if r.default]
        samples = {r.model: r.estimate.samples for r in routes}
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for model in models:
                stats = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=model))
                assert stats.model_stats[0].inference_count >= 2 * samples[model]
    finally:
        await gw.stop()
        await worker.stop()


@pytest.mark.parametrize("coalesce_in_flight", [0, 1])
async def test_requests_wait_earliest_deadline_first(
    repository: Path, coalesce_in_flight: int
) -> None:
    """A one-slot worker (no batching) busy with one request, held there: two requests
    with a loose SLA (60 s) and then one with a tight SLA (0.6 s) arrive. The tight one
    is due first, so it runs next, ahead of the loose ones that came before it, whether
    the requests wait at the worker (each sent on its own, with its deadline) or at the
    gateway (one call at a time per route; those waiting then leave merged, in the
    order they are due). The gateway's model of the backend's queue holds them in that
    order meanwhile. The SLAs lie far apart, so the order does not depend on how
    quickly the requests arrive."""
    worker = await launch_worker(repository, threads=1, max_batch_rows=1, models=("digits",))
    gw = await start_gateway(
        fleet_config(
            {"one": (worker.address, 0.04)},
            latency_probe_interval_s=0,
            coalesce_in_flight=coalesce_in_flight,
        )
    )
    inputs, _ = samples(repository, "digits")
    arrivals = [("first", 60_000), ("loose", 60_000), ("loose-2", 60_000), ("tight", 600)]
    names = {inputs["input"][i].tobytes(): name for i, (name, _) in enumerate(arrivals)}
    assert len(names) == len(arrivals), "the sample rows are not distinct"
    try:
        await wait_until(lambda: gw.fleet.model_ready("digits"), what="digits to be ready")
        held = await worker.hold("digits")
        state = gw.fleet.backends["one"]
        async with grpc.aio.insecure_channel(gw.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            calls = []
            for row, (name, sla_ms) in enumerate(arrivals):
                r = raw_request(
                    "digits", {"input": inputs["input"][row : row + 1]}, {"input": "FP32"}
                )
                r.parameters["sla_ms"].double_param = sla_ms
                # A call starts as it is made: each once the one before it is in place.
                calls.append(stub.ModelInfer(r))
                if row == 0:
                    await wait_until(lambda: held.gate.holding, what="the first request to run")
                    continue
                # Sent on its own, it waits at the worker; else at the gateway.
                at_worker = 1 if coalesce_in_flight else row + 1

                def waiting(n: int = row + 1, w: int = at_worker) -> bool:
                    return state.in_flight == n and held.batcher.arrived == w

                await wait_until(waiting, what=f"{name} to wait")
            assert (state.in_flight, state.queued) == (4, 3)
            now = gw.servicer.clock()
            assert state.due_before(now + 1.0)[0] == 1  # only the tight one is due soon
            held.gate.open()
            await asyncio.gather(*calls)
        assert [names[row] for row in held.rows_run("input")] == [
            "first",
            "tight",
            "loose",
            "loose-2",
        ]
        assert (state.in_flight, state.queued) == (0, 0)
    finally:
        await gw.stop()
        await worker.stop()
