"""A worker process killed with requests in flight on the gateway's streams to it: each
of those requests fails over to the other worker and is answered; no caller sees an
error, and later requests go on over streams to the survivor."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc

from gateway.server import start_gateway
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import fleet_config, raw_request, samples, server_ready
from tests.waiting import wait_until


@asynccontextmanager
async def worker_process(
    repository: Path, log: Path, emulate_ms: float
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """A `backends.worker.server` process serving digits on a free port: (process, address)."""
    with log.open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "backends.worker.server",
            "--repository",
            str(repository),
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "1",
            "--models",
            "digits",
            "--emulate-latency-ms",
            str(emulate_ms),
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
        )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        assert line, f"the worker exited; its log is {log}"
        yield process, json.loads(line)["address"]
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def test_requests_in_flight_on_a_killed_workers_streams_are_answered_elsewhere(
    repository: Path, tmp_path: Path
) -> None:
    inputs, _ = samples(repository, "digits")
    request = raw_request("digits", {"input": inputs["input"][:1]}, {"input": "FP32"})
    async with (
        worker_process(repository, tmp_path / "a.log", 5.0) as (doomed, address_a),
        worker_process(repository, tmp_path / "b.log", 5.0) as (_, address_b),
    ):
        # a is the cheaper: traffic goes there first.
        gw = await start_gateway(
            fleet_config(
                {"a": (address_a, 0.01), "b": (address_b, 0.1)},
                backend_streams=2,
                coalesce_in_flight=0,  # one request a call: several in flight on a's streams
                latency_probe_interval_s=0,
            )
        )
        try:
            streams = gw.pool.client(address_a).streams
            assert streams is not None
            async with grpc.aio.insecure_channel(gw.address) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                # Ready: both backends answered their warm-up probes.
                await wait_until(lambda: server_ready(gw), timeout_s=30, what="the gateway ready")
                # Stopped first, so that requests pile up in flight on a's streams.
                os.kill(doomed.pid, signal.SIGSTOP)
                calls = [
                    asyncio.ensure_future(stub.ModelInfer(request, timeout=30)) for _ in range(6)
                ]
                await wait_until(
                    lambda: streams.in_flight() >= 2,
                    timeout_s=30,
                    what="requests in flight on a's streams",
                )
                on_a = streams.in_flight()
                os.kill(doomed.pid, signal.SIGKILL)
                replies: list[pb.ModelInferResponse] = await asyncio.gather(*calls)
                served_by = [r.parameters["switchyard_backend"].string_param for r in replies]
                assert served_by.count("b") >= on_a, served_by
                after = await stub.ModelInfer(request, timeout=30)
                assert after.parameters["switchyard_backend"].string_param == "b"
            survivor = gw.pool.client(address_b).streams
            assert survivor is not None and not survivor.unsupported
        finally:
            await gw.stop()
