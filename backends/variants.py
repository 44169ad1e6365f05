"""Builds variants into a model repository (the ONNX Runtime fp32 variant for now).

The variant compiler grows here; each builder writes its artifacts and a
manifest whose sha256 entries the worker verifies before loading.
"""

from __future__ import annotations

import shutil

from backends.ort_adapter import RUNTIME_NAME, RUNTIME_VERSION, signature
from backends.repository import (
    ArtifactEntry,
    Manifest,
    ModelRepository,
    TensorEntry,
    sha256_file,
)
from backends.tensors import TensorSpec

ORT_FP32 = "ort-cpu-fp32"
DEFAULT_MAX_BATCH_SIZE = 64


def batchable(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> bool:
    """True when every tensor has a leading dimension of any size (the batch)."""
    tensors = inputs + outputs
    return bool(tensors) and all(t.shape and t.shape[0] == -1 for t in tensors)


def build_ort_fp32(
    repository: ModelRepository, model: str, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
) -> Manifest:
    """The source model as an ONNX Runtime fp32 variant (graph optimised at load)."""
    source = repository.source(model)
    directory = repository.root / model / "variants" / ORT_FP32
    directory.mkdir(parents=True, exist_ok=True)
    artifact = directory / "model.onnx"
    shutil.copyfile(source, artifact)
    inputs, outputs = signature(artifact)
    manifest = Manifest(
        model=model,
        variant=ORT_FP32,
        runtime=RUNTIME_NAME,
        runtime_version=RUNTIME_VERSION,
        target="cpu",
        precision="fp32",
        max_batch_size=max_batch_size if batchable(inputs, outputs) else 0,
        inputs=[TensorEntry(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in inputs],
        outputs=[
            TensorEntry(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in outputs
        ],
        artifacts=[ArtifactEntry(path=artifact.name, sha256=sha256_file(artifact))],
        source_sha256=sha256_file(source),
    )
    repository.write_variant(manifest)
    return manifest
