"""The worker's queue parameters for gateways with a partial view of it. A request that
carries a due time and `switchyard_refuse_late` is refused at once (RESOURCE_EXHAUSTED,
saying so) when the worker predicts it would be answered past that time behind the work
ahead of it, and queued as any other when it would not; without the parameter it always
waits its turn. A request with `switchyard_after_waiting` (a gateway's latency probe of
a busy backend) goes after every request waiting when it arrives, and ahead of those
that come later. A real worker, one thread, each run 100 ms (emulated), so the queue
ahead is known to the run."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest

from backends.protocol.parameters import (
    AFTER_WAITING_PARAMETER,
    DUE_PARAMETER,
    LATE_REFUSAL,
    REFUSE_LATE_PARAMETER,
)
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import Worker, launch_worker, raw_request
from tests.waiting import wait_until

RUN_MS = 100.0


def request(due_ms: float | None = None, refuse_late: object = None) -> pb.ModelInferRequest:
    req = raw_request("digits", {"input": np.zeros((1, 64), np.float32)}, {"input": "FP32"})
    if due_ms is not None:
        req.parameters[DUE_PARAMETER].int64_param = int(due_ms * 1000)
    if isinstance(refuse_late, bool):
        req.parameters[REFUSE_LATE_PARAMETER].bool_param = refuse_late
    elif refuse_late is not None:
        req.parameters[REFUSE_LATE_PARAMETER].string_param = str(refuse_late)
    return req


async def slow_worker(repository: Path, run_ms: float = RUN_MS) -> Worker:
    return await launch_worker(
        repository,
        threads=1,
        emulate_latency_ms=run_ms,
        hardware_class="test-1c",
        models=("digits",),
    )


async def test_a_request_that_would_be_late_is_refused_at_once_only_when_it_asks(
    repository: Path,
) -> None:
    worker = await slow_worker(repository)
    try:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            await stub.ModelInfer(request(), timeout=10)  # one run: the worker's mean
            batcher = worker.models["digits"].variants["ort-cpu-fp32"].batcher
            # One running, one waiting: a third is answered after two more runs at least.
            ahead = [asyncio.ensure_future(stub.ModelInfer(request(), timeout=10)) for _ in "ab"]
            await wait_until(
                lambda: batcher.running == 1 and batcher.waiting == 1,
                what="one request running and one waiting",
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(request(due_ms=1.5 * RUN_MS, refuse_late=True), timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert LATE_REFUSAL in (info.value.details() or "")
            assert batcher.stats.refused_late == 1
            # Due later than the queue ahead ends, it is queued; not asking, it is too.
            admitted = [
                asyncio.ensure_future(stub.ModelInfer(r, timeout=10))
                for r in (
                    request(due_ms=20 * RUN_MS, refuse_late=True),
                    request(due_ms=1.5 * RUN_MS),
                    request(due_ms=1.5 * RUN_MS, refuse_late=False),
                )
            ]
            replies = await asyncio.gather(*ahead, *admitted)
            assert all(r.outputs for r in replies)
            assert batcher.stats.refused_late == 1
            # An idle worker admits anything it can answer in time.
            assert (await stub.ModelInfer(request(2 * RUN_MS, True), timeout=10)).outputs
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(request(due_ms=100.0, refuse_late="yes"), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert REFUSE_LATE_PARAMETER in (info.value.details() or "")
    finally:
        await worker.stop()


async def test_a_request_after_the_waiting_goes_behind_them_and_ahead_of_later_ones(
    repository: Path,
) -> None:
    # Runs of 500 ms: the first is still running when the last request comes.
    worker = await slow_worker(repository, 5 * RUN_MS)
    try:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            batcher = worker.models["digits"].variants["ort-cpu-fp32"].batcher
            order: list[str] = []

            async def send(name: str, req: pb.ModelInferRequest) -> None:
                await stub.ModelInfer(req, timeout=10)
                order.append(name)

            running = asyncio.ensure_future(send("running", request()))
            await wait_until(lambda: batcher.running == 1, what="one request running")
            # Two waiting, due in 1 s and 2 s.
            sent = [
                asyncio.ensure_future(send(name, request(due_ms=due)))
                for name, due in (("due-1s", 1000.0), ("due-2s", 2000.0))
            ]
            await wait_until(lambda: batcher.waiting == 2, what="two requests waiting")
            probe = request(due_ms=0.0)  # as a gateway's probe: due at once...
            probe.parameters[AFTER_WAITING_PARAMETER].bool_param = True  # ...after those
            sent.append(asyncio.ensure_future(send("after-waiting", probe)))
            await wait_until(lambda: batcher.waiting == 3, what="the probe waiting")
            # Due after the probe is: behind it; a request due at once: ahead of it all.
            sent.append(asyncio.ensure_future(send("due-3s", request(due_ms=3000.0))))
            sent.append(asyncio.ensure_future(send("due-now", request(due_ms=0.0))))
            await wait_until(lambda: batcher.waiting == 5, what="five requests waiting")
            assert not running.done()
            await asyncio.gather(running, *sent)
            assert order == ["running", "due-now", "due-1s", "due-2s", "after-waiting", "due-3s"]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                bad = request()
                bad.parameters[AFTER_WAITING_PARAMETER].int64_param = 1
                await stub.ModelInfer(bad, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert AFTER_WAITING_PARAMETER in (info.value.details() or "")
    finally:
        await worker.stop()
