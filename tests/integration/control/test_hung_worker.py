"""A hung launched worker (SIGSTOPped: it runs, holds its port, answers nothing), on a
real gateway in process supervising a real worker process: with
restart_after_failed_probes the supervisor SIGKILLs it once its probes have failed
that many times in a row and starts a new process that serves; with 0 it is left
alone and rejoins the routes once continued."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from gateway.config import FleetConfig
from gateway.server import Gateway, start_gateway
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import raw_request, samples
from tests.waiting import wait_until

Start = Callable[[int], Awaitable[Gateway]]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture
async def start(repository: Path) -> AsyncIterator[Start]:
    """Starts a gateway launching one digits worker ("solo") with the given
    restart_after_failed_probes; stops it (continuing any worker left stopped) after."""
    gateways: list[Gateway] = []
    stopped: list[int] = []

    async def start(restart_after: int) -> Gateway:
        config = FleetConfig.model_validate(
            {
                "repository": str(repository),
                "gateway": {
                    "listen": "127.0.0.1:0",
                    "metrics": "127.0.0.1:0",
                    "http": "127.0.0.1:0",
                    "probe_interval_s": 0.2,
                    "probe_timeout_s": 0.5,
                    "latency_probe_interval_s": 0,
                    "restart_after_failed_probes": restart_after,
                },
                "backends": [
                    {
                        "name": "solo",
                        "address": "127.0.0.1:0",
                        "launch": {"threads": 1, "models": ["digits"]},
                    }
                ],
            }
        )
        gateway = await start_gateway(config)
        gateways.append(gateway)
        stopped.extend(gateway.supervisor.pids().values())
        return gateway

    yield start
    for pid in stopped:  # a stopped process acts on nothing else until continued
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    for gateway in gateways:
        await gateway.stop()


async def served_by_solo(gateway: Gateway, repository: Path) -> bool:
    inputs, _ = samples(repository, "digits")
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            reply: pb.ModelInferResponse = await stub.ModelInfer(
                raw_request("digits", inputs, {"input": "FP32"}), timeout=5
            )
        except grpc.aio.AioRpcError:
            return False
    return reply.parameters["switchyard_backend"].string_param == "solo"


async def test_a_hung_worker_is_killed_and_replaced_by_one_that_serves(
    start: Start, repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="switchyard.supervisor")
    gateway = await start(2)
    backend = gateway.fleet.backends["solo"]
    assert backend.healthy and await served_by_solo(gateway, repository)
    hung = gateway.supervisor.pids()["solo"]

    os.kill(hung, signal.SIGSTOP)

    def replaced() -> bool:
        pid = gateway.supervisor.pids().get("solo", 0)
        return pid not in (0, hung) and backend.healthy

    await wait_until(replaced, timeout_s=30, what="a new solo worker, probed ready")
    await wait_until(lambda: not alive(hung), what=f"the hung worker {hung} to be gone")
    assert await served_by_solo(gateway, repository)
    assert gateway.supervisor.worker("solo").restarts == 1
    logged = caplog.text
    assert f"worker (pid {hung}) failed 2 probes in a row, hung" in logged
    assert "killing it (SIGKILL) to restart it" in logged
    assert "worker exited with status -9, killed after 2 failed probes in a row" in logged


async def test_with_restarts_off_a_hung_worker_is_left_alone_and_rejoins_when_continued(
    start: Start, repository: Path
) -> None:
    gateway = await start(0)
    backend = gateway.fleet.backends["solo"]
    assert backend.healthy
    hung = gateway.supervisor.pids()["solo"]

    os.kill(hung, signal.SIGSTOP)
    try:
        # Well past the default limit of 5: nothing restarts it.
        await wait_until(
            lambda: backend.consecutive_failures >= 7,
            timeout_s=30,
            what="seven failed probes of the stopped worker",
        )
        assert not backend.healthy
        assert gateway.supervisor.pids() == {"solo": hung}
        assert gateway.supervisor.worker("solo").restarts == 0
    finally:
        os.kill(hung, signal.SIGCONT)
    await wait_until(lambda: backend.healthy, timeout_s=15, what="solo ready again")
    assert await served_by_solo(gateway, repository)
    assert gateway.supervisor.pids() == {"solo": hung}
