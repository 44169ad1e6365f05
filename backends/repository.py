"""The model repository on disk.

Layout::

    <repository>/<model>/model.onnx                      the source model
    <repository>/<model>/samples/inputs.npz              sample inputs (by input name)
    <repository>/<model>/samples/reference.npz           reference outputs for them
    <repository>/<model>/variants/<variant>/manifest.json
    <repository>/<model>/variants/<variant>/<artifacts>  what the manifest lists

A variant is one compiled form of a model (runtime + target + precision). Its
manifest is validated with pydantic (unknown keys are errors). Its artifacts are
confined to the variant's folder: a path that is absolute, has `..`, or goes through a
symbolic link (even one pointing inside the folder) is refused. `Variant.read_artifacts`
reads each artifact once, by file descriptor, and checks those bytes against the
manifest's sha256: the runtimes load the very bytes that were hashed
(`backends.runtimes.loader`), so a file swapped after the check goes unloaded. A variant
whose manifest is bad is refused alone (`VariantScan.refused`); the model's other
variants are unaffected. No runtime is imported here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from backends.files import UnsafePath, confined_parts, read_confined
from backends.protocol.tensors import NUMPY_DTYPES, TensorSpec

log = logging.getLogger("switchyard.repository")

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
    """One file of the variant, relative to the variant's folder (`/`-separated, no
    `..`, not absolute; no symbolic link on the way)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class AccuracyEntry(BaseModel):
    """How the variant compares with the fp32 source model on the sample inputs."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    samples: int
    source: str | None = None
    """Where the sample inputs came from: `calibration`, `samples` (the model's stored
    ones), `random` (seeded, drawn to each input's datatype and range), or one of the
    first two topped up with random rows (`samples+random`)."""
    unchecked: str | None = None
    """Why no check ran (`no samples for BYTES input 'INPUT0'`): samples is 0, and the
    variant serves as built."""
    max_abs_diff: float
    """Largest absolute difference over every float output element; integer outputs
    (other than class labels) count too, string outputs as 0 (all equal) or inf."""
    top1_agreement: float | None = None
    """Share of samples whose top-1 class agrees (classifiers only)."""
    tolerance_max_abs_diff: float
    min_top1_agreement: float | None = None
    passed: bool
    """False: the variant is never served (policy may not override this for int8)."""
    int8_dot: Literal["exact", "saturating", "never-saturates"] | None = None
    """How the CPU that ran the check multiplied int8, for an ONNX Runtime int8 variant
    (`backends.compile.cpu.int8_dot_products`): `exact` (VNNI, AMX) or `saturating`
    (x86-64 without VNNI), with 8-bit weights; `never-saturates`: 7-bit weights, whose
    products never saturate, so every CPU computes what the check saw. A check passed
    where products are exact says nothing of a CPU where they saturate (their outputs
    differ, some models' greatly): such a worker refuses the variant. None: not
    recorded, or not such a variant."""


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
    """Files of the variant; the first is the one the runtime loads, the others what it
    reads beside it (an ONNX model's external data files, by the location the model
    gives them)."""
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
    int8_weight_bits: Literal[7, 8] | None = None
    """An ONNX Runtime int8 variant's weights: 8 bits, or 7 (`reduce_range`), whose
    products with uint8 activations never saturate a CPU without VNNI. None: not int8,
    or not recorded (8)."""
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
        """Raises ManifestError unless every artifact is a regular file inside the
        variant's folder and matches its sha256."""
        self.read_artifacts()

    def read_artifacts(self) -> tuple[VerifiedArtifact, ...]:
        """Every artifact's bytes, in the manifest's order, each read once from inside
        the variant's folder and checked against its sha256 (ManifestError naming the
        variant and the path otherwise). Load these bytes, never the path again."""
        verified = []
        for artifact in self.manifest.artifacts:
            where = f"{self.model}/{self.name}: artifact {artifact.path}"
            try:
                data = read_confined(self.directory, artifact.path)
            except UnsafePath as exc:
                raise ManifestError(f"{where} refused: it {exc}") from exc
            except FileNotFoundError as exc:
                raise ManifestError(f"{where} is missing") from exc
            except OSError as exc:
                raise ManifestError(f"{where} cannot be read: {exc.strerror}") from exc
            digest = hashlib.sha256(data).hexdigest()
            if digest != artifact.sha256:
                raise ManifestError(
                    f"{where} has sha256 {digest}, the manifest says {artifact.sha256}"
                )
            verified.append(VerifiedArtifact(artifact.path, data))
        return tuple(verified)


@dataclass(frozen=True, slots=True)
class VerifiedArtifact:
    """An artifact's bytes, read once and matching the manifest's sha256."""

    path: str
    """As the manifest lists it, relative to the variant's folder."""
    data: bytes


@dataclass(frozen=True, slots=True)
class RefusedVariant:
    """A variant folder whose manifest could not be used, and why."""

    model: str
    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class VariantScan:
    """A model's variant folders: those whose manifests are valid, and those refused."""

    variants: tuple[Variant, ...]
    refused: tuple[RefusedVariant, ...]


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
        """The model's variants whose manifests are valid, sorted by name; each refused
        one is logged with why (`scan` returns them)."""
        scan = self.scan(model)
        for refused in scan.refused:
            log.warning("model %s: variant %s refused: %s", model, refused.name, refused.reason)
        return list(scan.variants)

    def scan(self, model: str) -> VariantScan:
        """The model's variant folders, sorted by name: a bad manifest refuses its own
        variant, never the others."""
        folder = self.root / model / "variants"
        if not folder.is_dir():
            return VariantScan((), ())
        found = []
        refused = []
        for directory in sorted(p for p in folder.iterdir() if p.is_dir()):
            try:
                found.append(self.read_variant(model, directory))
            except ManifestError as exc:
                refused.append(RefusedVariant(model, directory.name, str(exc)))
        return VariantScan(tuple(found), tuple(refused))

    def read_variant(self, model: str, directory: Path) -> Variant:
        """The variant in `directory`, its manifest validated and its artifact paths
        confined to `directory` (ManifestError naming the variant otherwise); the
        artifacts themselves are read by `Variant.read_artifacts`."""
        where = f"{model}/{directory.name}"
        try:
            text = read_confined(directory, MANIFEST)
        except FileNotFoundError as exc:
            raise ManifestError(f"{where}: no {MANIFEST}") from exc
        except UnsafePath as exc:
            raise ManifestError(f"{where}: {MANIFEST} refused: it {exc}") from exc
        except OSError as exc:
            raise ManifestError(f"{where}: {MANIFEST} cannot be read: {exc.strerror}") from exc
        try:
            manifest = Manifest.model_validate(json.loads(text))
        except ValueError as exc:  # JSON, UTF-8 or validation error
            raise ManifestError(f"{where}: invalid {MANIFEST}: {exc}") from exc
        if manifest.model != model or manifest.variant != directory.name:
            raise ManifestError(f"{where}: manifest names {manifest.model}/{manifest.variant}")
        seen = set()
        for artifact in manifest.artifacts:
            try:
                confined_parts(artifact.path)
            except UnsafePath as exc:
                raise ManifestError(
                    f"{where}: artifact path {artifact.path!r} refused: it {exc}; artifacts "
                    "must lie inside the variant's folder"
                ) from exc
            if artifact.path in seen:
                raise ManifestError(f"{where}: artifact {artifact.path!r} is listed twice")
            seen.add(artifact.path)
        return Variant(model=model, name=directory.name, directory=directory, manifest=manifest)

    def write_variant(self, manifest: Manifest) -> Path:
        """Writes a variant's manifest (its artifacts must already be in place)."""
        directory = self.root / manifest.model / "variants" / manifest.variant
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
        return directory
