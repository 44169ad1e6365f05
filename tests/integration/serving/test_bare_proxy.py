"""The bench's bare proxy (gateway.bench.bare_proxy), a real process in front of a real
worker: it relays ModelInfer over its streams with each caller's own id back, answers
concurrent callers each with their own answer, relays the other methods, and passes a
backend's error on as a status."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from gateway.bench.harness import Child
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import Worker, output, raw_request, samples

ROOT = Path(__file__).resolve().parents[3]


async def test_the_bare_proxy_relays_calls_to_its_backend(
    worker: Worker, repository: Path, tmp_path: Path
) -> None:
    command = [sys.executable, "-m", "gateway.bench.bare_proxy", "--backend", worker.address]
    with Child("bare-proxy", command, tmp_path, ROOT) as child:
        address = child.wait_listening(60)
        assert address.startswith("127.0.0.1:")
        async with (
            grpc.aio.insecure_channel(address) as proxied,
            grpc.aio.insecure_channel(worker.address) as direct,
        ):
            via = pb_grpc.GRPCInferenceServiceStub(proxied)
            to = pb_grpc.GRPCInferenceServiceStub(direct)
            assert (await via.ServerReady(pb.ServerReadyRequest())).ready
            metadata = pb.ModelMetadataRequest(name="digits")
            assert await via.ModelMetadata(metadata) == await to.ModelMetadata(metadata)

            inputs, reference = samples(repository, "digits")
            rows = inputs["input"][:20]

            async def ask(row: int) -> pb.ModelInferResponse:
                request = raw_request("digits", {"input": rows[row : row + 1]}, {"input": "FP32"})
                request.id = f"caller-{row}"
                answer: pb.ModelInferResponse = await via.ModelInfer(request)
                return answer

            answers = await asyncio.gather(*(ask(row) for row in range(len(rows))))
            for row, answer in enumerate(answers):
                assert answer.id == f"caller-{row}"  # the caller's id, not the stream's
                got = output(answer, "probabilities", np.float32)
                want = reference["probabilities"][row : row + 1]
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

            unknown = raw_request("nope", {"input": rows[:1]}, {"input": "FP32"})
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await via.ModelInfer(unknown)
            assert "nope" in (caught.value.details() or "")
            # The stream carried on: the next call is answered.
            assert (await ask(0)).id == "caller-0"
