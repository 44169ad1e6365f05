"""Variants load from the bytes their manifest's sha256 was checked on, through ONNX
Runtime for real: an ONNX model with external data loads only with every external file
listed and intact; a file swapped after the check is not what runs; the profiler measures
and the bench hands KServe only checked bytes; and a worker over a repository with
tampered variants serves each model from the variants still good, logging every one it
refused and why."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from backends.compile.profiler import measure
from backends.repository import (
    ArtifactEntry,
    Manifest,
    ManifestError,
    ModelRepository,
    TensorEntry,
    Variant,
    VerifiedArtifact,
)
from backends.runtimes.loader import load_adapter
from gateway.bench.harness import BenchError, verified_variant_copy
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import launch_worker, output, raw_request, samples

WIDTH = 4
X = np.arange(2 * WIDTH, dtype=np.float32).reshape(2, WIDTH)
WEIGHTS = "weights.bin"


def matmul_model(weights: np.ndarray) -> onnx.ModelProto:
    """y = x @ weights, x of any batch of WIDTH columns."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, WIDTH])],
        [numpy_helper.from_array(weights, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def weights(scale: float) -> np.ndarray:
    return (np.eye(WIDTH, dtype=np.float32) * scale).astype(np.float32)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_matmul_variant(
    root: Path, model: str, scale: float, external: bool, listed: tuple[str, ...] | None = None
) -> Variant:
    """An ONNX Runtime variant of the matmul model, its weights in `weights.bin` beside
    it when `external`; the manifest lists `listed` (default: every file written)."""
    repository = ModelRepository(root)
    directory = root / model / "variants" / "ort-cpu-fp32"
    directory.mkdir(parents=True)
    path = directory / "model.onnx"
    if external:
        onnx.save_model(
            matmul_model(weights(scale)),
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=WEIGHTS,
            size_threshold=0,
        )
    else:
        onnx.save_model(matmul_model(weights(scale)), str(path))
    written = ("model.onnx", WEIGHTS) if external else ("model.onnx",)
    spec = [TensorEntry(name=n, datatype="FP32", shape=[-1, WIDTH]) for n in ("x",)]
    manifest = Manifest(
        model=model,
        variant="ort-cpu-fp32",
        runtime="onnxruntime",
        runtime_version="1.32.0",
        target="cpu",
        precision="fp32",
        max_batch_size=8,
        inputs=spec,
        outputs=[TensorEntry(name="y", datatype="FP32", shape=[-1, WIDTH])],
        artifacts=[
            ArtifactEntry(path=name, sha256=sha256(directory / name))
            for name in (listed if listed is not None else written)
        ],
        source_sha256="0" * 64,
    )
    repository.write_variant(manifest)
    return repository.read_variant(model, directory)


def run(variant: Variant) -> np.ndarray:
    (y,) = load_adapter(variant, threads=1).run({"x": X}, ["y"])
    return np.asarray(y)


def test_the_demo_models_keep_their_weights_inside_model_onnx(repository: Path) -> None:
    """No demo variant uses ONNX external data: every one is a single artifact."""
    repo = ModelRepository(repository)
    variants = [v for model in repo.models() for v in repo.variants(model)]
    assert variants
    assert all(len(v.manifest.artifacts) == 1 for v in variants)
    for variant in variants:
        proto = onnx.load(str(variant.artifact_path), load_external_data=False)
        assert not any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer), (
            variant.name
        )


def test_external_data_listed_and_intact_loads(tmp_path: Path) -> None:
    variant = write_matmul_variant(tmp_path, "ext", 3.0, external=True)
    assert (variant.directory / WEIGHTS).stat().st_size == WIDTH * WIDTH * 4
    np.testing.assert_array_equal(run(variant), X * 3.0)


def test_tampered_external_data_is_refused(tmp_path: Path) -> None:
    variant = write_matmul_variant(tmp_path, "ext", 3.0, external=True)
    data = bytearray((variant.directory / WEIGHTS).read_bytes())
    data[:4] = np.float32(1000.0).tobytes()
    (variant.directory / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=rf"ext/ort-cpu-fp32: artifact {WEIGHTS} has sha256"):
        load_adapter(variant, threads=1)


def test_external_data_the_manifest_does_not_list_is_never_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The weights file sits beside the model, and in the working directory too, where
    ONNX Runtime would look for a model given as bytes: neither is read."""
    variant = write_matmul_variant(tmp_path, "ext", 3.0, external=True, listed=("model.onnx",))
    monkeypatch.chdir(variant.directory)
    with pytest.raises(Exception, match=f"External data path.*{WEIGHTS}"):
        load_adapter(variant, threads=1)


@dataclass(frozen=True, slots=True)
class SwappedAfterCheck(Variant):
    """A variant whose model file is replaced by another valid model right after its
    bytes are read and checked, before the runtime loads anything."""

    replacement: bytes = b""

    def read_artifacts(self) -> tuple[VerifiedArtifact, ...]:
        verified = Variant.read_artifacts(self)
        (self.directory / "model.onnx").write_bytes(self.replacement)
        return verified


def test_a_file_swapped_after_its_check_is_not_what_loads(tmp_path: Path) -> None:
    checked = write_matmul_variant(tmp_path, "swap", 3.0, external=False)
    replacement = matmul_model(weights(5.0)).SerializeToString()
    swapped = SwappedAfterCheck(
        checked.model, checked.name, checked.directory, checked.manifest, replacement
    )
    np.testing.assert_array_equal(run(swapped), X * 3.0)
    # The swap happened: loading again now refuses the replacement by its hash.
    assert (checked.directory / "model.onnx").read_bytes() == replacement
    with pytest.raises(ManifestError, match=r"swap/ort-cpu-fp32: artifact model\.onnx has sha256"):
        load_adapter(checked, threads=1)


async def test_worker_serves_each_model_from_its_good_variants(
    repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """cnn: three of its four variants are refused (a changed artifact, a manifest whose
    artifact leaves the folder with a valid hash, a manifest that is not JSON), and it is
    served from ort-cpu-fp32. digits: its only variant's artifact is a symbolic link out
    of the folder, so digits is not served. ext: external data, served."""
    root = tmp_path / "repo"
    for model in ("cnn", "digits"):
        shutil.copytree(repository / model, root / model)
    cnn = root / "cnn" / "variants"
    with (cnn / "ort-cpu-fp16" / "model.onnx").open("ab") as artifact:
        artifact.write(b"\0")
    escaping = json.loads((cnn / "ort-cpu-int8-dyn" / "manifest.json").read_text())
    escaping["artifacts"] = [
        {"path": "../ort-cpu-fp32/model.onnx", "sha256": sha256(cnn / "ort-cpu-fp32/model.onnx")}
    ]
    (cnn / "ort-cpu-int8-dyn" / "manifest.json").write_text(json.dumps(escaping))
    (cnn / "ort-cpu-int8-qdq" / "manifest.json").write_text("{not json")
    digits = root / "digits" / "variants" / "ort-cpu-fp32" / "model.onnx"
    shutil.move(digits, tmp_path / "outside.onnx")
    digits.symlink_to(tmp_path / "outside.onnx")
    write_matmul_variant(root, "ext", 2.0, external=True)

    caplog.set_level(logging.WARNING, logger="switchyard.backend")
    worker = await launch_worker(root)
    try:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            config = (await stub.ModelConfig(pb.ModelConfigRequest(name="cnn"))).config
            assert config.parameters["switchyard_variants"].string_value == "ort-cpu-fp32"
            inputs, reference = samples(repository, "cnn")
            reply = await stub.ModelInfer(raw_request("cnn", inputs, {"image": "FP32"}))
            np.testing.assert_allclose(
                output(reply, "probabilities", np.float32),
                reference["probabilities"],
                rtol=1e-4,
                atol=1e-5,
            )
            assert not (await stub.ModelReady(pb.ModelReadyRequest(name="digits"))).ready
            reply = await stub.ModelInfer(raw_request("ext", {"x": X}, {"x": "FP32"}))
            np.testing.assert_array_equal(output(reply, "y", np.float32), X * 2.0)
    finally:
        await worker.stop()
    logged = [r.getMessage() for r in caplog.records if r.name == "switchyard.backend"]
    refused = {
        line.split(" not served: ")[0]: line.split(" not served: ", 1)[1]
        for line in logged
        if " not served: " in line
    }
    assert refused["model cnn: variant ort-cpu-fp16"].startswith(
        "cnn/ort-cpu-fp16: artifact model.onnx has sha256 "
    )
    assert refused["model cnn: variant ort-cpu-int8-dyn"] == (
        "cnn/ort-cpu-int8-dyn: artifact path '../ort-cpu-fp32/model.onnx' refused: it has a "
        "'..' component; artifacts must lie inside the variant's folder"
    )
    assert refused["model cnn: variant ort-cpu-int8-qdq"].startswith(
        "cnn/ort-cpu-int8-qdq: invalid manifest.json"
    )
    assert refused["model digits: variant ort-cpu-fp32"] == (
        "digits/ort-cpu-fp32: artifact model.onnx refused: it goes through a symbolic link "
        "('model.onnx')"
    )
    assert refused["model digits"].startswith("no servable variant")
    assert not any(key.startswith("model ext") for key in refused)


def test_the_profiler_measures_verified_variants_only(tmp_path: Path) -> None:
    variant = write_matmul_variant(tmp_path, "ext", 3.0, external=True)
    (tmp_path / "ext" / "samples").mkdir()
    np.savez(tmp_path / "ext" / "samples" / "inputs.npz", x=X)
    (figures,) = measure(variant.directory, 1, [1], runs=2, delay_ms=0.0)
    assert figures["batch_size"] == 1
    (variant.directory / WEIGHTS).write_bytes(b"\0" * WIDTH * WIDTH * 4)
    with pytest.raises(ManifestError, match=rf"ext/ort-cpu-fp32: artifact {WEIGHTS} has sha256"):
        measure(variant.directory, 1, [1], runs=2, delay_ms=0.0)


def test_the_bench_gives_kserve_a_checked_copy_of_the_listed_files_only(tmp_path: Path) -> None:
    variant = write_matmul_variant(tmp_path / "repo", "ext", 3.0, external=True)
    (variant.directory / "notes.txt").write_text("not listed")
    copy = verified_variant_copy(tmp_path / "repo", "ext", "ort-cpu-fp32", tmp_path / "work")
    assert copy == tmp_path / "work" / "ext" / "ort-cpu-fp32" / "model.onnx"
    assert sorted(p.name for p in copy.parent.iterdir()) == ["model.onnx", WEIGHTS]
    assert copy.read_bytes() == (variant.directory / "model.onnx").read_bytes()
    assert stat.S_IMODE((tmp_path / "work").stat().st_mode) == 0o700
    (variant.directory / WEIGHTS).unlink()
    (variant.directory / WEIGHTS).symlink_to(copy.parent / WEIGHTS)
    with pytest.raises(BenchError, match=rf"ext variant ort-cpu-fp32 refused: .*{WEIGHTS} refused"):
        verified_variant_copy(tmp_path / "repo", "ext", "ort-cpu-fp32", tmp_path / "work")
