"""A foreign backend's metadata is untrusted input: a real gateway probes a real v2
server (in process, on 127.0.0.1:0) that advertises an infinite and an absurd latency
profile and input shapes of terabytes, next to a real worker. The prober keeps going,
the bad figures are left out, the huge models get no latency probe (nothing of their
size is allocated), and the good routes are probed and served."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from gateway.server import Gateway, start_gateway
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import Worker, fleet_config, launch_worker, raw_request
from tests.waiting import wait_until

SHAPES = {
    "small": [-1, 4],
    "huge": [-1, 1 << 40],  # more elements than any tensor may have
    "big": [-1, 1 << 25],  # 128 MiB of FP32 zeros: over a 64 MiB message
    "odd": [-1, -7],  # a negative dimension that is not "any size"
}
PROFILE = json.dumps(
    [
        {"variant": "v1", "p50_ms": math.inf, "p99_ms": 2.0, "row_fraction": None},
        {"variant": "v1", "p50_ms": 1e300, "p99_ms": 1e301, "row_fraction": math.nan},
        {"variant": "v1", "p50_ms": -1.0, "p99_ms": 2.0, "row_fraction": -5},
    ]
)  # json writes Infinity and NaN, as a careless server would


class ForeignServer(pb_grpc.GRPCInferenceServiceServicer):
    """A v2 server describing models nobody should believe; counts what it is asked."""

    def __init__(self) -> None:
        self.ready_calls = 0
        self.inferred: Counter[str] = Counter()

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: object
    ) -> pb.ServerReadyResponse:
        self.ready_calls += 1
        return pb.ServerReadyResponse(ready=True)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: object
    ) -> pb.RepositoryIndexResponse:
        reply = pb.RepositoryIndexResponse()
        for name in SHAPES:
            reply.models.add(name=name, state="READY")
        return reply

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: object
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name in SHAPES)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: object
    ) -> pb.ModelMetadataResponse:
        reply = pb.ModelMetadataResponse(name=request.name, versions=["1"], platform="foreign")
        reply.inputs.add(name="x", datatype="FP32", shape=SHAPES[request.name])
        reply.outputs.add(name="y", datatype="FP32", shape=[-1, 4])
        return reply

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: object
    ) -> pb.ModelConfigResponse:
        config = pb.ModelConfig(name=request.name, max_batch_size=8)
        config.parameters["switchyard_variant"].string_value = "v1"
        config.parameters["switchyard_variants"].string_value = "v1"
        config.parameters["switchyard_profile"].string_value = PROFILE
        return pb.ModelConfigResponse(config=config)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: object
    ) -> pb.ModelInferResponse:
        self.inferred[request.model_name] += 1
        reply = pb.ModelInferResponse(model_name=request.model_name, model_version="1")
        reply.outputs.add(name="y", datatype="FP32", shape=[1, 4])
        reply.raw_output_contents.append(bytes(16))
        return reply


@pytest.fixture
async def foreign() -> AsyncIterator[tuple[ForeignServer, str]]:
    server = grpc.aio.server()
    servicer = ForeignServer()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.fixture
async def gateway(
    repository: object, foreign: tuple[ForeignServer, str]
) -> AsyncIterator[tuple[Gateway, Worker]]:
    worker = await launch_worker(repository, threads=1, models=["digits"])  # type: ignore[arg-type]
    config = fleet_config(
        {"worker": (worker.address, 0.04), "foreign": (foreign[1], 0.01)},
        latency_probe_interval_s=0.2,
    )
    gw = await start_gateway(config)
    yield gw, worker
    await gw.stop()
    await worker.stop()


async def test_untrusted_metadata_neither_stops_the_prober_nor_allocates(
    gateway: tuple[Gateway, Worker], foreign: tuple[ForeignServer, str]
) -> None:
    gw, _ = gateway
    server, _ = foreign
    await wait_until(lambda: server.inferred["small"] >= 2, what="a latency probe of 'small'")
    calls = server.ready_calls
    await wait_until(lambda: server.ready_calls >= calls + 3, what="the prober going on")
    assert set(server.inferred) == {"small"}  # 'huge', 'big' and 'odd' get no probe
    for name in SHAPES:
        routes = gw.fleet.routes(name)
        assert [r.backend for r in routes] == ["foreign"], name
        estimate = routes[0].estimate
        assert math.isfinite(estimate.mean_ms) and math.isfinite(estimate.p99_ms), name
    # The good backend's routes are probed and served as ever.
    async with grpc.aio.insecure_channel(gw.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = raw_request("digits", {"input": np.zeros((1, 64), np.float32)}, {"input": "FP32"})
        reply = await stub.ModelInfer(request)
        assert reply.parameters["switchyard_backend"].string_param == "worker"
        reply = await stub.ModelInfer(
            raw_request("small", {"x": np.zeros((1, 4), np.float32)}, {"x": "FP32"})
        )
        assert reply.parameters["switchyard_backend"].string_param == "foreign"
