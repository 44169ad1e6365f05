"""The probe port answers health and readiness from its own threads: while the
gateway's event loop is held busy (standing for a flood of inference work), a
readiness check on the inference port waits, and the probe port answers."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.server import start_gateway
from gateway.serving.probes import LIVENESS_SERVICE
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import Worker, fleet_config
from tests.waiting import wait_until

pytestmark = pytest.mark.asyncio


def ready_on(address: str, timeout_s: float) -> tuple[bool, int]:
    """ServerReady and the health check on `address`, from a plain thread."""
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
        ready = pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(
            pb.ServerReadyRequest(), timeout=timeout_s
        )
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
        )
    return ready.ready, health.status


async def test_probes_answer_while_the_event_loop_is_busy(
    two_workers: tuple[Worker, Worker],
) -> None:
    a, b = two_workers
    gw = await start_gateway(
        fleet_config({"cheap": (a.address, 0.04), "dear": (b.address, 0.08)}, probes="127.0.0.1:0")
    )
    try:
        assert gw.probes is not None
        probes = f"127.0.0.1:{gw.probes.port}"
        serving = health_pb2.HealthCheckResponse.SERVING
        assert await asyncio.to_thread(ready_on, probes, 5.0) == (True, serving)

        # Hold the event loop from a callback, as a flood of work would, until a thread
        # has probed both ports (at most 10 s).
        held = threading.Event()
        probed = threading.Event()
        released = threading.Event()
        answers: dict[str, object] = {}

        def hold() -> None:
            held.set()
            probed.wait(10.0)  # the busy loop: nothing else on it runs meanwhile
            released.set()

        def probe() -> None:
            held.wait(5.0)
            try:
                answers["probes"] = ready_on(probes, 2.0)
                answers["probes_while_held"] = not released.is_set()
                try:
                    answers["inference_port"] = ready_on(gw.address, 0.5)
                except grpc.RpcError as exc:
                    answers["inference_port"] = exc.code()
            finally:
                probed.set()

        thread = threading.Thread(target=probe)
        thread.start()
        asyncio.get_running_loop().call_soon(hold)
        await asyncio.sleep(0)  # the hold runs here
        await asyncio.to_thread(thread.join, 10.0)
        assert answers["probes"] == (True, serving)
        assert answers["probes_while_held"] is True
        # The inference port's own readiness check waited behind the loop.
        assert answers["inference_port"] == grpc.StatusCode.DEADLINE_EXCEEDED

        # Readiness follows the fleet: every backend gone, the probes say not ready.
        await a.stop()
        await b.stop()

        async def not_ready() -> bool:
            return (await asyncio.to_thread(ready_on, probes, 2.0))[0] is False

        await wait_until(not_ready, timeout_s=20, what="the probes to say not ready")
        assert ready_on(probes, 2.0)[1] == health_pb2.HealthCheckResponse.NOT_SERVING
        # Liveness (Kubernetes' liveness probe) stays SERVING: a restart would not help.
        with grpc.insecure_channel(probes) as channel:
            live = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE), timeout=2.0
            )
        assert live.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await gw.stop()
