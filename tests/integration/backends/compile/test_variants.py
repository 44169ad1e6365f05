"""The variant compiler and multi-variant workers, with real ONNX Runtime and gRPC:
every applicable variant built and checked against the fp32 source, manifests
that verify, and workers that serve only what passed, as the request asks."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from backends.compile.compiler import compile_model
from backends.compile.variants import DEFAULT_TOLERANCES, Tolerance
from backends.repository import ModelRepository, sha256_file
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests import ROOT
from tests.integration.conftest import Worker, launch_worker, output, raw_request, samples

ORT_VARIANTS = ["ort-cpu-fp16", "ort-cpu-fp32", "ort-cpu-int8-dyn", "ort-cpu-int8-qdq"]


@pytest.fixture(scope="module")
def compiled(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository holding `cnn` compiled from its source model, plus `digits`."""
    root = tmp_path_factory.mktemp("compiled")
    for model in ("cnn", "digits"):
        shutil.copytree(repository / model / "samples", root / model / "samples")
        outcomes = compile_model(repository / model / "model.onnx", model, ModelRepository(root))
        assert all(o.status in ("built", "skipped") for o in outcomes), outcomes
    return root


def test_every_applicable_variant_is_built_and_checked(compiled: Path) -> None:
    repo = ModelRepository(compiled)
    cnn = {v.name: v for v in repo.variants("cnn")}
    assert sorted(cnn) == ORT_VARIANTS
    for variant in cnn.values():
        m = variant.manifest
        assert m.accuracy is not None and m.accuracy.passed and m.accuracy.samples == 64
        assert m.accuracy.top1_agreement is not None and m.accuracy.top1_agreement >= 0.99
        assert m.versions["onnxruntime"] == m.runtime_version
        assert m.artifacts[0].sha256 == sha256_file(variant.artifact_path)
        assert m.source_sha256 == sha256_file(compiled / "cnn" / "model.onnx")
        variant.verify()
    assert cnn["ort-cpu-int8-qdq"].manifest.precision == "int8"
    # The QDQ variant holds QuantizeLinear/DequantizeLinear pairs; the fp16 one fp16 weights.
    assert b"QuantizeLinear" in cnn["ort-cpu-int8-qdq"].artifact_path.read_bytes()
    # digits is an ai.onnx.ml classifier: only fp32 applies.
    assert [v.name for v in repo.variants("digits")] == ["ort-cpu-fp32"]


def test_a_variant_beyond_tolerance_is_rejected_with_numbers(
    repository: Path, tmp_path: Path
) -> None:
    shutil.copytree(repository / "cnn" / "samples", tmp_path / "cnn" / "samples")
    strict = {**DEFAULT_TOLERANCES, "int8": Tolerance(1e-6, 1.0)}
    outcomes = {
        o.variant: o
        for o in compile_model(
            repository / "cnn" / "model.onnx", "cnn", ModelRepository(tmp_path), tolerances=strict
        )
    }
    assert outcomes["ort-cpu-int8-qdq"].status == "rejected"
    assert "max |diff|" in outcomes["ort-cpu-int8-qdq"].detail
    manifest = json.loads(
        (tmp_path / "cnn" / "variants" / "ort-cpu-int8-qdq" / "manifest.json").read_text()
    )
    assert manifest["accuracy"]["passed"] is False
    assert manifest["accuracy"]["max_abs_diff"] > 1e-6


@pytest.fixture
async def variant_worker(compiled: Path) -> AsyncIterator[Worker]:
    worker = await launch_worker(compiled, hardware_class="test")
    yield worker
    await worker.stop()


async def test_worker_serves_each_variant_the_request_names(
    variant_worker: Worker, compiled: Path
) -> None:
    inputs, reference = samples(compiled, "cnn")
    async with grpc.aio.insecure_channel(variant_worker.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        config = (await stub.ModelConfig(pb.ModelConfigRequest(name="cnn"))).config
        assert config.parameters["switchyard_variant"].string_value == "ort-cpu-fp32"
        assert config.parameters["switchyard_variants"].string_value.split(",") == ORT_VARIANTS
        for variant in ORT_VARIANTS:
            req = raw_request("cnn", inputs, {"image": "FP32"})
            req.parameters["switchyard_variant"].string_param = variant
            reply = await stub.ModelInfer(req)
            assert reply.parameters["switchyard_variant"].string_param == variant
            got = output(reply, "probabilities", np.float32)
            assert (got.argmax(1) == reference["probabilities"].argmax(1)).mean() >= 0.99
            np.testing.assert_allclose(got, reference["probabilities"], atol=0.25)
        req = raw_request("cnn", inputs, {"image": "FP32"})
        req.parameters["switchyard_variant"].string_param = "tvm-cuda-sm_90"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(req)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no variant 'tvm-cuda-sm_90' on this backend" in (info.value.details() or "")


async def test_worker_refuses_what_it_must_not_serve(
    compiled: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each refused variant is refused for its own reason, which the worker logs: an
    artifact that still loads but is not the one its manifest's sha256 names, a CPU
    feature this machine lacks, a failed accuracy check; and a precision the worker
    is not allowed."""
    root = tmp_path / "repo"
    shutil.copytree(compiled, root)
    variants = root / "cnn" / "variants"
    # Tampered artifact: a valid model ONNX Runtime loads as before, but not the file
    # the manifest's sha256 names, so only the hash check can refuse it.
    fp16 = ModelRepository(root).read_variant("cnn", variants / "ort-cpu-fp16")
    proto = onnx.load(fp16.artifact_path)
    proto.producer_name = "someone-else"
    onnx.save(proto, fp16.artifact_path)
    ort.InferenceSession(str(fp16.artifact_path), providers=["CPUExecutionProvider"])
    tampered = sha256_file(fp16.artifact_path)
    expected = fp16.manifest.artifacts[0].sha256
    assert tampered != expected
    # Needs a CPU feature this machine lacks.
    manifest_path = variants / "ort-cpu-int8-dyn" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["required_cpu_flags"] = ["avx1024_imaginary"]
    manifest_path.write_text(json.dumps(manifest))
    # Failed its accuracy check.
    manifest_path = variants / "ort-cpu-int8-qdq" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["accuracy"]["passed"] = False
    manifest_path.write_text(json.dumps(manifest))
    caplog.set_level(logging.WARNING, logger="switchyard.backend")
    worker = await launch_worker(root)
    try:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            config = (await stub.ModelConfig(pb.ModelConfigRequest(name="cnn"))).config
            assert config.parameters["switchyard_variants"].string_value == "ort-cpu-fp32"
    finally:
        await worker.stop()
    assert _refusals(caplog, "cnn") == {
        "ort-cpu-fp16": f"cnn/ort-cpu-fp16: artifact model.onnx has sha256 {tampered}, "
        f"the manifest says {expected}",
        "ort-cpu-int8-dyn": "this CPU lacks avx1024_imaginary",
        "ort-cpu-int8-qdq": "failed its accuracy check (marked failed)",
    }
    caplog.clear()
    only_fp32 = await launch_worker(compiled, precisions=("fp32",))
    try:
        async with grpc.aio.insecure_channel(only_fp32.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            config = (await stub.ModelConfig(pb.ModelConfigRequest(name="cnn"))).config
            assert config.parameters["switchyard_variants"].string_value == "ort-cpu-fp32"
    finally:
        await only_fp32.stop()
    assert _refusals(caplog, "cnn") == {
        variant: f"precision {precision} is not allowed here"
        for variant, precision in (
            ("ort-cpu-fp16", "fp16"),
            ("ort-cpu-int8-dyn", "int8"),
            ("ort-cpu-int8-qdq", "int8"),
        )
    }


def _refusals(caplog: pytest.LogCaptureFixture, model: str) -> dict[str, str]:
    """Variant -> why the worker would not serve it, as the worker logged it."""
    prefix = f"model {model}: variant "
    refused = {}
    for record in caplog.records:
        message = record.getMessage()
        if record.name == "switchyard.backend" and message.startswith(prefix):
            variant, _, reason = message[len(prefix) :].partition(" not served: ")
            refused[variant] = reason
    return refused


def test_compile_command_prints_the_table(repository: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "compile",
            str(repository / "cnn" / "model.onnx"),
            "--name",
            "cnn",
            "--repository",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "COLUMNS": "160",
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(ROOT),
        },
        cwd=workdir,
    )
    assert proc.returncode == 0, proc.stderr
    assert list(workdir.iterdir()) == []  # nothing left behind where it ran
    for variant in ORT_VARIANTS:
        assert variant in proc.stdout
    assert "built" in proc.stdout
    assert (tmp_path / "cnn" / "samples" / "inputs.npz").is_file()  # made when none were given
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "compile",
            str(tmp_path / "nope.onnx"),
            "--name",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "no such model file" in bad.stdout


async def test_the_gateway_passes_the_variant_choice_through(compiled: Path) -> None:
    from gateway.server import start_gateway
    from tests.integration.conftest import fleet_config

    worker = await launch_worker(compiled)
    gateway = await start_gateway(fleet_config({"w": (worker.address, 0.1)}))
    try:
        inputs, _ = samples(compiled, "cnn")
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            req = raw_request("cnn", {"image": inputs["image"][:2]}, {"image": "FP32"})
            # Unpinned, the router picks among the routes (which one is its business).
            chosen = (await stub.ModelInfer(req)).parameters["switchyard_variant"].string_param
            assert chosen in ORT_VARIANTS
            for pinned in ("ort-cpu-int8-qdq", "ort-cpu-fp32"):
                req.parameters["switchyard_variant"].string_param = pinned
                reply = await stub.ModelInfer(req)
                assert reply.parameters["switchyard_variant"].string_param == pinned
                assert reply.parameters["switchyard_backend"].string_param == "w"
    finally:
        await gateway.stop()
        await worker.stop()


async def test_worker_serves_a_tvm_variant_but_never_prefers_it_untuned(
    repository: Path, tmp_path: Path
) -> None:
    from backends.compile.compiler import tvm_targets

    shutil.copytree(repository / "cnn" / "samples", tmp_path / "cnn" / "samples")
    outcomes = compile_model(
        repository / "cnn" / "model.onnx",
        "cnn",
        ModelRepository(tmp_path),
        targets=["ort", "tvm-host"],
    )
    host = tvm_targets(["tvm-host"])[0]
    name = f"tvm-{host.name}-fp32-untuned"
    tvm = next(o for o in outcomes if o.variant == name)
    assert tvm.status == "built", tvm.detail
    assert tvm.manifest is not None and tvm.manifest.runtime == "tvm"
    assert tvm.manifest.tuning is not None and not tvm.manifest.tuning.tuned
    assert tvm.manifest.required_cpu_flags == list(host.required_cpu_flags)
    assert tvm.manifest.compiled_batch == 1
    inputs, reference = samples(repository, "cnn")
    worker = await launch_worker(tmp_path)
    try:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            config = (await stub.ModelConfig(pb.ModelConfigRequest(name="cnn"))).config
            assert name in config.parameters["switchyard_variants"].string_value.split(",")
            assert config.parameters["switchyard_variant"].string_value == "ort-cpu-fp32"
            req = raw_request("cnn", {"image": inputs["image"][:5]}, {"image": "FP32"})
            req.parameters["switchyard_variant"].string_param = name
            reply = await stub.ModelInfer(req)
            assert reply.parameters["switchyard_variant"].string_param == name
            np.testing.assert_allclose(
                output(reply, "probabilities", np.float32),
                reference["probabilities"][:5],
                atol=1e-5,
            )
    finally:
        await worker.stop()


def test_targets_that_cannot_be_built_here_say_why(repository: Path, tmp_path: Path) -> None:
    shutil.copytree(repository / "cnn" / "samples", tmp_path / "cnn" / "samples")
    outcomes = {
        o.variant: o
        for o in compile_model(
            repository / "cnn" / "model.onnx",
            "cnn",
            ModelRepository(tmp_path),
            targets=["ort-cuda"],
        )
    }
    assert outcomes["ort-cuda-fp32"].status == "skipped"
    assert "onnxruntime-gpu is not installed" in outcomes["ort-cuda-fp32"].detail
    digits = {
        o.variant: o
        for o in compile_model(
            repository / "digits" / "model.onnx",
            "digits",
            ModelRepository(tmp_path),
            targets=["tvm-llvm-x86-64"],
        )
    }
    assert digits["tvm-llvm-x86-64-fp32-untuned"].status == "skipped"
    assert "ai.onnx.ml" in digits["tvm-llvm-x86-64-fp32-untuned"].detail
    with pytest.raises(ValueError, match="unknown target 'tpu'"):
        compile_model(
            repository / "cnn" / "model.onnx", "cnn", ModelRepository(tmp_path), targets=["tpu"]
        )
    with pytest.raises(ValueError, match="unknown target 'tvm-riscv'"):
        compile_model(
            repository / "cnn" / "model.onnx",
            "cnn",
            ModelRepository(tmp_path),
            targets=["tvm-riscv"],
        )
