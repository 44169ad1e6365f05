"""The demo's magika model, compiled from its source: the static QDQ (int8) variant
flips classes against the fp32 source on the sample files, so the compiler rejects
it (kept on disk, marked, with the numbers) while the other variants pass, and a
worker refuses to serve it, saying why."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import grpc
import pytest

from backends.compile.compiler import compile_model
from backends.compile.variants import DEFAULT_TOLERANCES
from backends.repository import ModelRepository
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import launch_worker, raw_request, samples

QDQ = "ort-cpu-int8-qdq"


async def test_the_static_qdq_variant_of_magika_is_rejected_for_flipped_classes(
    repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.copytree(repository / "magika" / "samples", tmp_path / "magika" / "samples")
    outcomes = {
        o.variant: o
        for o in compile_model(
            repository / "magika" / "model.onnx", "magika", ModelRepository(tmp_path)
        )
    }
    assert {v: o.status for v, o in outcomes.items()} == {
        "ort-cpu-fp32": "built",
        "ort-cpu-fp16": "built",
        "ort-cpu-int8-dyn": "built",
        QDQ: "rejected",
    }
    # The reason: its top-1 class agrees with the fp32 source's on too few samples.
    floor = DEFAULT_TOLERANCES["int8"].min_top1_agreement
    detail = re.fullmatch(
        r"64 samples \(samples\): max \|diff\| (\S+), top-1 (\d+\.\d)%", outcomes[QDQ].detail
    )
    assert detail is not None, outcomes[QDQ].detail
    assert float(detail.group(2)) / 100 < floor
    variants = {v.name: v for v in ModelRepository(tmp_path).variants("magika")}
    accuracy = variants[QDQ].manifest.accuracy
    assert accuracy is not None and not accuracy.passed
    assert accuracy.top1_agreement is not None and accuracy.top1_agreement < floor
    assert accuracy.min_top1_agreement == floor and accuracy.samples == 64
    # The dynamic int8 variant, built from the same graph, keeps every class.
    dynamic = variants["ort-cpu-int8-dyn"].manifest.accuracy
    assert dynamic is not None and dynamic.passed and dynamic.top1_agreement == 1.0

    # Kept on disk, never served: a worker over this repository logs why and leaves it out.
    caplog.set_level(logging.WARNING, logger="switchyard.backend")
    worker = await launch_worker(tmp_path, models=("magika",))
    try:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            config = (await stub.ModelConfig(pb.ModelConfigRequest(name="magika"))).config
            served = config.parameters["switchyard_variants"].string_value.split(",")
            assert sorted(served) == ["ort-cpu-fp16", "ort-cpu-fp32", "ort-cpu-int8-dyn"]
            inputs, _ = samples(tmp_path, "magika")
            request = raw_request("magika", {"bytes": inputs["bytes"][:1]}, {"bytes": "INT32"})
            request.parameters["switchyard_variant"].string_param = QDQ
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ModelInfer(request)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await worker.stop()
    logged = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith(f"model magika: variant {QDQ} not served")
    ]
    assert len(logged) == 1, logged
    assert re.fullmatch(
        rf"model magika: variant {QDQ} not served: failed its accuracy check "
        r"\(.*top-1 agreement \d+\.\d% < 99\.0%\)",
        logged[0],
    ), logged[0]
