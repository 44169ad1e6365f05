"""The backend worker under overload: a bounded queue that sheds at once with
RESOURCE_EXHAUSTED, the limit named and a `grpc-retry-pushback-ms` trailer; requests
whose deadline passed while they waited answered DEADLINE_EXCEEDED without running;
gRPC's concurrency limit answering RESOURCE_EXHAUSTED; readiness answered during a
flood. The batcher alone (with a clock the test moves, and a gate in front of its
runtime) and a real worker over real gRPC, with ONNX Runtime and emulated latency."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from backends.protocol.errors import DeadlineExceeded
from backends.protocol.status import PUSHBACK_TRAILER
from backends.runtimes.base import Array
from backends.worker.batching import Batcher, QueueFull
from backends.worker.server import add_arguments
from gateway.config import BackendSettings, LaunchSettings
from gateway.control.supervisor import worker_command
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import Gate, Worker, launch_worker, raw_request, samples
from tests.waiting import wait_until

Outcome = tuple[str, str, dict[str, str]]
"""A call's status code name, its message and its trailing metadata."""


class Clock:
    """Nanoseconds that move only when the test says."""

    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


def doubled(inputs: Mapping[str, Array], outputs: Sequence[str]) -> list[Array]:
    return [inputs["x"] * 2]


def row(value: float) -> dict[str, Array]:
    return {"x": np.full((1, 2), value, dtype=np.float32)}


async def test_a_full_queue_sheds_at_once_naming_the_limit_with_a_retry_estimate() -> None:
    clock = Clock()
    gate = Gate(doubled)
    with ThreadPoolExecutor(2) as executor:
        batcher = Batcher(
            gate, executor, ["y"], max_batch_size=1, max_queue=2, name="model 'm'", clock_ns=clock
        )
        batcher.start()
        try:
            first = asyncio.create_task(batcher.infer(row(1), 1))
            await wait_until(lambda: gate.holding and batcher.running == 1, what="a batch to run")
            queued = [asyncio.create_task(batcher.infer(row(v), 1)) for v in (2, 3)]
            await wait_until(lambda: batcher.waiting == 2, what="two requests to queue")
            clock.ns = 30_000_000  # the batch has run 30 ms so far

            with pytest.raises(QueueFull) as shed:
                await batcher.infer(row(4), 1)
            assert str(shed.value) == "model 'm': queue full (2 requests waiting, limit 2)"
            # 2 waiting x at least 30 ms per execution / 1 request per execution.
            assert shed.value.retry_after_ms == 60
            assert batcher.stats.shed == 1

            gate.open()
            answers = await asyncio.gather(first, *queued)
            assert [float(a["y"][0, 0]) for a in answers] == [2.0, 4.0, 6.0]
            assert [float(ran["x"][0, 0]) for ran in gate.ran] == [1.0, 2.0, 3.0]  # 4 never ran
            assert batcher.waiting == 0
            assert batcher.retry_after_ms() == 1  # nothing waits: at least 1 ms
        finally:
            gate.open()
            await batcher.stop()


async def test_a_request_past_its_deadline_is_answered_without_running() -> None:
    clock = Clock()
    gate = Gate(doubled)
    with ThreadPoolExecutor(2) as executor:
        batcher = Batcher(gate, executor, ["y"], max_batch_size=8, name="model 'm'", clock_ns=clock)
        batcher.start()
        try:
            first = asyncio.create_task(batcher.infer(row(1), 1))
            await wait_until(lambda: gate.holding, what="a batch to run")
            late = asyncio.create_task(batcher.infer(row(2), 1, timeout_s=0.010))
            # Due 1 us after arrival: late for its SLA, which is a priority, not a deadline.
            overdue = asyncio.create_task(batcher.infer(row(3), 1, due_us=1))
            in_time = asyncio.create_task(batcher.infer(row(4), 1, timeout_s=10.0))
            await wait_until(lambda: batcher.waiting == 3, what="three requests to queue")
            clock.ns = 20_000_000  # 20 ms on: past the 10 ms deadline, within the 10 s one
            gate.open()

            with pytest.raises(DeadlineExceeded, match=r"deadline passed after 20\.0 ms"):
                await late
            answers = await asyncio.gather(first, overdue, in_time)
            assert [float(a["y"][0, 0]) for a in answers] == [2.0, 6.0, 8.0]
            ran = sorted(float(r) for inputs in gate.ran for r in inputs["x"][:, 0])
            assert ran == [1.0, 3.0, 4.0]
            assert (batcher.stats.expired, batcher.stats.inferences) == (1, 3)
        finally:
            gate.open()
            await batcher.stop()


def resnet_request(repository: Path) -> pb.ModelInferRequest:
    inputs, _ = samples(repository, "resnet")
    return raw_request(
        "resnet", {name: a[:1] for name, a in inputs.items()}, dict.fromkeys(inputs, "FP32")
    )


async def outcome(call: grpc.aio.UnaryUnaryCall) -> Outcome:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details() or "", dict(exc.trailing_metadata() or ())
    return "OK", "", {}


def default_batcher(worker: Worker, model: str) -> Batcher:
    served = worker.models[model]
    return served.variants[served.default].batcher


async def statistics(worker: Worker, model: str) -> pb.ModelStatistics:
    async with grpc.aio.insecure_channel(worker.address) as channel:
        reply: pb.ModelStatisticsResponse = await pb_grpc.GRPCInferenceServiceStub(
            channel
        ).ModelStatistics(pb.ModelStatisticsRequest(name=model))
    return reply.model_stats[0]


async def test_a_flood_past_the_queue_bound_is_shed_and_readiness_still_answers(
    repository: Path,
) -> None:
    worker = await launch_worker(
        repository,
        threads=1,
        hardware_class="test-1c",
        models=("resnet",),
        max_queue=4,
        max_batch_rows=1,
        emulate_latency_ms=100.0,
    )
    try:
        batcher = default_batcher(worker, "resnet")
        request = resnet_request(repository)
        async with (
            grpc.aio.insecure_channel(worker.address) as channel,
            grpc.aio.insecure_channel(worker.address, options=[("probe", 1)]) as probes,
        ):
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            calls = [stub.ModelInfer(request) for _ in range(40)]
            await wait_until(lambda: batcher.stats.shed > 0, what="the queue to shed")
            # The queue is full: 4 waiting, 100 ms each, so the flood is still in flight.
            ready = await pb_grpc.GRPCInferenceServiceStub(probes).ServerReady(
                pb.ServerReadyRequest()
            )
            assert ready.ready
            health = await health_pb2_grpc.HealthStub(probes).Check(
                health_pb2.HealthCheckRequest(service="")
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            outcomes = await asyncio.gather(*(outcome(c) for c in calls))

        codes = [code for code, _, _ in outcomes]
        assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes
        assert codes.count("OK") >= 5  # the one running and the 4 queued behind it
        for code, details, trailers in outcomes:
            if code == "RESOURCE_EXHAUSTED":
                assert details == (
                    "model 'resnet' (variant ort-cpu-fp32): queue full "
                    "(4 requests waiting, limit 4)"
                )
                assert int(trailers[PUSHBACK_TRAILER]) >= 1
        # Every request answered once and counted once: run, or shed without running.
        stats = await statistics(worker, "resnet")
        assert stats.inference_stats.success.count == codes.count("OK")
        assert stats.inference_stats.fail.count == codes.count("RESOURCE_EXHAUSTED")
        assert stats.inference_count == codes.count("OK")
        assert batcher.stats.shed == codes.count("RESOURCE_EXHAUSTED")
    finally:
        await worker.stop()


async def test_past_the_concurrency_limit_grpc_answers_resource_exhausted(
    repository: Path,
) -> None:
    worker = await launch_worker(
        repository,
        threads=1,
        hardware_class="test-1c",
        models=("resnet",),
        max_concurrent_rpcs=8,
        max_batch_rows=1,
        emulate_latency_ms=100.0,
    )
    try:
        request = resnet_request(repository)
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            outcomes = await asyncio.gather(*(outcome(stub.ModelInfer(request)) for _ in range(40)))
        codes = [code for code, _, _ in outcomes]
        assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes
        # What a client sees when gRPC's limit bites: its own message, no trailer.
        assert {d for code, d, _ in outcomes if code != "OK"} == {"Concurrent RPC limit exceeded!"}
        # Those never reached the worker's code: neither run nor counted.
        stats = await statistics(worker, "resnet")
        assert stats.inference_stats.success.count == codes.count("OK")
        assert stats.inference_stats.fail.count == 0
    finally:
        await worker.stop()


async def test_requests_whose_deadline_passes_in_the_queue_are_not_run(repository: Path) -> None:
    worker = await launch_worker(
        repository,
        threads=1,
        hardware_class="test-1c",
        models=("resnet",),
        max_batch_rows=1,
        emulate_latency_ms=500.0,
    )
    try:
        batcher = default_batcher(worker, "resnet")
        request = resnet_request(repository)
        timed = pb.ModelInferRequest()
        timed.CopyFrom(request)
        timed.parameters["timeout"].int64_param = 1000  # Triton's timeout: 1 ms
        overdue = pb.ModelInferRequest()
        overdue.CopyFrom(request)
        overdue.parameters["switchyard_due_us"].int64_param = 1  # a priority, not a deadline
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            slow = asyncio.create_task(outcome(stub.ModelInfer(request)))
            await wait_until(lambda: batcher.running == 1, what="the first request to run")
            waiting = [
                asyncio.create_task(outcome(stub.ModelInfer(timed))),
                asyncio.create_task(outcome(stub.ModelInfer(overdue))),
            ]
            await wait_until(lambda: batcher.waiting == 2, what="two requests to queue")
            short = asyncio.create_task(outcome(stub.ModelInfer(request, timeout=0.1)))
            (
                (slow_code, _, _),
                (timed_code, timed_details, _),
                (overdue_code, _, _),
                (
                    short_code,
                    _,
                    _,
                ),
            ) = await asyncio.gather(slow, *waiting, short)

        assert (slow_code, timed_code, overdue_code, short_code) == (
            "OK",
            "DEADLINE_EXCEEDED",
            "OK",
            "DEADLINE_EXCEEDED",
        )
        assert "deadline passed after" in timed_details
        assert "it was not run" in timed_details
        # Two ran; the two past their deadline are failures that never ran (the gRPC
        # deadline's call is cancelled, or dropped when its batch forms).
        await wait_until(
            lambda: batcher.stats.expired >= 1 and batcher.waiting == 0,
            what="the queue to empty",
        )

        async def both_failed() -> bool:
            return (await statistics(worker, "resnet")).inference_stats.fail.count == 2

        await wait_until(both_failed, what="two failures counted")
        stats = await statistics(worker, "resnet")
        assert stats.inference_stats.success.count == 2
        assert (stats.execution_count, stats.inference_count) == (2, 2)
    finally:
        await worker.stop()


def test_the_fleet_files_max_queue_reaches_the_worker(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)

    def worker_args(launch: LaunchSettings) -> argparse.Namespace:
        backend = BackendSettings(name="b", address="127.0.0.1:0", launch=launch)
        command = worker_command(backend, tmp_path, "127.0.0.1:0")
        return parser.parse_args(command[command.index("backends.worker.server") + 1 :])

    assert worker_args(LaunchSettings(max_queue=16)).max_queue == 16
    assert worker_args(LaunchSettings()).max_queue == 128  # the worker's default
    with pytest.raises(ValueError, match="max_queue"):
        LaunchSettings(max_queue=0)
