"""A worker with no profile for its hardware class measures its variants when it starts
and serves the fastest, through real ONNX Runtime sessions: a model whose fp32 variant
is a chain of CHAIN large MatMuls and whose accepted int8 variant is a single Identity, so
the one is thousands of times slower than the other by construction. Its figures reach
the gateway as the profile parameter, marked as measured at start; a profile for the
worker's class comes first; nothing is written to the repository."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from backends.profiles import Profile, ProfileEntry, write_profile
from backends.protocol.parameters import MEASURED_AT_START, PROFILE_PARAMETER, PROFILED
from backends.repository import (
    AccuracyEntry,
    ArtifactEntry,
    Manifest,
    ModelRepository,
    TensorEntry,
)
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import launch_worker, output, raw_request

MODEL = "chain"
WIDTH = 1024
CHAIN = 48
SLOW = "ort-cpu-fp32"
FAST = "ort-cpu-int8-dyn"
HARDWARE = "test-1c"


def chain_model(length: int) -> onnx.ModelProto:
    """y = x @ I @ I ... (`length` MatMuls of WIDTH x WIDTH); `length` 0: y = Identity(x)."""
    nodes, last = [], "x"
    for i in range(length):
        nodes.append(helper.make_node("MatMul", [last, "w"], [f"h{i}"]))
        last = f"h{i}"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    weights = [numpy_helper.from_array(np.eye(WIDTH, dtype=np.float32), "w")] if length else []
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, WIDTH])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def write_variant(root: Path, name: str, length: int, precision: str) -> None:
    directory = root / MODEL / "variants" / name
    directory.mkdir(parents=True)
    onnx.save_model(chain_model(length), str(directory / "model.onnx"))
    spec = [TensorEntry(name="x", datatype="FP32", shape=[-1, WIDTH])]
    accuracy = AccuracyEntry(
        samples=4, source="samples", max_abs_diff=0.0, tolerance_max_abs_diff=0.1, passed=True
    )
    ModelRepository(root).write_variant(
        Manifest(
            model=MODEL,
            variant=name,
            runtime="onnxruntime",
            runtime_version="1.32.0",
            target="cpu",
            precision=precision,
            max_batch_size=8,
            inputs=spec,
            outputs=[TensorEntry(name="y", datatype="FP32", shape=[-1, WIDTH])],
            artifacts=[
                ArtifactEntry(
                    path="model.onnx",
                    sha256=hashlib.sha256((directory / "model.onnx").read_bytes()).hexdigest(),
                )
            ],
            source_sha256="0" * 64,
            accuracy=accuracy if precision != "fp32" else None,
        )
    )


@pytest.fixture
def chain_repository(tmp_path: Path) -> Path:
    return build_chain_repository(tmp_path / "models")


def build_chain_repository(root: Path) -> Path:
    """The chain model's slow fp32 and fast int8 variants, its samples, no profile."""
    write_variant(root, SLOW, CHAIN, "fp32")
    write_variant(root, FAST, 0, "int8")
    (root / MODEL / "samples").mkdir()
    rows = np.random.default_rng(0).random((4, WIDTH), dtype=np.float32)
    np.savez(root / MODEL / "samples" / "inputs.npz", x=rows)
    return root


def files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


async def config_and_reply(address: str) -> tuple[pb.ModelConfig, pb.ModelInferResponse]:
    x = np.random.default_rng(1).random((2, WIDTH), dtype=np.float32)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        config = (await stub.ModelConfig(pb.ModelConfigRequest(name=MODEL))).config
        reply = await stub.ModelInfer(raw_request(MODEL, {"x": x}, {"x": "FP32"}))
    np.testing.assert_allclose(output(reply, "y", np.float32), x, rtol=1e-6)
    return config, reply


def advertised(config: pb.ModelConfig) -> dict[str, dict[str, Any]]:
    """The worker's `switchyard_profile` parameter, by variant."""
    text = config.parameters[PROFILE_PARAMETER].string_value
    return {entry["variant"]: entry for entry in json.loads(text)}


async def test_without_a_profile_the_worker_serves_the_variant_it_measured_fastest(
    chain_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = files(chain_repository)
    with caplog.at_level(logging.INFO, logger="switchyard.backend"):
        worker = await launch_worker(
            chain_repository, hardware_class=HARDWARE, measure_at_start=True
        )
    try:
        config, reply = await config_and_reply(worker.address)
    finally:
        await worker.stop()
    assert config.parameters["switchyard_variant"].string_value == FAST
    assert reply.parameters["switchyard_variant"].string_param == FAST
    profile = advertised(config)
    assert {v: e["source"] for v, e in profile.items()} == {
        SLOW: MEASURED_AT_START,
        FAST: MEASURED_AT_START,
    }
    # 48 MatMuls against one Identity: not a close call.
    assert profile[SLOW]["p50_ms"] > 10 * profile[FAST]["p50_ms"]
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("serving chain")]
    assert line.startswith(f"serving chain as {FAST} (p50 ") and "measured at start" in line, line
    assert files(chain_repository) == before  # the worker wrote nothing there


async def test_not_measuring_at_start_leaves_fp32_the_default_and_no_prior(
    chain_repository: Path,
) -> None:
    worker = await launch_worker(chain_repository, hardware_class=HARDWARE)
    try:
        config, reply = await config_and_reply(worker.address)
    finally:
        await worker.stop()
    assert config.parameters["switchyard_variant"].string_value == SLOW
    assert reply.parameters["switchyard_variant"].string_param == SLOW
    assert PROFILE_PARAMETER not in config.parameters


async def test_a_profile_for_the_workers_class_comes_before_its_measurement(
    chain_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The slow variant's profile for this class says it is the fastest: the profile is
    what the worker goes by; the other variant, profiled for another class only, is
    measured."""
    for name, hardware, p50_ms in [(SLOW, HARDWARE, 0.001), (FAST, "cpu-x86-64-v4-1c", 0.0005)]:
        write_profile(
            chain_repository / MODEL / "variants" / name,
            Profile(
                model=MODEL,
                variant=name,
                entries=[
                    ProfileEntry(
                        hardware_class=hardware,
                        threads=1,
                        batch_size=1,
                        p50_ms=p50_ms,
                        p99_ms=p50_ms,
                        throughput_per_s=1000 / p50_ms,
                        runs=50,
                    )
                ],
            ),
        )
    with caplog.at_level(logging.INFO, logger="switchyard.backend"):
        worker = await launch_worker(
            chain_repository, hardware_class=HARDWARE, measure_at_start=True
        )
    try:
        config, _ = await config_and_reply(worker.address)
    finally:
        await worker.stop()
    assert config.parameters["switchyard_variant"].string_value == SLOW
    profile = advertised(config)
    assert profile[SLOW] == {
        "variant": SLOW,
        "p50_ms": 0.001,
        "p99_ms": 0.001,
        "row_fraction": None,
        "source": PROFILED,
    }
    assert profile[FAST]["source"] == MEASURED_AT_START
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("serving chain")]
    assert f"profile for {HARDWARE}/1 thread" in line, line
