"""Real gRPC servers on 127.0.0.1 (port 0) in the test's event loop: backend
workers over the demo repository and a gateway in front of them."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from backends.runtimes.base import Array
from backends.worker.batching import Batcher, BatchTrace, RunFn
from backends.worker.served import LoadedVariant, ServedModel, WorkerSettings
from backends.worker.server import WorkerServicer, start_worker
from gateway.config import FleetConfig
from gateway.control.redis_server import RedisServer
from gateway.server import Gateway, start_gateway
from protos import admin_pb2_grpc
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc

GATE_TIMEOUT_S = 60.0
"""The longest an execution waits at a gate the test never opens (a failed test)."""


class Gate:
    """Stands in front of a model's runtime (the worker's `run`): while closed, every
    execution waits at it in its inference thread. Once one is `holding`, the model
    is busy and whatever arrives queues behind it, for as long as the test needs;
    `open` lets them all through. `ran` keeps each execution's inputs, in the order
    the executions reached the runtime, and `spans` when each ran (perf_counter
    seconds, from passing the gate to its end, `delay_s` of emulated work included)."""

    def __init__(self, run: RunFn, closed: bool = True, delay_s: float = 0.0) -> None:
        self._run = run
        self._delay_s = delay_s
        self._open = threading.Event()
        if not closed:
            self._open.set()
        self._reached = threading.Event()
        self.ran: list[dict[str, Array]] = []
        self.spans: list[tuple[float, float]] = []

    @property
    def holding(self) -> bool:
        """An execution is waiting at the closed gate."""
        return self._reached.is_set() and not self._open.is_set()

    def open(self) -> None:
        self._open.set()

    def __call__(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> list[Array]:
        self.ran.append({name: np.array(array, copy=True) for name, array in inputs.items()})
        self._reached.set()
        if not self._open.wait(GATE_TIMEOUT_S):
            raise TimeoutError(f"the gate stayed closed for {GATE_TIMEOUT_S:g} s")
        start = time.perf_counter()
        try:
            if self._delay_s:
                time.sleep(self._delay_s)  # emulated work, in the inference thread
            return self._run(inputs, outputs)
        finally:
            self.spans.append((start, time.perf_counter()))


class CountingBatcher(Batcher):
    """The worker's batcher, counting the requests that have joined its queue (a
    request is queued by the time `arrived` counts it)."""

    def __init__(
        self, run: RunFn, executor: Executor, output_names: Sequence[str], max_batch_size: int
    ) -> None:
        super().__init__(run, executor, output_names, max_batch_size)
        self.arrived = 0

    async def infer_waited(
        self,
        inputs: dict[str, Array],
        rows: int,
        priority: int = 0,
        due_us: int | None = None,
        timeout_s: float | None = None,
        caller: str = "",
        trace: BatchTrace | None = None,
    ) -> tuple[dict[str, Array], int]:
        self.arrived += 1
        return await super().infer_waited(inputs, rows, priority, due_us, timeout_s, caller, trace)


@dataclass
class HeldModel:
    """A served model behind a gate, its queue counted."""

    gate: Gate
    batcher: CountingBatcher

    def rows_run(self, name: str) -> list[bytes]:
        """Input `name`'s rows, each as bytes, in the order the model ran them."""
        return [row.tobytes() for inputs in self.gate.ran for row in inputs[name]]


@dataclass
class Worker:
    address: str
    server: grpc.aio.Server
    models: dict[str, ServedModel] = field(default_factory=dict)
    executor: Executor | None = None
    gates: list[Gate] = field(default_factory=list)
    servicer: WorkerServicer | None = None

    async def hold(
        self, model: str, max_batch_rows: int = 1, closed: bool = True, delay_s: float = 0.0
    ) -> HeldModel:
        """Puts `model`'s default variant behind a gate (closed: the model is busy with
        the first request until the test opens it), with a batcher that counts
        arrivals and merges at most `max_batch_rows` rows, and `delay_s` of emulated
        work per execution."""
        served = self.models[model]
        loaded = served.variants[served.default]
        assert self.executor is not None
        await loaded.batcher.stop()
        gate = Gate(loaded.adapter.run, closed, delay_s)
        outputs = [spec.name for spec in loaded.adapter.outputs]
        batcher = CountingBatcher(gate, self.executor, outputs, max_batch_rows)
        batcher.start()
        served.variants[served.default] = LoadedVariant(loaded.variant, loaded.adapter, batcher)
        self.gates.append(gate)
        return HeldModel(gate, batcher)

    async def stop(self) -> None:
        for gate in self.gates:
            gate.open()
        await self.server.stop(None)


async def launch_worker(repository: Path, **settings: Any) -> Worker:
    server, port, models, executor, servicer = await start_worker(
        WorkerSettings(repository=repository, **settings),
        "127.0.0.1:0",
    )
    return Worker(f"127.0.0.1:{port}", server, models, executor, servicer=servicer)


@pytest.fixture
async def worker(repository: Path) -> AsyncIterator[Worker]:
    w = await launch_worker(repository, threads=1, hardware_class="test-1c")
    yield w
    await w.stop()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of this test's own on a Unix socket (Debian's package; `make test`
    installs it where it can); the test skips, saying why, when there is none."""
    executable = RedisServer.find()
    if executable is None:
        reason = (
            "redis-server is not installed (Debian: apt-get install redis-server, which "
            "`make test` runs as root)"
        )
        print(f"skipped: {reason}")
        pytest.skip(reason)
    # A short folder: a Unix socket's path holds at most 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="redis-", dir="/tmp"))
    server = RedisServer(folder, executable)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def stub(worker: Worker) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(worker.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@asynccontextmanager
async def gateway_clients(
    gw: Gateway,
) -> AsyncIterator[tuple[pb_grpc.GRPCInferenceServiceStub, admin_pb2_grpc.AdminStub]]:
    """Stubs for a running gateway's inference and admin endpoints (it must have one),
    on channels closed at the end."""
    assert gw.admin_address is not None
    async with (
        grpc.aio.insecure_channel(gw.address) as channel,
        grpc.aio.insecure_channel(gw.admin_address) as admin_channel,
    ):
        yield pb_grpc.GRPCInferenceServiceStub(channel), admin_pb2_grpc.AdminStub(admin_channel)


async def server_ready(gw: Gateway) -> bool:
    """The gateway's ServerReady answer (for `wait_until`)."""
    async with grpc.aio.insecure_channel(gw.address) as channel:
        reply = await pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(
            pb.ServerReadyRequest(), timeout=5.0
        )
    return bool(reply.ready)


def fleet_config(addresses: dict[str, tuple[str, float]], **gateway: object) -> FleetConfig:
    return FleetConfig.model_validate(
        {
            "gateway": {
                "listen": "127.0.0.1:0",
                "metrics": "127.0.0.1:0",
                "http": "127.0.0.1:0",
                "probe_interval_s": 0.2,
                **gateway,
            },
            "backends": [
                {"name": name, "address": address, "price_usd_per_hour": price}
                for name, (address, price) in addresses.items()
            ],
        }
    )


@pytest.fixture
async def two_workers(repository: Path) -> AsyncIterator[tuple[Worker, Worker]]:
    a = await launch_worker(repository, threads=1, hardware_class="test-1c")
    b = await launch_worker(repository, threads=1, hardware_class="test-1c")
    yield a, b
    await a.stop()
    await b.stop()


@pytest.fixture
async def gateway(two_workers: tuple[Worker, Worker]) -> AsyncIterator[Gateway]:
    a, b = two_workers
    gw = await start_gateway(fleet_config({"cheap": (a.address, 0.04), "dear": (b.address, 0.08)}))
    yield gw
    await gw.stop()


@pytest.fixture
async def gw_stub(gateway: Gateway) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def samples(repository: Path, model: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    folder = repository / model / "samples"
    return dict(np.load(folder / "inputs.npz")), dict(np.load(folder / "reference.npz"))


def raw_request(
    model: str, inputs: dict[str, np.ndarray], datatypes: dict[str, str]
) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    for name, array in inputs.items():
        req.inputs.add(name=name, datatype=datatypes[name], shape=array.shape)
        req.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return req


def output(response: pb.ModelInferResponse, name: str, dtype: type) -> np.ndarray:
    for index, out in enumerate(response.outputs):
        if out.name == name:
            return np.frombuffer(response.raw_output_contents[index], dtype=dtype).reshape(
                out.shape
            )
    raise KeyError(name)
