"""The model repository on disk.

Layout::

    <repository>/<model>/model.onnx                      the source model
    <repository>/<model>/samples/inputs.npz              sample inputs (by input name)
    <repository>/<model>/samples/reference.npz           reference outputs for them
    <repository>/<model>/variants/<variant>/manifest.json
    <repository>/<model>/variants/<variant>/<artifacts>  what the manifest lists

A variant is one compiled form of a model (runtime + target + precision). Its
manifest is validated with pydantic (unknown keys are errors) and every artifact's
sha256 is checked before a worker loads it. No runtime is imported here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from backends.protocol.tensors import NUMPY_DTYPES, TensorSpec

MANIFEST = "manifest.json"
SOURCE = "model.onnx"


class ManifestError(Exception):
    """A variant's manifest is missing, malformed, or does not match its artifacts."""


class TensorEntry(BaseModel):
    """One tensor of the variant's signature."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    datatype: Literal[tuple(NUMPY_DTYPES)]  # type: ignore[valid-type]
    shape: list[int]
    """Dimensions; -1 for a dimension of any size (the batch dimension among them)."""


class ArtifactEntry(BaseModel):
    """One file of the variant, relative to the variant's folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class AccuracyEntry(BaseModel):
    """How the variant compares with the fp32 source model on the sample inputs."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    samples: int
    max_abs_diff: float
    """Largest absolute difference over every float output element."""
    top1_agreement: float | None = None
    """Share of samples whose top-1 class agrees (classifiers only)."""
    tolerance_max_abs_diff: float
    min_top1_agreement: float | None = None
    passed: bool
    """False: the variant is never served (policy may not override this for int8)."""


class TuningEntry(BaseModel):
    """What tuning went into a compiled variant."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    tuned: bool
    """False: untuned TVM, 10-75x slower than ONNX Runtime on CPU; never preferred."""
    trials: int
    tasks: int
    reused: bool
    """The tuning records already covered every task (no new trials ran)."""


class Manifest(BaseModel):
    """`manifest.json`: what a variant is and which files make it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format_version: Literal[1] = 1
    model: str
    variant: str
    runtime: str
    """Runtime adapter that loads it: `onnxruntime` (more with the variant compiler)."""
    runtime_version: str
    target: str
    """What it was compiled for: `cpu`, `llvm-avx512`, `cuda-sm_90`, ..."""
    precision: str
    """`fp32`, `fp16`, `int8`."""
    max_batch_size: int = Field(ge=0)
    """0: no batch dimension; N: the first dimension of every tensor is a batch of up to N."""
    inputs: list[TensorEntry]
    outputs: list[TensorEntry]
    artifacts: list[ArtifactEntry] = Field(min_length=1)
    """Files of the variant; the first is the one the runtime loads."""
    source_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """sha256 of the source model.onnx it was built from."""
    rewrites: list[str] = []
    """Exact graph rewrites applied to the source before the runtime's own compile
    (`backends.compile.rewrites`), each with its count: `one-hot-matmul-as-gather x1`."""
    versions: dict[str, str] = {}
    """Versions of what built it (onnxruntime, onnx, tvm, ...)."""
    compiled_batch: int | None = None
    """Static batch size of a compiled artifact (TVM); None for a dynamic batch dimension."""
    required_cpu_flags: list[str] = []
    """/proc/cpuinfo flags a CPU needs to run it (avx2, avx512f, ...); workers refuse it
    on CPUs without them."""
    device: str = "cpu"
    """Where it runs: `cpu` or `cuda`."""
    accuracy: AccuracyEntry | None = None
    tuning: TuningEntry | None = None
    build_s: float | None = None
    """Wall time the build took (tuning included)."""


@dataclass(frozen=True, slots=True)
class Variant:
    """A variant found on disk, manifest validated, artifacts not yet verified."""

    model: str
    name: str
    directory: Path
    manifest: Manifest

    @property
    def artifact_path(self) -> Path:
        return self.directory / self.manifest.artifacts[0].path

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in self.manifest.inputs)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in self.manifest.outputs)

    def verify(self) -> None:
        """Raises ManifestError unless every artifact exists and matches its sha256."""
        for artifact in self.manifest.artifacts:
            path = self.directory / artifact.path
            if not path.is_file():
                raise ManifestError(
                    f"{self.model}/{self.name}: artifact {artifact.path} is missing"
                )
            digest = sha256_file(path)
            if digest != artifact.sha256:
                raise ManifestError(
                    f"{self.model}/{self.name}: artifact {artifact.path} has sha256 {digest}, "
                    f"the manifest says {artifact.sha256}"
                )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ModelRepository:
    """Read access to a repository directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def models(self) -> list[str]:
        """Names of the models that have a source model or at least one variant."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and ((p / SOURCE).is_file() or (p / "variants").is_dir())
        )

    def source(self, model: str) -> Path:
        return self.root / model / SOURCE

    def variants(self, model: str) -> list[Variant]:
        """The model's variants, sorted by name; a malformed manifest raises ManifestError."""
        folder = self.root / model / "variants"
        if not folder.is_dir():
            return []
        found = []
        for directory in sorted(p for p in folder.iterdir() if p.is_dir()):
            found.append(self.read_variant(model, directory))
        return found

    def read_variant(self, model: str, directory: Path) -> Variant:
        path = directory / MANIFEST
        try:
            manifest = Manifest.model_validate(json.loads(path.read_text()))
        except FileNotFoundError as exc:
            raise ManifestError(f"{model}/{directory.name}: no {MANIFEST}") from exc
        except ValueError as exc:  # JSON or validation error
            raise ManifestError(f"{model}/{directory.name}: invalid {MANIFEST}: {exc}") from exc
        if manifest.model != model or manifest.variant != directory.name:
            raise ManifestError(
                f"{model}/{directory.name}: manifest names {manifest.model}/{manifest.variant}"
            )
        return Variant(model=model, name=directory.name, directory=directory, manifest=manifest)

    def write_variant(self, manifest: Manifest) -> Path:
        """Writes a variant's manifest (its artifacts must already be in place)."""
        directory = self.root / manifest.model / "variants" / manifest.variant
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
        return directory
