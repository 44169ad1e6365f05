"""Builds ONNX Runtime variants of a model and checks each against the fp32 source.

Every builder writes its artifact into `<repo>/<model>/variants/<variant>/` and
returns a manifest; `check_accuracy` runs a built variant on the sample inputs
and compares it with the fp32 reference (max abs diff, top-1 agreement for
classifiers). The compiler (`backends.compile.compiler`) drives these and the TVM ones.

Imports ONNX Runtime and onnx (their quantisation and conversion tools); no grpc, no
generated protobuf, nothing from the gateway.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backends.compile.rewrites import prepared_source
from backends.protocol.tensors import TensorSpec
from backends.repository import (
    AccuracyEntry,
    ArtifactEntry,
    Manifest,
    ModelRepository,
    TensorEntry,
    sha256_file,
)
from backends.runtimes.base import Array, RuntimeAdapter
from backends.runtimes.ort import RUNTIME_NAME, RUNTIME_VERSION, OrtAdapter, signature

ORT_FP32 = "ort-cpu-fp32"
ORT_FP16 = "ort-cpu-fp16"
ORT_INT8_DYNAMIC = "ort-cpu-int8-dyn"
ORT_INT8_QDQ = "ort-cpu-int8-qdq"
ORT_CUDA_FP32 = "ort-cuda-fp32"
DEFAULT_MAX_BATCH_SIZE = 64


class BuildSkipped(Exception):
    """The variant does not apply to this model (or its toolchain is missing)."""


FLOAT_PRECISION = "fp32"


def ort_variant_name(precision: str) -> str:
    """`ort-cpu-<precision>`: `ort-cpu-fp32`, or a non-float model's `ort-cpu-int32`."""
    return f"ort-cpu-{precision}"


def compute_type(source: Path) -> str:
    """What the model computes in, which names its full-precision variants: `fp32`
    when any tensor is floating point (an input, output, weight, intermediate or cast
    target), else its widest integer type (`int32`, `int8`, `uint8`, ...), else `bytes`
    (strings only) or `bool`."""
    import onnx
    from onnx import TensorProto

    model = onnx.shape_inference.infer_shapes(onnx.load(str(source), load_external_data=False))
    graph = model.graph
    types = {v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}
    types |= {v.type.tensor_type.elem_type for v in graph.value_info}
    types |= {t.data_type for t in graph.initializer}
    types |= {a.i for n in graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
    types.discard(TensorProto.UNDEFINED)
    integers: list[np.dtype[np.generic]] = []
    for elem in types:
        if elem in (TensorProto.STRING, TensorProto.BOOL):
            continue
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
        if dtype.kind not in "iu":  # float, float16, bfloat16, float8, complex
            return FLOAT_PRECISION
        integers.append(dtype)
    if integers:
        return max(integers, key=lambda d: (d.itemsize, d.kind == "i", d.name)).name
    return "bytes" if TensorProto.STRING in types else "bool"


@dataclass(frozen=True, slots=True)
class Tolerance:
    """How far a variant may stray from the fp32 source on the sample inputs."""

    max_abs_diff: float
    min_top1_agreement: float


# Per precision. fp32 variants differ only by graph rewrites and op order.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(1e-3, 1.0),
    "fp16": Tolerance(5e-2, 0.99),
    "int8": Tolerance(0.25, 0.99),
}
EXACT = Tolerance(0.0, 1.0)
"""A model with no float tensors (int32, int8, strings): every output exactly as the source's."""


@dataclass(frozen=True, slots=True)
class SampleSet:
    """The accuracy gate's inputs: `rows` samples of each input, stacked on a leading
    axis. `batched`: that axis is the model's batch dimension (the samples run as one
    batch); otherwise each row is one whole input of the model (they run one by one)."""

    inputs: Mapping[str, Array]
    rows: int
    batched: bool
    source: str
    """calibration, samples (the model's stored ones), random (seeded), or one of the
    first two topped up with random rows (`samples+random`)."""
    unchecked: str | None = None
    """Why no check can run (`no samples for BYTES input 'INPUT0'`); rows is then 0."""

    def feeds(self) -> list[dict[str, Array]]:
        """One feed per sample row, shaped as the model takes it."""
        if self.batched:
            return [{k: a[i : i + 1] for k, a in self.inputs.items()} for i in range(self.rows)]
        return [{k: a[i] for k, a in self.inputs.items()} for i in range(self.rows)]


def run_samples(
    adapter: RuntimeAdapter, samples: SampleSet, names: Sequence[str]
) -> dict[str, Array]:
    """The named outputs on every sample row, stacked as the inputs are."""
    if samples.batched:
        return dict(zip(names, adapter.run(samples.inputs, names), strict=True))
    runs = [adapter.run(feed, names) for feed in samples.feeds()]
    return {name: np.stack([run[i] for run in runs]) for i, name in enumerate(names)}


def batchable(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> bool:
    """True when every tensor has a leading dimension of any size (the batch)."""
    tensors = inputs + outputs
    return bool(tensors) and all(t.shape and t.shape[0] == -1 for t in tensors)


def tensor_entries(specs: Sequence[TensorSpec]) -> list[TensorEntry]:
    return [TensorEntry(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in specs]


def onnx_manifest(
    repository: ModelRepository,
    model: str,
    variant: str,
    artifact: Path,
    precision: str,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    versions: Mapping[str, str] | None = None,
    rewrites: Sequence[str] = (),
) -> Manifest:
    """The manifest of an ONNX artifact ONNX Runtime loads (its signature read back)."""
    inputs, outputs = signature(artifact)
    return Manifest(
        model=model,
        variant=variant,
        runtime=RUNTIME_NAME,
        runtime_version=RUNTIME_VERSION,
        target="cpu",
        precision=precision,
        max_batch_size=max_batch_size if batchable(inputs, outputs) else 0,
        inputs=tensor_entries(inputs),
        outputs=tensor_entries(outputs),
        artifacts=[ArtifactEntry(path=artifact.name, sha256=sha256_file(artifact))],
        source_sha256=sha256_file(repository.source(model)),
        rewrites=list(rewrites),
        versions={"onnxruntime": RUNTIME_VERSION, **(versions or {})},
    )


def variant_dir(repository: ModelRepository, model: str, variant: str) -> Path:
    directory = repository.root / model / "variants" / variant
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    return directory


def build_ort_fp32(
    repository: ModelRepository,
    model: str,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    precision: str = FLOAT_PRECISION,
) -> Manifest:
    """The source model after ONNX Runtime's portable graph optimisations, saved, as
    `ort-cpu-fp32`; a model with no float tensors names its `precision` (`compute_type`)
    instead: `ort-cpu-int32`."""
    import onnxruntime as ort

    name = ort_variant_name(precision)
    directory = variant_dir(repository, model, name)
    artifact = directory / "model.onnx"
    options = ort.SessionOptions()
    # EXTENDED, not ALL: the saved graph must stay portable across CPUs (ALL adds
    # layout rewrites for the building machine); workers apply ALL when they load.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(artifact)
    source, rewrites = prepared_source(repository.source(model))
    ort.InferenceSession(str(source), sess_options=options, providers=["CPUExecutionProvider"])
    manifest = onnx_manifest(
        repository, model, name, artifact, precision, max_batch_size, rewrites=rewrites
    )
    repository.write_variant(manifest)
    return manifest


def build_ort_cuda_fp32(repository: ModelRepository, model: str) -> Manifest:
    """The source model for ONNX Runtime's CUDA execution provider (onnxruntime-gpu)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BuildSkipped(
            "onnxruntime-gpu is not installed here (no CUDAExecutionProvider); "
            "install it where a CUDA variant for ONNX Runtime is wanted"
        )
    directory = variant_dir(repository, model, ORT_CUDA_FP32)
    artifact = directory / "model.onnx"
    source, rewrites = prepared_source(repository.source(model))
    shutil.copyfile(source, artifact)
    manifest = onnx_manifest(repository, model, ORT_CUDA_FP32, artifact, "fp32", rewrites=rewrites)
    manifest = manifest.model_copy(update={"target": "cuda", "device": "cuda"})
    repository.write_variant(manifest)
    return manifest


def build_ort_fp16(repository: ModelRepository, model: str) -> Manifest:
    """Weights and activations in fp16, inputs and outputs kept fp32 (same signature)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    path, rewrites = prepared_source(repository.source(model))
    source = onnx.load(str(path))
    if any(op.domain == "ai.onnx.ml" for op in source.opset_import) and any(
        node.domain == "ai.onnx.ml" for node in source.graph.node
    ):
        raise BuildSkipped("fp16 conversion does not cover ai.onnx.ml operators")
    directory = variant_dir(repository, model, ORT_FP16)
    artifact = directory / "model.onnx"
    converted = convert_float_to_float16(source, keep_io_types=True)
    onnx.save(converted, str(artifact))
    try:
        OrtAdapter(artifact, threads=1)
    except Exception as exc:  # "where it loads": ONNX Runtime lacks some fp16 CPU kernels
        shutil.rmtree(directory)
        raise BuildSkipped(f"fp16 model does not load in ONNX Runtime: {exc}") from exc
    manifest = onnx_manifest(
        repository,
        model,
        ORT_FP16,
        artifact,
        "fp16",
        versions={"onnx": onnx.__version__},
        rewrites=rewrites,
    )
    repository.write_variant(manifest)
    return manifest


def _preprocessed(source: Path, scratch: Path) -> Path:
    """ONNX Runtime's recommended pre-processing before quantisation (shape inference,
    graph clean-up); the source itself when it does not apply."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # It leaves temporary models in the working directory: give it the scratch one,
    # and absolute paths (resolved here, before the directory changes).
    source, out = source.resolve(), scratch.resolve() / "pre.onnx"
    with contextlib.chdir(scratch):
        try:
            quant_pre_process(str(source), str(out), skip_symbolic_shape=False)
        except Exception:
            return source
    return out


def _has_quantizable_ops(source: Path, ops: set[str]) -> bool:
    import onnx

    return any(node.op_type in ops for node in onnx.load(str(source)).graph.node)


def build_ort_int8_dynamic(
    repository: ModelRepository, model: str, weight_bits: int = 8
) -> Manifest:
    """Dynamic quantisation: int8 weights (`weight_bits` 7: reduce_range, see
    `Manifest.int8_weight_bits`), activations quantised per batch at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, rewrites = prepared_source(repository.source(model))
    if not _has_quantizable_ops(source, {"MatMul", "Gemm", "Conv", "Attention", "LSTM", "GRU"}):
        raise BuildSkipped("no MatMul, Gemm or Conv to quantise")
    directory = variant_dir(repository, model, ORT_INT8_DYNAMIC)
    artifact = directory / "model.onnx"
    with tempfile.TemporaryDirectory() as scratch:
        quantize_dynamic(
            _preprocessed(source, Path(scratch)),
            artifact,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=weight_bits == 7,
        )
    manifest = onnx_manifest(
        repository, model, ORT_INT8_DYNAMIC, artifact, "int8", rewrites=rewrites
    ).model_copy(update={"int8_weight_bits": weight_bits})
    repository.write_variant(manifest)
    return manifest


class _Calibration:
    """Feeds calibration samples to ONNX Runtime's static quantiser, one row at a time."""

    def __init__(self, samples: SampleSet) -> None:
        self._items = iter(samples.feeds())

    def get_next(self) -> dict[str, Array] | None:
        return next(self._items, None)


# Ops that pool or reshape features on their way into the head's dense layer.
_HEAD_INPUT_OPS = frozenset({"GlobalAveragePool", "AveragePool", "Flatten", "Reshape", "Squeeze"})


def _named(model_path: Path, scratch: Path) -> tuple[Path, list[str]]:
    """The model with every node named (quantiser exclusions go by name) and the
    names of its head: its last MatMul or Gemm, and a Softmax reading that
    node's output."""
    import onnx

    model = onnx.load(str(model_path))
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"
    dense = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]
    head = [n.name for n in dense[-1:]]
    if dense:
        producers = {output: n for n in model.graph.node for output in n.output}
        feed = producers.get(dense[-1].input[0])
        while feed is not None and feed.op_type in _HEAD_INPUT_OPS:
            head.append(feed.name)
            feed = producers.get(feed.input[0])
        head += [
            n.name
            for n in model.graph.node
            if n.op_type == "Softmax" and n.input[0] in dense[-1].output
        ]
    out = scratch / "named.onnx"
    onnx.save(model, str(out))
    return out, head


def build_ort_int8_qdq(
    repository: ModelRepository, model: str, calibration: SampleSet, weight_bits: int = 8
) -> Manifest:
    """Static QDQ quantisation, per-channel weights (`weight_bits` 7: reduce_range, see
    `Manifest.int8_weight_bits`), calibrated on `calibration`."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    source, rewrites = prepared_source(repository.source(model))
    if not _has_quantizable_ops(source, {"MatMul", "Gemm", "Conv"}):
        raise BuildSkipped("no MatMul, Gemm or Conv to quantise")
    reader = _Calibration(calibration)
    CalibrationDataReader.register(_Calibration)
    directory = variant_dir(repository, model, ORT_INT8_QDQ)
    artifact = directory / "model.onnx"
    with tempfile.TemporaryDirectory() as scratch:
        prepared, head = _named(_preprocessed(source, Path(scratch)), Path(scratch))
        quantize_static(
            prepared,
            artifact,
            reader,  # a registered virtual subclass of CalibrationDataReader
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # The classifier head (dense layer and its softmax) stays fp32, as is
            # usual: it is a sliver of the compute and where int8 error turns into
            # flipped classes (quantised probabilities also tie close calls).
            nodes_to_exclude=head,
            reduce_range=weight_bits == 7,
        )
    manifest = onnx_manifest(
        repository, model, ORT_INT8_QDQ, artifact, "int8", rewrites=rewrites
    ).model_copy(update={"int8_weight_bits": weight_bits})
    repository.write_variant(manifest)
    return manifest


def reference_outputs(source: Path, samples: SampleSet, quiet: bool = False) -> dict[str, Array]:
    """The source model's outputs on the samples: what every variant is held to.
    `quiet`: a failure is expected and handled (ONNX Runtime logs no error for it)."""
    import onnxruntime as ort

    if quiet:
        ort.set_default_logger_severity(4)  # fatal only
    try:
        adapter = OrtAdapter(source, threads=1)
        return run_samples(adapter, samples, [s.name for s in adapter.outputs])
    finally:
        if quiet:
            ort.set_default_logger_severity(2)  # ONNX Runtime's default: warnings


def _exact(got: Array, expected: Array) -> float:
    """Largest absolute difference of integer outputs; 0 or inf for strings and bools
    (equal everywhere, or not)."""
    if expected.dtype.kind in "iu" and got.dtype.kind in "iu":
        diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
        return float(diff.max()) if diff.size else 0.0
    return 0.0 if np.array_equal(got, expected) else float("inf")


def check_accuracy(
    adapter: RuntimeAdapter,
    samples: SampleSet,
    reference: Mapping[str, Array],
    tolerance: Tolerance,
) -> AccuracyEntry:
    """Runs the variant on the samples and compares with the reference outputs: float
    outputs by their largest absolute difference (and top-1 agreement of class scores),
    class labels by agreement, other integer and string outputs exactly."""
    outputs = run_samples(adapter, samples, list(reference))
    max_diff = 0.0
    agreements: list[float] = []
    for name, expected in reference.items():
        got = outputs[name]
        if got.shape != expected.shape:
            max_diff = float("inf")
        elif expected.dtype.kind == "f":
            diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
            max_diff = max(max_diff, float(diff.max()) if diff.size else 0.0)
            if expected.ndim == 2 and expected.shape[1] > 1:  # class scores
                agreements.append(float(np.mean(got.argmax(1) == expected.argmax(1))))
        elif expected.dtype.kind in "iub" and expected.ndim == 1 and samples.batched:
            agreements.append(float(np.mean(got == expected)))  # class labels
        else:
            max_diff = max(max_diff, _exact(got, expected))
    top1 = min(agreements) if agreements else None
    passed = max_diff <= tolerance.max_abs_diff and (
        top1 is None or top1 >= tolerance.min_top1_agreement
    )
    return AccuracyEntry(
        samples=samples.rows,
        source=samples.source,
        max_abs_diff=max_diff,
        top1_agreement=top1,
        tolerance_max_abs_diff=tolerance.max_abs_diff,
        min_top1_agreement=tolerance.min_top1_agreement if top1 is not None else None,
        passed=passed,
    )


def unchecked_accuracy(samples: SampleSet, tolerance: Tolerance) -> AccuracyEntry:
    """The manifest's entry for a variant no check could run on (`samples.unchecked`
    says why): it serves as built, and says so."""
    return AccuracyEntry(
        samples=0,
        max_abs_diff=0.0,
        tolerance_max_abs_diff=tolerance.max_abs_diff,
        passed=True,
        unchecked=samples.unchecked,
    )


ProgressFn = Callable[[str], None]


def timed(build: Callable[[], Manifest]) -> tuple[Manifest, float]:
    start = time.perf_counter()
    manifest = build()
    return manifest, time.perf_counter() - start
