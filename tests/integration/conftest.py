"""Real gRPC servers on 127.0.0.1 (port 0) in the test's event loop: backend
workers over the demo repository and a gateway in front of them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from backends.worker.server import WorkerSettings, start_worker
from gateway.config import FleetConfig
from gateway.server import Gateway, start_gateway
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc


@dataclass
class Worker:
    address: str
    server: grpc.aio.Server

    async def stop(self) -> None:
        await self.server.stop(None)


async def launch_worker(repository: Path, **settings: object) -> Worker:
    server, port, _models, _executor = await start_worker(
        WorkerSettings(repository=repository, **settings),
        "127.0.0.1:0",  # type: ignore[arg-type]
    )
    return Worker(f"127.0.0.1:{port}", server)


@pytest.fixture
async def worker(repository: Path) -> AsyncIterator[Worker]:
    w = await launch_worker(repository, threads=1, hardware_class="test-1c")
    yield w
    await w.stop()


@pytest.fixture
async def stub(worker: Worker) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(worker.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def fleet_config(addresses: dict[str, tuple[str, float]], **gateway: object) -> FleetConfig:
    return FleetConfig.model_validate(
        {
            "gateway": {
                "listen": "127.0.0.1:0",
                "metrics": "127.0.0.1:0",
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
