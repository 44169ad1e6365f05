"""`switchyard compile`: builds every variant of a model that applies, checks each
against the fp32 source on sample inputs, and records it in the repository.

Variants: ONNX Runtime fp32 (graph-optimised, saved), fp16, int8 dynamic and
int8 static QDQ (per-channel, calibrated); a model with no float tensors gets its
ONNX Runtime variant named for what it computes in (`ort-cpu-int32`) and no
reduced-precision ones; Apache TVM for each CPU ISA level and
CUDA target asked for, or that the hardware classes of a fleet file need, tuned
with MetaSchedule (records kept in the repository and reused). A variant that
does not apply is skipped with the reason; one that misses its accuracy
tolerance is kept on disk, marked rejected with the numbers, and never served.

The accuracy gate runs on at least MIN_SAMPLES samples (`load_samples`): calibration
data, else the model's stored samples, topped up with seeded random rows where they
are fewer. A model with a string (BYTES) input and no sample strings that it takes
gets its full-precision variant unchecked, said so in the manifest and the table.

After building, `run` measures each built variant this host can serve (accuracy passed,
CPU flags present; untuned TVM too, marked) as the profiler does, and records the
figures in its `profile.json` under the hardware class this host stands for
(`--hardware-class`, else named from this CPU's x86-64 level: `cpu-x86-64-v4-1c`), or
under each class of `--fleet` at this host's level; `--no-profile` skips it.

Imports nothing from the gateway (a fleet file's hardware classes are handed in by
gateway.cli) and no grpc or generated protobuf; TVM only inside its builds.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from backends.compile.cpu import cpu_flags, cpu_model, int8_dot_products, missing_flags
from backends.compile.profiler import HardwareClass, measure_in_process, record
from backends.compile.variants import (
    DEFAULT_TOLERANCES,
    EXACT,
    FLOAT_PRECISION,
    ORT_CUDA_FP32,
    ORT_FP16,
    ORT_INT8_DYNAMIC,
    ORT_INT8_QDQ,
    BuildSkipped,
    SampleSet,
    Tolerance,
    batchable,
    build_ort_cuda_fp32,
    build_ort_fp16,
    build_ort_fp32,
    build_ort_int8_dynamic,
    build_ort_int8_qdq,
    check_accuracy,
    compute_type,
    ort_variant_name,
    reference_outputs,
    unchecked_accuracy,
)
from backends.protocol.tensors import NUMPY_DTYPES, TensorSpec
from backends.repository import Manifest, ModelRepository, TuningEntry, Variant
from backends.runtimes.base import Array
from backends.runtimes.loader import load_adapter

if TYPE_CHECKING:
    from backends.compile.tvm.targets import TvmTarget

log = logging.getLogger(__name__)

MIN_SAMPLES = 64
"""The fewest sample rows the accuracy gate runs on."""
RANDOM_INT_HIGH = 16
"""Random integer inputs are drawn from [0, RANDOM_INT_HIGH) (no rows to follow)."""
VOCABULARY_SIZE = 256
"""Random strings are drawn from a seeded vocabulary of this many lowercase words."""
ORT_TARGET = "ort"
ORT_CUDA_TARGET = "ort-cuda"
ProgressFn = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one variant."""

    variant: str
    status: str
    """built, rejected (accuracy), skipped (does not apply), failed (an error)."""
    detail: str
    manifest: Manifest | None = None
    build_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Plan:
    variant: str
    precision: str
    build: Callable[[], Manifest]


def _given(path: Path, inputs: Sequence[TensorSpec], batched: bool, what: str) -> dict[str, Array]:
    """The sample rows of an .npz by input name, stacked on a leading axis (the batch
    axis of a batched model; an unbatched model's rows are whole inputs, and an array
    of the input's own rank is one row). ValueError names what does not fit."""
    try:
        with np.load(path) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what} {path}: not an .npz of plain arrays: {exc}") from exc
    out: dict[str, Array] = {}
    for spec in inputs:
        if spec.name not in arrays:
            have = ", ".join(sorted(arrays)) or "none"
            raise ValueError(f"{what} {path}: no array for input {spec.name!r} (has: {have})")
        array = shown = arrays[spec.name]
        if not batched and array.ndim == len(spec.shape):
            array = array[None]
        dims = spec.shape[1:] if batched else spec.shape
        rank = len(dims) + 1
        if (
            array.ndim != rank
            or len(array) == 0
            or any(d > 0 and d != n for d, n in zip(dims, array.shape[1:], strict=True))
        ):
            raise ValueError(
                f"{what} {path}: input {spec.name!r} has shape {list(shown.shape)}; "
                f"the model takes {list(spec.shape)} (-1: any size)"
                + ("" if batched else ", one row per sample on a leading axis")
            )
        if spec.datatype == "BYTES":
            if array.dtype.kind == "U":
                array = np.char.encode(array, "utf-8")
            if array.dtype.kind != "S":
                raise ValueError(
                    f"{what} {path}: BYTES input {spec.name!r} holds {array.dtype}, not strings"
                )
        else:
            array = array.astype(NUMPY_DTYPES[spec.datatype])
        out[spec.name] = array
    return out


def _vocabulary(rng: np.random.Generator) -> Array:
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
    words = [rng.choice(letters, int(rng.integers(1, 9))).tobytes() for _ in range(VOCABULARY_SIZE)]
    return np.array(words, dtype="S8")


def _random_rows(
    spec: TensorSpec, rows: int, batched: bool, like: Array | None, rng: np.random.Generator
) -> Array:
    """`rows` seeded random rows of one input, drawn to its datatype and to the range
    (or strings) of the given rows `like`; without them, floats in [0, 1), integers in
    [0, RANDOM_INT_HIGH), bools, and words of a seeded vocabulary."""
    if like is not None:
        shape = [rows, *like.shape[1:]]
    else:
        dims = [d if d > 0 else 1 for d in spec.shape]
        shape = [rows, *(dims[1:] if batched else dims)]
    dtype = NUMPY_DTYPES[spec.datatype]
    if spec.datatype == "BYTES":
        vocabulary = np.unique(like) if like is not None else _vocabulary(rng)
        return rng.choice(vocabulary, shape)
    if dtype.kind == "f":
        low, high = (float(like.min()), float(like.max())) if like is not None else (0.0, 1.0)
        return (low + (high - low) * rng.random(shape)).astype(dtype)
    if dtype.kind in "iu":
        low, high = (
            (int(like.min()), int(like.max()) + 1) if like is not None else (0, RANDOM_INT_HIGH)
        )
        high = min(high, int(np.iinfo(np.int64).max))
        return rng.integers(low, high, shape).astype(dtype)
    share = float(np.mean(like.astype(np.float64))) if like is not None else 0.5
    return rng.random(shape) < share


def load_samples(
    repository: ModelRepository,
    model: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    calibration: Path | None,
) -> SampleSet:
    """The accuracy gate's samples, at least MIN_SAMPLES rows: `--calibration` (an .npz
    by input name), else the model's `samples/inputs.npz`; where those hold fewer rows
    (or there are none) seeded random rows drawn to each input's datatype and the given
    rows' range make up the count (`_random_rows`). Batched where the model has a batch
    dimension, row by row where it has not."""
    batched = batchable(tuple(inputs), tuple(outputs))
    given: dict[str, Array] = {}
    source = "random"
    stored = repository.root / model / "samples" / "inputs.npz"
    if calibration is not None:
        given, source = _given(calibration, inputs, batched, "calibration data"), "calibration"
    elif stored.is_file():
        given, source = _given(stored, inputs, batched, "stored samples"), "samples"
    rows = min((len(a) for a in given.values()), default=0)
    if rows >= MIN_SAMPLES:
        return SampleSet({k: a[:rows] for k, a in given.items()}, rows, batched, source)
    rng = np.random.default_rng(0)
    samples: dict[str, Array] = {}
    for spec in inputs:
        like = given[spec.name][:rows] if given else None
        extra = _random_rows(spec, MIN_SAMPLES - rows, batched, like, rng)
        samples[spec.name] = extra if like is None else np.concatenate([like, extra])
    return SampleSet(samples, MIN_SAMPLES, batched, source + "+random" if given else source)


def _skip(reason: str) -> Callable[[], Manifest]:
    def build() -> Manifest:
        raise BuildSkipped(reason)

    return build


def default_int8_weight_bits(flags: frozenset[str]) -> int:
    """The int8 variants' weight bits by default: 8 where this CPU's int8 products are
    exact (VNNI, AMX); else 7, which never saturate, so the accuracy checked here holds
    on every CPU (with 8 bits, a CPU without VNNI saturates and most int8 models fail
    their check there)."""
    return 8 if int8_dot_products(flags) == "exact" else 7


def ort_plans(
    repository: ModelRepository,
    model: str,
    samples: SampleSet,
    compute: str = FLOAT_PRECISION,
    weight_bits: int | None = None,
) -> list[Plan]:
    """ONNX Runtime's variants: full precision, named for what the model computes in,
    and the reduced-precision ones where they apply and their accuracy can be checked
    (int8 weights of `weight_bits`; None: `default_int8_weight_bits` of this CPU)."""
    bits = default_int8_weight_bits(cpu_flags()) if weight_bits is None else weight_bits
    why_not: str | None = None
    if compute != FLOAT_PRECISION:
        why_not = f"no float tensors: the model computes in {compute}"
    elif samples.unchecked is not None:
        why_not = (
            f"unchecked: {samples.unchecked}; reduced precision is built only where "
            "its accuracy is checked"
        )
    return [
        Plan(
            ort_variant_name(compute),
            compute,
            lambda: build_ort_fp32(repository, model, precision=compute),
        ),
        Plan(
            ORT_FP16,
            "fp16",
            _skip(why_not) if why_not else lambda: build_ort_fp16(repository, model),
        ),
        Plan(
            ORT_INT8_DYNAMIC,
            "int8",
            _skip(why_not) if why_not else lambda: build_ort_int8_dynamic(repository, model, bits),
        ),
        Plan(
            ORT_INT8_QDQ,
            "int8",
            _skip(why_not)
            if why_not
            else lambda: build_ort_int8_qdq(repository, model, samples, bits),
        ),
    ]


TVM_PREFIX = "tvm-"
DEFAULT_TVM_BATCH = 1


def tvm_targets(names: Sequence[str]) -> list[TvmTarget]:
    """TVM targets named `tvm-<target>` (`tvm-host`: this CPU's best ISA level)."""
    from backends.compile.tvm.targets import (
        CPU_TARGETS,
        CUDA_TARGETS,
        best_cpu_target,
        host_cpu_flags,
    )

    known = {**CPU_TARGETS, **CUDA_TARGETS}
    found: list[TvmTarget] = []
    for name in names:
        if not name.startswith(TVM_PREFIX):
            continue
        key = name.removeprefix(TVM_PREFIX)
        if key == "host":
            target = best_cpu_target(host_cpu_flags())
        elif key in known:
            target = known[key]
        else:
            raise ValueError(
                f"unknown target {name!r}: tvm-host, " + ", ".join(TVM_PREFIX + k for k in known)
            )
        if target not in found:
            found.append(target)
    return found


# x86-64 microarchitecture level -> CPU target; GPU model -> CUDA architecture.
_X86_64_LEVEL_TARGETS = {
    "1": "llvm-x86-64",
    "2": "llvm-x86-64",
    "3": "llvm-avx2",
    "4": "llvm-avx512",
}
_CUDA_ARCHS = {
    "a100": "sm_80",
    "l4": "sm_89",
    "l40": "sm_89",
    "l40s": "sm_89",
    "ada": "sm_89",
    "h100": "sm_90",
    "h200": "sm_90",
}
_CPU_CLASS = re.compile(r"cpu-x86-64-v(?P<level>[1-4])(?:-.+)?")
_GPU_CLASS = re.compile(r"gpu-cuda-(?P<gpu>[a-z0-9]+)(?:-.+)?")


class UnknownHardwareClass(ValueError):
    """A hardware class whose name says no TVM target."""

    def __init__(self, hardware_class: str) -> None:
        super().__init__(
            f"no TVM target for hardware class {hardware_class!r}: expected "
            "cpu-x86-64-v1..v4[-...] or gpu-cuda-{" + ",".join(_CUDA_ARCHS) + "}[-...]"
        )
        self.hardware_class = hardware_class


def tvm_target_for_class(hardware_class: str) -> str:
    """The TVM target a backend of `hardware_class` needs: `cpu-x86-64-v4-*` ->
    `tvm-llvm-avx512`, `v3` -> `tvm-llvm-avx2`, `v2`/`v1` -> `tvm-llvm-x86-64`;
    `gpu-cuda-h100`/`h200` -> `tvm-cuda-sm_90`, `a100` -> `sm_80`, `l4`/`l40`/`ada` -> `sm_89`."""
    if cpu := _CPU_CLASS.fullmatch(hardware_class):
        return TVM_PREFIX + _X86_64_LEVEL_TARGETS[cpu["level"]]
    gpu = _GPU_CLASS.fullmatch(hardware_class)
    if gpu and gpu["gpu"] in _CUDA_ARCHS:
        return f"{TVM_PREFIX}cuda-{_CUDA_ARCHS[gpu['gpu']]}"
    raise UnknownHardwareClass(hardware_class)


def fleet_targets(hardware_classes: Iterable[str]) -> list[str]:
    """`ort` and the TVM target each hardware class needs, once each, in fleet order."""
    targets = [ORT_TARGET]
    for hardware_class in hardware_classes:
        target = tvm_target_for_class(hardware_class)
        if target not in targets:
            targets.append(target)
    return targets


FleetReader = Callable[[Path], Sequence[tuple[str, str]]]
"""Reads a fleet file into each backend's (name, hardware class); ValueError when it
does not load. The gateway's reader is handed in (gateway.cli): backends import nothing
from the gateway."""


def fleet_file_targets(
    path: Path, backends: Sequence[tuple[str, str]]
) -> tuple[list[str], dict[str, str]]:
    """The targets the hardware classes of the fleet file at `path` need (see
    `fleet_targets`), given its `backends` as (name, hardware class), and each class's
    TVM target. ValueError names the file and, for a class without a target, the
    backends of that class."""
    classes = list(dict.fromkeys(hardware_class for _, hardware_class in backends))
    try:
        return fleet_targets(classes), {c: tvm_target_for_class(c) for c in classes}
    except UnknownHardwareClass as exc:
        names = ", ".join(name for name, c in backends if c == exc.hardware_class)
        raise ValueError(f"{path}: backend {names}: {exc}") from exc


_X86_64_V2 = ("cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3")
_CORES = re.compile(r".+-(?P<cores>[1-9][0-9]*)c")


def host_cpu_level(flags: frozenset[str]) -> int:
    """This CPU's x86-64 microarchitecture level as the fleet's hardware classes name
    it: 4 with AVX-512 (what tvm-llvm-avx512 needs), 3 with AVX2 (tvm-llvm-avx2), 2
    with SSE4.2 and POPCNT, else 1."""
    from backends.compile.tvm.targets import best_cpu_target

    best = best_cpu_target(flags).name
    if best == "llvm-avx512":
        return 4
    if best == "llvm-avx2":
        return 3
    return 2 if set(_X86_64_V2) <= flags else 1


def host_hardware_class(flags: frozenset[str], threads: int = 1) -> str:
    """The hardware class this host stands for at `threads` cores, in the fleet's
    naming: `cpu-x86-64-v4-1c`."""
    return f"cpu-x86-64-v{host_cpu_level(flags)}-{threads}c"


def class_threads(hardware_class: str) -> int | None:
    """The cores a hardware class's name gives (`cpu-x86-64-v4-2c`: 2), else None."""
    cores = _CORES.fullmatch(hardware_class)
    return int(cores["cores"]) if cores else None


def profile_classes(
    hardware_class: str | None,
    threads: int,
    fleet_classes: Sequence[str],
    flags: frozenset[str],
    cores_here: int,
) -> tuple[list[HardwareClass], list[str]]:
    """The hardware classes `compile` measures its variants as on this host, and why
    each other class of the fleet is left out. `hardware_class` given: that one at
    `threads`. Else the fleet's CPU classes of this host's x86-64 level (a faster or
    slower CPU's figures would stand for neither), each at the cores its name gives
    (else `threads`) where this host has that many; none of those: the class this host
    stands for (`host_hardware_class`) at `threads`."""
    if hardware_class is not None:
        return [HardwareClass(hardware_class, threads)], []
    level = host_cpu_level(flags)
    chosen: list[HardwareClass] = []
    left: list[str] = []
    for name in dict.fromkeys(fleet_classes):
        cpu = _CPU_CLASS.fullmatch(name)
        wanted = class_threads(name) or threads
        if cpu is None:
            left.append(f"{name}: not a CPU class")
        elif int(cpu["level"]) != level:
            left.append(f"{name}: this host is x86-64-v{level}")
        elif wanted > cores_here:
            left.append(f"{name}: needs {wanted} cores, this host has {cores_here}")
        else:
            chosen.append(HardwareClass(name, wanted))
    return chosen or [HardwareClass(host_hardware_class(flags, threads), threads)], left


PROFILE_BATCH_SIZES = (1, 8)
"""Batch sizes `compile` measures (batch 8 gives the row fraction); untuned TVM: 1 only."""
DEFAULT_PROFILE_RUNS = 20
"""Timed calls per batch size when `compile` measures a variant."""


@dataclass(frozen=True, slots=True)
class Measurement:
    """What `compile` measured of one variant on one hardware class, as the table shows it."""

    p50_ms: float | None
    """At batch 1; None when not measured."""
    note: str = ""
    """`untuned`; or why it was not measured (`this CPU lacks avx512f`)."""
    failed: bool = False

    @property
    def cell(self) -> str:
        if self.p50_ms is None:
            return self.note
        return f"{self.p50_ms:.3g}" + (f" ({self.note})" if self.note else "")


def not_measurable(outcome: Outcome, flags: frozenset[str], samples: Path) -> str | None:
    """Why `compile` does not measure this variant here (what a worker here would not
    serve, or nothing to time it on), or None."""
    manifest = outcome.manifest
    if outcome.status != "built" or manifest is None:
        return ""
    if manifest.device != "cpu":
        return f"needs a {manifest.device} device"
    missing = missing_flags(manifest.required_cpu_flags, flags)
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if not samples.is_file():
        return "no stored samples to time on"
    return None


def profile_outcomes(
    repository: ModelRepository,
    model: str,
    outcomes: Sequence[Outcome],
    classes: Sequence[HardwareClass],
    flags: frozenset[str],
    runs: int = DEFAULT_PROFILE_RUNS,
    progress: ProgressFn | None = None,
) -> dict[tuple[str, str], Measurement]:
    """Measures each built variant this host can serve on each of `classes` (in a
    pinned process of its own, `profiler.measure_in_process`) and records the figures
    in its profile.json; by (variant, class name)."""
    say = progress or (lambda _: None)
    samples = repository.root / model / "samples" / "inputs.npz"
    found: dict[tuple[str, str], Measurement] = {}
    for outcome in outcomes:
        why_not = not_measurable(outcome, flags, samples)
        if why_not is not None or outcome.manifest is None:
            for hardware in classes:
                found[(outcome.variant, hardware.name)] = Measurement(None, why_not or "")
            continue
        variant = repository.read_variant(
            model, repository.root / model / "variants" / outcome.variant
        )
        tuning = outcome.manifest.tuning
        untuned = tuning is not None and not tuning.tuned
        batch_sizes = PROFILE_BATCH_SIZES[:1] if untuned else PROFILE_BATCH_SIZES
        entries = []
        for hardware in classes:
            say(f"{model}: measuring {outcome.variant} as {hardware.name}")
            try:
                measured = measure_in_process(variant, hardware, batch_sizes, runs)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                log.warning(
                    "%s: %s not measured on %s: %s", model, variant.name, hardware.name, exc
                )
                found[(outcome.variant, hardware.name)] = Measurement(
                    None, f"failed: {exc}", failed=True
                )
                continue
            entries += measured
            single = next((e for e in measured if e.batch_size == 1), None)
            found[(outcome.variant, hardware.name)] = Measurement(
                single.p50_ms if single else None, "untuned" if untuned else ""
            )
        if entries:
            record(variant, entries)
    return found


def tvm_input_shapes(inputs: Sequence[TensorSpec]) -> dict[str, list[int]]:
    """The static input shapes TVM compiles a model's inputs with: a dynamic (batch)
    dimension becomes DEFAULT_TVM_BATCH."""
    return {s.name: [DEFAULT_TVM_BATCH if d < 0 else d for d in s.shape] for s in inputs}


def build_tvm(
    repository: ModelRepository,
    model: str,
    target: TvmTarget,
    trials: int,
    records_from: Path | None = None,
    precision: str = FLOAT_PRECISION,
) -> Manifest:
    """The model compiled by Apache TVM for `target` (static batch of 1), tuned with
    `trials` MetaSchedule trials (records kept under `<model>/tuning/` and reused; those
    of a tuning folder `records_from`, such as a demo model's committed records, are
    taken first, see `tvm.build.compile_onnx`)."""
    from backends.compile.rewrites import prepared_source
    from backends.compile.tvm.build import compile_onnx
    from backends.compile.tvm.importer import TvmImportError
    from backends.compile.tvm.toolchain import ToolchainMissing
    from backends.compile.variants import (
        DEFAULT_MAX_BATCH_SIZE,
        batchable,
        tensor_entries,
        variant_dir,
    )
    from backends.repository import ArtifactEntry, sha256_file
    from backends.runtimes.ort import signature

    source, rewrites = prepared_source(repository.source(model))
    inputs, outputs = signature(source)
    batched = batchable(inputs, outputs)
    shapes = tvm_input_shapes(inputs)
    name = tvm_variant_name(target.name, trials, precision)
    directory = variant_dir(repository, model, name)
    try:
        build = compile_onnx(
            source,
            directory,
            target,
            shapes,
            tuning_dir=repository.root / model / "tuning",
            trials=trials,
            records_from=records_from if trials > 0 else None,
        )
    except (TvmImportError, ToolchainMissing) as exc:
        shutil.rmtree(directory, ignore_errors=True)
        raise BuildSkipped(str(exc)) from exc
    manifest = Manifest(
        model=model,
        variant=name,
        runtime="tvm",
        runtime_version=build.tvm_version,
        target=target.name,
        precision=precision,
        max_batch_size=DEFAULT_MAX_BATCH_SIZE if batched else 0,
        inputs=tensor_entries(inputs),
        outputs=tensor_entries(outputs),
        artifacts=[ArtifactEntry(path=build.library.name, sha256=sha256_file(build.library))],
        source_sha256=sha256_file(repository.source(model)),
        rewrites=rewrites,
        versions={"tvm": build.tvm_version},
        compiled_batch=DEFAULT_TVM_BATCH if batched else 0,
        required_cpu_flags=list(target.required_cpu_flags),
        device="cuda" if target.is_cuda else "cpu",
        tuning=TuningEntry(
            tuned=build.tuned,
            trials=build.trial_budget if build.tuned else 0,
            tasks=build.tasks,
            reused=build.tuning_reused,
        ),
    )
    repository.write_variant(manifest)
    return manifest


def tvm_variant_name(target: str, trials: int, precision: str = FLOAT_PRECISION) -> str:
    """`tvm-llvm-avx512-fp32` (a model with no float tensors: `-int32`, ...); an
    untuned build says so in its name, so it never replaces a tuned one."""
    return f"tvm-{target}-{precision}" + ("" if trials > 0 else "-untuned")


def tvm_plans(
    repository: ModelRepository,
    model: str,
    targets: Sequence[str],
    trials: int,
    records_from: Path | None = None,
    compute: str = FLOAT_PRECISION,
    strings: Sequence[str] = (),
) -> list[Plan]:
    """A TVM build per target; `strings` (the model's BYTES tensors) rule TVM out."""
    plans = []
    for target in tvm_targets(targets):
        build: Callable[[], Manifest] = (
            _skip(f"Apache TVM takes no string tensors (BYTES {strings[0]!r})")
            if strings
            else lambda t=target: build_tvm(  # type: ignore[misc]
                repository, model, t, trials, records_from, compute
            )
        )
        plans.append(Plan(tvm_variant_name(target.name, trials, compute), compute, build))
    return plans


def compile_model(
    source: Path,
    name: str,
    repository: ModelRepository,
    *,
    targets: Sequence[str] = (ORT_TARGET,),
    calibration: Path | None = None,
    trials: int = 0,
    tuning_records: Path | None = None,
    tolerances: Mapping[str, Tolerance] = DEFAULT_TOLERANCES,
    progress: ProgressFn | None = None,
    extra_plans: Callable[[ModelRepository, str, SampleSet], list[Plan]] | None = None,
    int8_weight_bits: int | None = None,
) -> list[Outcome]:
    """Builds and checks the variants of `source` as model `name`. `tuning_records`: a
    tuning folder (`<folder>/<target>/`) whose records tuned TVM builds take before
    tuning (`backends.compile.tvm.tuning.records_for(name)` for a demo model).
    `int8_weight_bits`: 7 or 8 (None: as this CPU needs, `default_int8_weight_bits`)."""
    say = progress or (lambda _: None)
    unknown = [
        t
        for t in targets
        if t not in (ORT_TARGET, ORT_CUDA_TARGET) and not t.startswith(TVM_PREFIX)
    ]
    if unknown:
        raise ValueError(
            f"unknown target {unknown[0]!r}: "
            f"{ORT_TARGET}, {ORT_CUDA_TARGET}, tvm-host, tvm-<target>"
        )
    tvm_targets([t for t in targets if t.startswith(TVM_PREFIX)])  # fails early on a bad name
    destination = repository.source(name)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if source.resolve() != destination.resolve():
        shutil.copyfile(source, destination)
    from backends.runtimes.ort import signature

    inputs, outputs = signature(destination)
    compute = compute_type(destination)
    samples = load_samples(repository, name, inputs, outputs, calibration)
    reference, unchecked = _reference(destination, samples, inputs)
    if unchecked is not None:
        samples = SampleSet({}, 0, samples.batched, samples.source, unchecked)
    elif not (stored := repository.root / name / "samples" / "inputs.npz").is_file():
        # What the profiler (and the worker, measuring at start) times the variants on:
        # the check's own rows (random ones, or the first of the calibration data).
        stored.parent.mkdir(parents=True, exist_ok=True)
        np.savez(stored, **{k: a[:MIN_SAMPLES] for k, a in samples.inputs.items()})  # type: ignore[arg-type]
    plans: list[Plan] = []
    if ORT_TARGET in targets:
        plans += ort_plans(repository, name, samples, compute, int8_weight_bits)
    if ORT_CUDA_TARGET in targets:
        plans.append(Plan(ORT_CUDA_FP32, "fp32", lambda: build_ort_cuda_fp32(repository, name)))
    if any(t.startswith(TVM_PREFIX) for t in targets):
        strings = [t.name for t in (*inputs, *outputs) if t.datatype == "BYTES"]
        plans += tvm_plans(repository, name, targets, trials, tuning_records, compute, strings)
    if extra_plans is not None:
        plans += extra_plans(repository, name, samples)
    outcomes = []
    for plan in plans:
        say(f"{name}: building {plan.variant}")
        outcome = _build(
            repository, name, plan, samples, reference, _tolerance(tolerances, compute)
        )
        if outcome.status in ("skipped", "failed"):
            log.info("%s: %s %s: %s", name, outcome.variant, outcome.status, outcome.detail)
        outcomes.append(outcome)
    return outcomes


def _tolerance(tolerances: Mapping[str, Tolerance], compute: str) -> Callable[[str], Tolerance]:
    """A variant's tolerance by its precision; a model with no float tensors: EXACT."""
    if compute != FLOAT_PRECISION:
        return lambda _: EXACT
    return lambda precision: tolerances.get(precision, EXACT)


def _reference(
    source: Path, samples: SampleSet, inputs: Sequence[TensorSpec]
) -> tuple[dict[str, Array], str | None]:
    """The source model's outputs on the samples, or why there are none: random
    strings a model does not take (it casts decimal numbers, say) leave its variants
    unchecked. ValueError when the model fails on given samples or random numbers."""
    strings = [s.name for s in inputs if s.datatype == "BYTES"]
    random_strings = bool(strings) and samples.source == "random"
    try:
        return reference_outputs(source, samples, quiet=random_strings), None
    except Exception as exc:
        if random_strings:
            return {}, f"no samples for BYTES input {strings[0]!r}"
        raise ValueError(
            f"the source model fails on its {samples.rows} sample inputs ({samples.source}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _build(
    repository: ModelRepository,
    model: str,
    plan: Plan,
    samples: SampleSet,
    reference: Mapping[str, Array],
    tolerance_for: Callable[[str], Tolerance],
) -> Outcome:
    start = time.perf_counter()
    try:
        manifest = plan.build()
    except BuildSkipped as exc:
        return Outcome(plan.variant, "skipped", str(exc))
    except Exception as exc:  # a builder's failure is one row of the table, not the end
        return Outcome(plan.variant, "failed", f"{type(exc).__name__}: {exc}")
    build_s = time.perf_counter() - start
    variant = Variant(
        model, manifest.variant, repository.root / model / "variants" / manifest.variant, manifest
    )
    # Built for other hardware (a GPU, or CPU features this host lacks: a fleet's
    # AVX-512 class compiled on an AVX2 host): written unchecked, for the worker that
    # runs it. Running it here would kill the process (an illegal instruction).
    elsewhere = None
    if manifest.device != "cpu":
        elsewhere = f"needs a {manifest.device} device"
    elif missing := missing_flags(manifest.required_cpu_flags, cpu_flags()):
        elsewhere = f"this CPU lacks {', '.join(missing)}"
    if elsewhere is not None:
        manifest = manifest.model_copy(update={"build_s": build_s})
        repository.write_variant(manifest)
        return Outcome(manifest.variant, "built", f"not checked: {elsewhere}", manifest, build_s)
    tolerance = tolerance_for(manifest.precision)
    try:
        adapter = load_adapter(variant, threads=1)
        if samples.unchecked is not None:
            accuracy = unchecked_accuracy(samples, tolerance)
        else:
            accuracy = check_accuracy(adapter, samples, reference, tolerance)
            if manifest.runtime == "onnxruntime" and manifest.precision == "int8":
                dot = (
                    "never-saturates"
                    if manifest.int8_weight_bits == 7
                    else int8_dot_products(cpu_flags())
                )
                accuracy = accuracy.model_copy(update={"int8_dot": dot})
    except Exception as exc:
        return Outcome(manifest.variant, "failed", f"check failed: {type(exc).__name__}: {exc}")
    manifest = manifest.model_copy(update={"accuracy": accuracy, "build_s": build_s})
    repository.write_variant(manifest)
    if accuracy.unchecked is not None:
        detail = f"unchecked: {accuracy.unchecked}"
    else:
        detail = (
            f"{accuracy.samples} samples ({accuracy.source}): max |diff| "
            + (f"{accuracy.max_abs_diff:.2g}")
            + (
                f", top-1 {accuracy.top1_agreement:.1%}"
                if accuracy.top1_agreement is not None
                else ""
            )
        )
    if manifest.tuning is not None:
        tuning = manifest.tuning
        detail += (
            f", tuned {tuning.trials} trials / {tuning.tasks} tasks"
            + (" (records reused)" if tuning.reused else "")
            if tuning.tuned
            else ", untuned (never preferred)"
        )
    status = "built" if accuracy.passed else "rejected"
    return Outcome(manifest.variant, status, detail, manifest, build_s)


def parse_tolerances(items: Sequence[str]) -> dict[str, Tolerance]:
    """`int8=0.1` or `int8=0.1:0.98` (max abs diff, min top-1 agreement) per precision."""
    tolerances = dict(DEFAULT_TOLERANCES)
    for item in items:
        precision, _, value = item.partition("=")
        if precision not in tolerances or not value:
            raise ValueError(f"bad --tolerance {item!r}: expected PRECISION=MAXDIFF[:MINTOP1]")
        diff, _, top1 = value.partition(":")
        base = tolerances[precision]
        tolerances[precision] = Tolerance(
            float(diff), float(top1) if top1 else base.min_top1_agreement
        )
    return tolerances


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="the ONNX model to compile")
    parser.add_argument("--name", required=True, help="model name in the repository")
    parser.add_argument("--repository", type=Path, default=Path("models"))
    parser.add_argument(
        "--targets",
        nargs="+",
        default=None,
        help=f"what to build: {ORT_TARGET} (ONNX Runtime fp32, fp16, int8), {ORT_CUDA_TARGET}, "
        "tvm-host, tvm-llvm-x86-64, tvm-llvm-avx2, tvm-llvm-avx512, tvm-cuda-sm_80/89/90 "
        f"(default: {ORT_TARGET}; with --fleet: built as well as the fleet's)",
    )
    parser.add_argument(
        "--fleet",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"fleet file: build {ORT_TARGET} and the TVM target each backend's hardware class "
        "needs (cpu-x86-64-v4-*: tvm-llvm-avx512, v3: tvm-llvm-avx2, v1/v2: tvm-llvm-x86-64; "
        "gpu-cuda-h100/h200: tvm-cuda-sm_90, a100: tvm-cuda-sm_80, l4/l40/ada: tvm-cuda-sm_89)",
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="sample inputs (.npz by input name) for calibration and checks",
    )
    parser.add_argument(
        "--trials", type=int, default=0, help="MetaSchedule trials per TVM target (0: untuned)"
    )
    parser.add_argument(
        "--tuning-records",
        type=Path,
        default=None,
        metavar="DIR",
        help="a tuning folder (DIR/<target>/, MetaSchedule's JSON database) whose records "
        "tuned TVM builds take before tuning; default: the records committed for the demo "
        "model of the same name, if any (applied only to operators identical to theirs)",
    )
    parser.add_argument(
        "--tolerance",
        action="append",
        default=[],
        help="PRECISION=MAXDIFF[:MINTOP1], e.g. int8=0.1:0.99",
    )
    parser.add_argument(
        "--int8-weight-bits",
        type=int,
        choices=(7, 8),
        default=None,
        metavar="{7,8}",
        help="weights of the ONNX Runtime int8 variants: 8, or 7, whose products never "
        "saturate a CPU without VNNI (default: 8 on a CPU with VNNI or AMX, else 7; a "
        "variant of 8 checked with VNNI is refused by workers without it: build with 7 "
        "for a fleet with such CPUs)",
    )
    parser.add_argument(
        "--hardware-class",
        default=None,
        metavar="NAME",
        help="after building, measure each variant this host can serve and write its "
        "profile.json as hardware class NAME (default: this CPU's x86-64 level and "
        "--profile-threads, e.g. cpu-x86-64-v4-1c; with --fleet: each of its classes of "
        "this host's level, at the cores its name gives)",
    )
    parser.add_argument(
        "--profile-threads",
        type=int,
        default=1,
        metavar="N",
        help="threads (and pinned cores) the variants are measured with (default: 1)",
    )
    parser.add_argument(
        "--profile-runs",
        type=int,
        default=DEFAULT_PROFILE_RUNS,
        metavar="N",
        help=f"timed calls per batch size ({', '.join(map(str, PROFILE_BATCH_SIZES))}) "
        f"when measuring (default: {DEFAULT_PROFILE_RUNS})",
    )
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the variants after building (default: on; --no-profile skips it)",
    )


def _samples_cell(manifest: Manifest | None) -> str:
    """The table's samples column: how many the check ran on, and where they came from."""
    accuracy = manifest.accuracy if manifest else None
    if accuracy is None:
        return ""
    if accuracy.unchecked is not None:
        return "unchecked"
    return f"{accuracy.samples} {accuracy.source or ''}".strip()


def run(args: argparse.Namespace, read_fleet: FleetReader | None = None) -> int:
    """`switchyard compile`; `read_fleet` reads `--fleet` (required with it)."""
    from rich.console import Console
    from rich.table import Table

    from backends.compile.tvm.tuning import records_for

    console = Console(width=max(Console().width, 132))
    if not args.model.is_file():
        console.print(f"[red]no such model file: {args.model}[/red]")
        return 2
    try:
        tolerances = parse_tolerances(args.tolerance)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        return 2
    if args.profile_threads < 1 or args.profile_runs < 1:
        console.print("[red]--profile-threads and --profile-runs must be at least 1[/red]")
        return 2
    targets: list[str] = list(args.targets or [])
    fleet_classes: list[str] = []
    if args.fleet is not None:
        try:
            if read_fleet is None:
                raise ValueError("--fleet: no fleet file reader was given")
            backends = read_fleet(args.fleet)
            fleet_classes = [hardware_class for _, hardware_class in backends]
            chosen, by_class = fleet_file_targets(args.fleet, backends)
        except ValueError as exc:
            console.print(str(exc), style="red", markup=False, highlight=False, soft_wrap=True)
            return 2
        targets = chosen + [t for t in targets if t not in chosen]
        mapping = ", ".join(f"{c} -> {t}" for c, t in by_class.items())
        console.print(
            f"hardware classes in {args.fleet}: {mapping}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    targets = targets or [ORT_TARGET]
    console.print(f"targets: {' '.join(targets)}", markup=False, highlight=False, soft_wrap=True)
    repository = ModelRepository(args.repository)
    flags = cpu_flags()
    classes, left_out = profile_classes(
        args.hardware_class,
        args.profile_threads,
        fleet_classes,
        flags,
        len(os.sched_getaffinity(0)),
    )
    measured: dict[tuple[str, str], Measurement] = {}
    with console.status("compiling") as status:
        try:
            outcomes = compile_model(
                args.model,
                args.name,
                repository,
                targets=targets,
                calibration=args.calibration,
                trials=args.trials,
                tuning_records=args.tuning_records or records_for(args.name),
                tolerances=tolerances,
                progress=lambda text: status.update(text),
                int8_weight_bits=args.int8_weight_bits,
            )
        except ValueError as exc:
            console.print(f"[red]{exc}[/red]")
            return 2
        if args.profile:
            measured = profile_outcomes(
                repository,
                args.name,
                outcomes,
                classes,
                flags,
                args.profile_runs,
                progress=lambda text: status.update(text),
            )
    if args.profile:
        caption = (
            "p50 ms at batch 1, measured as "
            + ", ".join(f"{c.name} ({c.threads} thread{'s' * (c.threads > 1)})" for c in classes)
            + f" on this host ({cpu_model()}) and written to each variant's profile.json"
            + "".join(f"; not measured as {why}" for why in left_out)
        )
    else:
        caption = "not measured (--no-profile): workers measure their variants when they start"
    table = Table(title=f"{args.name}: variants in {args.repository}", caption=caption)
    for column in (
        "variant",
        "status",
        "precision",
        "runtime",
        "build s",
        "samples",
        *(f"p50 ms {c.name}" for c in (classes if args.profile else ())),
        "accuracy / reason",
    ):
        table.add_column(column)
    colours = {"built": "green", "rejected": "red", "skipped": "yellow", "failed": "red"}
    for outcome in outcomes:
        m = outcome.manifest
        table.add_row(
            outcome.variant,
            f"[{colours[outcome.status]}]{outcome.status}[/]",
            m.precision if m else "",
            f"{m.runtime} {m.runtime_version}" if m else "",
            f"{outcome.build_s:.1f}" if m else "",
            _samples_cell(m),
            *(
                measured.get((outcome.variant, c.name), Measurement(None)).cell
                for c in (classes if args.profile else ())
            ),
            outcome.detail,
        )
    console.print(table)
    failed = any(o.status == "failed" for o in outcomes) or any(m.failed for m in measured.values())
    return 1 if failed else 0
