"""Load shed at the gateway: a backend whose queue is at its limit gets no more work,
and a request with nowhere else to go is answered RESOURCE_EXHAUSTED at once, naming
the limit, with a retry hint (gRPC's `grpc-retry-pushback-ms` trailer); the requests
already accepted are all answered."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from backends.protocol.status import PUSHBACK_TRAILER
from gateway.server import start_gateway
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import fleet_config, launch_worker, raw_request, samples
from tests.waiting import wait_until

pytestmark = pytest.mark.asyncio


async def test_a_full_queue_sheds_at_once_with_a_retry_hint(repository: Path) -> None:
    worker = await launch_worker(repository, threads=1, hardware_class="test-1c")
    gw = await start_gateway(
        fleet_config(
            {"only": (worker.address, 0.1)},
            latency_probe_interval_s=0,
            backend_queue_limit=1,
            attempt_timeout_slack_s=0,
        )
    )
    try:
        held = await worker.hold("digits")
        inputs, _ = samples(repository, "digits")
        request = raw_request("digits", {"input": inputs["input"][:1]}, {"input": "FP32"})
        async with grpc.aio.insecure_channel(gw.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            # One running (held at the worker), one waiting: the queue is at its limit.
            running = asyncio.ensure_future(stub.ModelInfer(request, timeout=30))
            await wait_until(lambda: held.gate.holding, what="the first request to run")
            waiting = asyncio.ensure_future(stub.ModelInfer(request, timeout=30))
            state = gw.fleet.backends["only"]
            await wait_until(lambda: state.in_flight == 2, what="the second to wait")
            call = stub.ModelInfer(request, timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as shed:
                await call
            assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = shed.value.details() or ""
            assert "is at its queue limit" in details and "limit 1" in details, details
            trailers = dict(await call.trailing_metadata() or ())
            assert int(trailers[PUSHBACK_TRAILER]) >= 1
            # Those accepted before it are all answered once the backend moves.
            held.gate.open()
            for accepted in (running, waiting):
                reply = await accepted
                assert reply.parameters["switchyard_backend"].string_param == "only"
        shed_count = gw.registry.get_sample_value(
            "switchyard_decisions_total", {"model": "digits", "reason": "queue-full"}
        )
        assert shed_count == 1
        # A load shed is no verdict on the backend: it was not counted against it.
        assert state.attempt_failures == 0 and state.available
    finally:
        await gw.stop()
        await worker.stop()
