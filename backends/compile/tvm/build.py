"""Compiles an ONNX model with Apache TVM (0.27, Relax) into one exported library.

The variant compiler calls `compile_onnx` once per (model, target): the model is imported
with static input shapes (the batch dimension fixed, typically to 1), optionally tuned
with MetaSchedule, built, and exported with `export_library` as `model.so`. A worker
loads that file with `backends.runtimes.tvm`, which needs TVM's runtime only.

TVM itself (the 260 MB compiler library), onnx and onnxruntime are imported inside the
functions that use them, never at import time: the target tables and the host-CPU helpers
below are cheap to import, and a process that imports this module can still choose to load
TVM's runtime only. By default `compile_onnx` runs the compile in a fresh Python process
(`python -m backends.compile.tvm.build`, request on stdin, JSON lines back), so the caller never
loads TVM's compiler at all. Nothing here reads the environment or argv at import time.

Tuning records: MetaSchedule keeps its JSON database (`database_workload.json`,
`database_tuning_record.json`, `logs/`) in `tuning_dir / target.name`, one folder per
target, because MetaSchedule keys records by workload only: a CPU schedule must never be
applied to the same operator built for CUDA. Records are shared across models: an
operator tuned for one model is reused by every model that has the same operator.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.compile.cpu import cpu_flags
from backends.files import write_atomically, write_text_atomically

LIBRARY = "model.so"
"""File name of the exported library inside `out_dir`."""

RUNTIME_NAME = "tvm"

BUDGETS = "switchyard_trials.json"
"""In each tuning folder: the per-task trial budget each task was tuned with, so that a
compile asking for more trials than the records came from tunes again."""

# MetaSchedule's evolutionary search scores `population` candidates with its cost model per
# round (upstream default 512). Small budgets gain nothing from a large population, and
# on a 2-core machine the search dominates tuning time, so it grows with the per-task
# budget between these bounds.
MIN_POPULATION = 64
MAX_POPULATION = 512
POPULATION_PER_TRIAL = 8
# Candidates measured per search round (upstream default 64), capped by the per-task budget.
TRIALS_PER_ROUND = 64
TUNING_THREADS = 1
"""Cores the tuned schedules are sized for and measured on: variants are measured and
compared at batch 1 with one runtime thread, and a schedule tuned on two threads of a
busy two-core machine is neither measured cleanly nor the best on one."""

_logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TvmTarget:
    """One compilation target: an ISA level of x86-64, or a CUDA architecture."""

    name: str
    """Used in variant names: `llvm-x86-64`, `llvm-avx2`, `llvm-avx512`, `cuda-sm_90`."""
    target: Mapping[str, Any]
    """The TVM 0.27 target as a dict (0.27 rejects the old `llvm -mcpu=...` strings)."""
    required_cpu_flags: tuple[str, ...]
    """`/proc/cpuinfo` flags a CPU needs to run the code (empty for CUDA and baseline x86-64)."""
    host: Mapping[str, Any] | None = None
    """Target of the host-side code for device targets (CUDA); None for CPU targets."""

    @property
    def is_cuda(self) -> bool:
        return self.target.get("kind") == "cuda"


# x86-64 psABI levels, as /proc/cpuinfo names them (lzcnt is `abm`). `haswell` and
# `skylake-avx512` have at least these features; these are the ones LLVM uses in the
# vector code TVM emits.
_X86_64_V3 = ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")
_X86_64_V4 = ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")

CPU_TARGETS: dict[str, TvmTarget] = {
    t.name: t
    for t in (
        # Baseline x86-64 (SSE2): runs anywhere.
        TvmTarget("llvm-x86-64", {"kind": "llvm", "mcpu": "x86-64"}, ()),
        TvmTarget("llvm-avx2", {"kind": "llvm", "mcpu": "haswell"}, _X86_64_V3),
        # skylake-avx512 rather than the build host's own CPU (a Sapphire Rapids here):
        # the variant must run on every AVX-512 server, and TVM's fp32 kernels use
        # no instruction that newer CPUs add (AMX, AVX512-FP16 need other dtypes).
        TvmTarget(
            "llvm-avx512", {"kind": "llvm", "mcpu": "skylake-avx512"}, _X86_64_V3 + _X86_64_V4
        ),
    )
}
"""CPU targets, from the most portable to the fastest."""

_CUDA_HOST = {"kind": "llvm", "mcpu": "x86-64"}

CUDA_TARGETS: dict[str, TvmTarget] = {
    t.name: t
    for t in (
        TvmTarget("cuda-sm_80", {"kind": "cuda", "arch": "sm_80"}, (), _CUDA_HOST),
        TvmTarget("cuda-sm_89", {"kind": "cuda", "arch": "sm_89"}, (), _CUDA_HOST),
        TvmTarget("cuda-sm_90", {"kind": "cuda", "arch": "sm_90"}, (), _CUDA_HOST),
    )
}
"""CUDA targets (A100, L4/L40, H100/H200). Built without a GPU: the library carries the
CUDA C source of its kernels, which TVM's CUDA runtime compiles when the library is loaded
(with NVRTC from the `cuda-bindings` package, or with nvcc when TVM_CUDA_COMPILE_MODE=nvcc)."""


class TvmImportError(Exception):
    """TVM cannot import the model (operators it lacks, shapes it cannot make static)."""


class ToolchainMissing(Exception):
    """A tool the target needs is missing here (CUDA code generator, C++ compiler)."""


class TuningUnavailable(Exception):
    """Tuning measures candidates on this machine, which cannot run the target's code."""


@dataclass(frozen=True, slots=True)
class TvmBuild:
    """What `compile_onnx` built."""

    library: Path
    """The exported library (`out_dir/model.so`)."""
    target: TvmTarget
    input_shapes: dict[str, list[int]]
    """Static shape of each input, in the order the library's `main` takes them."""
    output_shapes: dict[str, list[int]]
    """Static shape of each output, in the order `main` returns them."""
    tuned: bool
    """True when MetaSchedule records were applied (tuned now, or reused)."""
    trials: int
    """Trials this compile ran: tuning records it added, one per candidate built and
    measured, failed ones included (0 when untuned or reused)."""
    trial_budget: int
    """The trials asked for, raised to one per task when that was fewer (0 when untuned)."""
    tasks: int
    """Tuning tasks of the model (its distinct fused operators); 0 when untuned."""
    tvm_version: str
    compile_s: float
    """Wall time of the whole compile: import, tuning, build, export (and, isolated, the
    compile process's start)."""
    tuning_reused: bool
    """True when every task already had a record in the tuning folder: no trial ran."""
    imported_via_ort: bool = False
    """True when TVM imported ONNX Runtime's basic-optimised graph, not the raw model."""
    task_keys: tuple[str, ...] = ()
    """The tuning tasks' workload keys (structural hashes, as MetaSchedule's database and
    `switchyard_trials.json` name them); empty when untuned."""


# --- host CPU -------------------------------------------------------------------------


def host_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU flags of this machine (empty where /proc/cpuinfo is missing)."""
    return cpu_flags(cpuinfo)


def runnable_cpu_targets(flags: frozenset[str]) -> list[TvmTarget]:
    """The CPU targets a CPU with `flags` runs, most portable first."""
    return [t for t in CPU_TARGETS.values() if set(t.required_cpu_flags) <= flags]


def best_cpu_target(flags: frozenset[str]) -> TvmTarget:
    """The fastest CPU target a CPU with `flags` runs."""
    return runnable_cpu_targets(flags)[-1]


# --- TVM, imported on first use -----------------------------------------------------------


def _tvm() -> Any:
    from backends.runtimes.install import runtime_only, tvm_package

    package = None if "tvm" in sys.modules else tvm_package()
    if package is not None and runtime_only(package):
        raise ToolchainMissing(
            f"TVM at {package} is runtime-only (its compiler was removed by "
            "`python -m backends.runtimes.install runtime-only`, as for a backend worker): "
            "compiling needs a full apache-tvm install"
        )
    import tvm  # type: ignore[import-untyped, unused-ignore]

    if tvm.base._RUNTIME_ONLY:
        raise ToolchainMissing(
            "this process loaded TVM's runtime only (TVM_USE_RUNTIME_LIB=1): "
            "compiling needs the full TVM library, in a process that does not set it"
        )
    return tvm


def _tvm_target(tvm: Any, target: TvmTarget, *, tuning: bool) -> Any:
    spec = dict(target.target)
    if tuning and spec.get("kind") == "llvm":
        # MetaSchedule's CPU rules size parallel loops by the core count and refuse a
        # target without one.
        spec.setdefault("num-cores", TUNING_THREADS)
    if target.host is not None:
        return tvm.target.Target(spec, host=dict(target.host))
    return tvm.target.Target(spec)


# --- ONNX import -----------------------------------------------------------------------


def _onnx_inputs(model: Any) -> list[Any]:
    """Graph inputs that are fed at run time (not initializers)."""
    initializers = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _static_shapes(model: Any, given: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Each input's static shape: the one given, else the model's own when fully static."""
    inputs = _onnx_inputs(model)
    names = [i.name for i in inputs]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise TvmImportError(f"input_shapes names {unknown}, the model's inputs are {names}")
    shapes: dict[str, list[int]] = {}
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        if value.name in given:
            shape = [int(d) for d in given[value.name]]
            if len(shape) != len(dims):
                raise TvmImportError(
                    f"input {value.name!r} has rank {len(dims)}, input_shapes gives {shape}"
                )
            for axis, (dim, size) in enumerate(zip(dims, shape, strict=True)):
                if size <= 0 or (dim.HasField("dim_value") and dim.dim_value != size):
                    raise TvmImportError(
                        f"input {value.name!r}: input_shapes gives {shape}, "
                        f"which does not fit the model at dimension {axis}"
                    )
        elif all(d.HasField("dim_value") for d in dims):
            shape = [d.dim_value for d in dims]
        else:
            raise TvmImportError(
                f"input {value.name!r} has dynamic dimensions "
                f"{[d.dim_param or d.dim_value for d in dims]}: TVM variants have static "
                "shapes, so input_shapes must give its shape"
            )
        shapes[value.name] = shape
    return shapes


def _input_dtypes(model: Any) -> dict[str, str]:
    from onnx import helper

    return {
        i.name: str(helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
        for i in _onnx_inputs(model)
    }


def _with_static_inputs(model: Any, shapes: Mapping[str, Sequence[int]]) -> Any:
    """A copy of the model whose inputs have the given static shapes."""
    import onnx

    static = onnx.ModelProto()
    static.CopyFrom(model)
    for value in static.graph.input:
        if value.name in shapes:
            for dim, size in zip(value.type.tensor_type.shape.dim, shapes[value.name], strict=True):
                dim.Clear()
                dim.dim_value = size
    return static


def _ort_basic(model: Any, shapes: Mapping[str, Sequence[int]], scratch: Path) -> Any:
    """ONNX Runtime's basic graph optimisation (constant folding, redundant nodes) of the
    model with its inputs made static."""
    import onnx
    import onnxruntime as ort

    static = _with_static_inputs(model, shapes)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(scratch / "ort_basic.onnx")
    ort.InferenceSession(
        static.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
    )
    return onnx.load(str(scratch / "ort_basic.onnx"))


def _foreign_ops(model: Any) -> dict[str, list[str]]:
    """Operators outside the default ONNX domain, by domain."""
    found: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            ops = found.setdefault(node.domain, [])
            if node.op_type not in ops:
                ops.append(node.op_type)
    return found


def _check_static(tvm: Any, mod: Any) -> list[list[int]]:
    """The static output shapes of `main`; raises TvmImportError on any dynamic shape.

    (TVM 0.27 names Relax struct info `ty`: `Var.ty`, `Function.ret_ty`, `relax.TensorType`.)
    """
    relax = tvm.relax
    main = mod["main"]

    def static_shape(ty: Any, what: str) -> list[int]:
        shape = ty.shape if isinstance(ty, relax.TensorType) else None
        values = getattr(shape, "values", None)
        if values is None or not all(isinstance(v, tvm.tirx.IntImm) for v in values):
            raise TvmImportError(
                f"{what} has a dynamic shape ({ty}) after import with static input shapes; "
                "TVM variants need static shapes"
            )
        return [int(v) for v in values]

    for param in main.params:
        static_shape(param.ty, f"input {param.name!r}")
    ret = main.ret_ty
    fields = ret.fields if isinstance(ret, relax.TupleType) else [ret]
    return [static_shape(f, f"output {index}") for index, f in enumerate(fields)]


def import_onnx(
    source: Path, input_shapes: Mapping[str, Sequence[int]], scratch: Path
) -> tuple[Any, dict[str, list[int]], dict[str, list[int]], bool]:
    """Imports an ONNX model into a Relax IRModule with static shapes.

    Returns (module, input shapes, output shapes, imported via ONNX Runtime). Tries the raw
    model first, then ONNX Runtime's basic optimisation of it; raises TvmImportError
    naming the reason when neither imports.
    """
    import onnx

    tvm = _tvm()
    from tvm.relax.frontend.onnx import (  # type: ignore[import-untyped, unused-ignore]
        from_onnx,
    )

    model = onnx.load(str(source))
    shapes = _static_shapes(model, input_shapes)
    dtypes = _input_dtypes(model)
    output_names = [o.name for o in model.graph.output]

    def attempt(candidate: Any) -> tuple[Any, list[list[int]]]:
        mod = from_onnx(candidate, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=False)
        return mod, _check_static(tvm, mod)

    via_ort = False
    try:
        mod, outputs = attempt(model)
    except Exception as raw_error:  # TVM raises many types (OpNotImplemented, TVMError, ...)
        foreign = _foreign_ops(model)
        if "ai.onnx.ml" in foreign:
            raise TvmImportError(
                f"{source}: TVM cannot import this model: it uses ai.onnx.ml operators "
                f"({', '.join(foreign['ai.onnx.ml'])}), which TVM's ONNX importer lacks "
                "(classical-ML models run on ONNX Runtime)"
            ) from raw_error
        # Constant folding with static inputs removes shape arithmetic and constant-only
        # operators, which covers much of what the importer rejects or leaves dynamic.
        try:
            mod, outputs = attempt(_ort_basic(model, shapes, scratch))
        except Exception as ort_error:
            raise TvmImportError(
                f"{source}: TVM cannot import this model ({_summary(raw_error)}), "
                f"nor ONNX Runtime's basic optimisation of it ({_summary(ort_error)})"
            ) from ort_error
        via_ort = True
    if len(outputs) != len(output_names):
        raise TvmImportError(
            f"{source}: the model has outputs {output_names}, TVM's import returns {len(outputs)}"
        )
    return mod, shapes, dict(zip(output_names, outputs, strict=True)), via_ort


def _summary(error: BaseException) -> str:
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    # TVM errors end with the message after a C++ backtrace.
    return f"{type(error).__name__}: {lines[-1] if lines else text}"


# --- tuning ----------------------------------------------------------------------------


def _prepare(tvm: Any, mod: Any, target: Any) -> Any:
    """The passes `static_shape_tuning` runs before tuning: legalised and fused operators,
    one PrimFunc per tuning task. Run outside any Database scope, so none is applied."""
    relax = tvm.relax
    with target:
        return tvm.transform.Sequential(
            [
                relax.transform.DecomposeOpsForInference(),
                relax.transform.CanonicalizeBindings(),
                relax.get_pipeline("zero"),
            ]
        )(mod)


def _build_candidate(mod: Any, target: Any, _params: Any) -> Any:
    """MetaSchedule's default build without its import of every tensor intrinsic (12 s per
    process, paid again for every batch in LocalBuilder's fresh worker processes)."""
    from tvm import tirx  # type: ignore[import-untyped, unused-ignore]
    from tvm.s_tir.transform import (  # type: ignore[import-untyped, unused-ignore]
        RemoveWeightLayoutRewriteBlock,
    )

    return tirx.build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _in_process_builder() -> Any:
    """A MetaSchedule builder that builds candidates in this process, one after another.

    Building one candidate takes milliseconds; the upstream LocalBuilder starts fresh worker
    processes for every batch, each importing TVM and its tensor intrinsics (seconds).
    """
    from tvm.ir.utils import derived_object  # type: ignore[import-untyped, unused-ignore]
    from tvm.s_tir.meta_schedule.builder import (  # type: ignore[import-untyped, unused-ignore]
        BuilderResult,
        PyBuilder,
    )
    from tvm.s_tir.meta_schedule.builder.local_builder import (  # type: ignore[import-untyped, unused-ignore]
        default_export,
    )

    @derived_object
    class InProcessBuilder(PyBuilder):  # type: ignore[misc]
        def build(self, build_inputs: list[Any]) -> list[Any]:
            results = []
            for item in build_inputs:
                try:
                    artifact = default_export(_build_candidate(item.mod, item.target, None))
                    results.append(BuilderResult(artifact, None))
                except Exception as exc:  # a candidate that fails to build is a result
                    results.append(BuilderResult(None, f"InProcessBuilder: {exc}"))
            return results

    return InProcessBuilder()


def _task_keys(tasks: Sequence[Any]) -> list[str]:
    """A stable key per task: the structural hash of its PrimFunc module, which is how
    MetaSchedule's database identifies a workload."""
    import tvm_ffi

    return [str(tvm_ffi.structural_hash(task.dispatched[0])) for task in tasks]


def _read_budgets(work_dir: Path) -> dict[str, int]:
    """Per-task trial budgets the tasks in `work_dir` were tuned with (task key -> trials)."""
    try:
        loaded = json.loads((work_dir / BUDGETS).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(loaded, dict):
        return {}
    return {str(k): int(v) for k, v in loaded.items() if isinstance(v, int)}


def _save_budgets(work_dir: Path, budgets: dict[str, int]) -> None:
    write_text_atomically(work_dir / BUDGETS, json.dumps(budgets, indent=1, sort_keys=True) + "\n")


def _write_budgets(work_dir: Path, keys: Sequence[str], per_task: int) -> None:
    budgets = _read_budgets(work_dir)
    for key in keys:
        budgets[key] = max(budgets.get(key, 0), per_task)
    _save_budgets(work_dir, budgets)


def _untuned_tasks(
    database: Any,
    tasks: Sequence[Any],
    keys: Sequence[str],
    target: Any,
    budgets: Mapping[str, int],
    per_task: int,
) -> list[str]:
    """Names of the tasks to tune: those searched with fewer trials than this compile's
    share. A task searched with its share that found no valid schedule keeps TVM's
    default one: searching again with the same budget would make every compile of
    the model a first compile. When no task has a record at all (the records were
    removed), every task is tuned."""
    short = [
        task.task_name
        for task, key in zip(tasks, keys, strict=True)
        if budgets.get(key, 0) < per_task
    ]
    recorded = [
        task.task_name
        for task in tasks
        if database.query_tuning_record(task.dispatched[0], target, task.task_name) is not None
    ]
    if short or not recorded:
        return short or [task.task_name for task in tasks]
    return []


def _import_records(
    database: Any,
    tasks: Sequence[Any],
    keys: Sequence[str],
    target: Any,
    records_dir: Path,
    work_dir: Path,
) -> list[str]:
    """Copies into `database` (the tuning folder `work_dir`) the best record in
    `records_dir` of each task that was tuned there with a larger per-task budget than
    here, and raises the task's budget here to that one. Returns the names of the tasks
    whose budget was raised. `records_dir` is only read; a task its budgets do not list
    (another model, another TVM version: the key is the workload's structural hash) is
    left as it was."""
    from tvm.s_tir import meta_schedule as ms  # type: ignore[import-untyped, unused-ignore]

    files = [records_dir / "database_workload.json", records_dir / "database_tuning_record.json"]
    if not all(f.is_file() for f in files):
        return []
    source = ms.database.JSONDatabase(work_dir=str(records_dir), allow_missing=False)
    source_budgets = _read_budgets(records_dir)
    budgets = _read_budgets(work_dir)
    raised: list[str] = []
    for task, key in zip(tasks, keys, strict=True):
        if source_budgets.get(key, 0) <= budgets.get(key, 0):
            continue
        # A task whose key the source's budgets list was searched there; without a
        # record it found no valid schedule (say, a Gather that MetaSchedule's random
        # indices crash) and keeps TVM's default one, as it would here.
        mod = task.dispatched[0]
        record = _recorded(source, task, target)
        if record is not None and not _replays(record, mod):
            continue  # tuned on a graph that named its blocks otherwise: tune it here
        if record is not None:
            database.commit_tuning_record(
                ms.database.TuningRecord(
                    record.trace,
                    database.commit_workload(mod),
                    record.run_secs,
                    record.target,
                    record.args_info,
                )
            )
        budgets[key] = source_budgets[key]
        raised.append(task.task_name)
    if raised:
        _save_budgets(work_dir, budgets)
    return raised


def _recorded(database: Any, task: Any, target: Any) -> Any:
    """The best record `database` holds for `task`, or None."""
    workload = task.dispatched[0]
    if not database.has_workload(workload):
        return None
    return database.query_tuning_record(workload, target, task.task_name)


def _stale_tasks(database: Any, tasks: Sequence[Any], target: Any) -> list[str]:
    """Names of the tasks whose best record in `database` does not replay on them."""
    return [
        task.task_name
        for task in tasks
        if (record := _recorded(database, task, target)) is not None
        and not _replays(record, task.dispatched[0])
    ]


def _replays(record: Any, mod: Any) -> bool:
    """Whether `record`'s schedule applies to `mod`. A workload is matched by its
    structure, but a schedule names the blocks it transforms, and TVM names a
    reduction's block after the Relax variable it computes (`lv14_red`): the same
    reduction in a graph with other bindings before it has another name."""
    from tvm import s_tir  # type: ignore[import-untyped, unused-ignore]

    try:
        record.trace.apply_to_schedule(s_tir.Schedule(mod), remove_postproc=False)
    except Exception:  # ScheduleError, TVMError: the trace does not fit this function
        return False
    return True


@dataclass(frozen=True, slots=True)
class RecordsCheck:
    """How a folder of tuning records fits a model's tasks (`check_records`)."""

    tasks: int
    unbudgeted: list[str]
    """Tasks the folder's budgets do not list: a compile with it would tune them."""
    stale: list[str]
    """Tasks whose recorded schedule does not replay on them: the build would fail."""


def check_records(
    source: Path,
    input_shapes: Mapping[str, Sequence[int]],
    target: TvmTarget,
    records_dir: Path,
    scratch: Path,
) -> RecordsCheck:
    """Imports `source` as a compile does and checks the records of `records_dir` (a
    tuning folder for `target`) against each of its tasks. In this process: it needs
    the full TVM library."""
    tvm = _tvm()
    from tvm.s_tir import meta_schedule as ms  # type: ignore[import-untyped, unused-ignore]

    tvm_target = _tvm_target(tvm, target, tuning=True)
    mod, _, _, _ = import_onnx(source, input_shapes, scratch)
    prepared = _prepare(tvm, tvm.relax.transform.FastMathTransform()(mod), tvm_target)
    tasks = ms.relax_integration.extract_tasks(prepared, tvm_target)
    budgets = _read_budgets(records_dir)
    database = ms.database.JSONDatabase(work_dir=str(records_dir), allow_missing=False)
    unbudgeted = [
        task.task_name
        for task, key in zip(tasks, _task_keys(tasks), strict=True)
        if key not in budgets
    ]
    return RecordsCheck(len(tasks), unbudgeted, _stale_tasks(database, tasks, tvm_target))


def _fitting_database(
    ms: Any, work_dir: Path, tasks: Sequence[Any], target: Any, say: Callable[[str], None]
) -> Any:
    """The tuning folder's database, once its records fit `tasks`. Records tuned on an
    older graph of the model can match a task by structure yet name other blocks (a
    rewrite upstream renames reductions, see `_replays`): applying them fails the build,
    and tuning on top of them writes records the database cannot read back. Such a
    folder is moved aside (`<target>.stale-<time>`) and tuning starts afresh."""
    reason = ""
    try:
        database = ms.database.JSONDatabase(work_dir=str(work_dir))
    except Exception as exc:  # TVMError, RuntimeError: a record does not fit its workload
        reason = f"its records do not load ({_summary(exc)})"
    else:
        stale = _stale_tasks(database, tasks, target)
        if not stale:
            return database
        reason = f"records of {len(stale)} tasks no longer apply ({', '.join(stale[:3])}...)"
    aside = work_dir.with_name(f"{work_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
    work_dir.rename(aside)
    work_dir.mkdir()
    say(f"{work_dir}: {reason}, tuned on an older graph of the model; moved to {aside}")
    return ms.database.JSONDatabase(work_dir=str(work_dir))


def _quiet_meta_schedule() -> None:
    """MetaSchedule prints its task table on stdout at INFO; its log files keep it."""
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    if ms_logger.level == logging.NOTSET:
        ms_logger.setLevel(logging.WARNING)


def _tune(
    tasks: Sequence[Any],
    work_dir: Path,
    budget: int,
    per_task: int,
    population: int | None,
    seed: int | None,
) -> None:
    """MetaSchedule over `tasks` (extracted as `static_shape_tuning` extracts them), with
    search rounds no larger than a task's share (with 64-candidate rounds, a small budget
    went whole to the first tasks and later ones got no trial), a population sized to the
    budget, an in-process builder, and candidates measured on `TUNING_THREADS` threads.

    Every task first gets one round of at most its share `per_task` (so a budget of one
    share per task is spread evenly); MetaSchedule's gradient task scheduler then gives
    the rest of the budget to the tasks that cut the model's latency most (a model's big
    convolutions), not to a reshape whose few schedules were all measured in its first
    round."""
    from tvm.s_tir import meta_schedule as ms  # type: ignore[import-untyped, unused-ignore]

    if population is None:
        population = min(MAX_POPULATION, max(MIN_POPULATION, POPULATION_PER_TRIAL * per_task))
    _quiet_meta_schedule()
    # The runner's worker processes take their thread pool size from the environment.
    threads = os.environ.get("TVM_NUM_THREADS")
    os.environ["TVM_NUM_THREADS"] = str(TUNING_THREADS)
    try:
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            list(tasks),
            str(work_dir),
            strategy=ms.search_strategy.EvolutionarySearch(population_size=population),
            seed=seed,
        )
        ms.tune.tune_tasks(
            tasks=contexts,
            task_weights=weights,
            work_dir=str(work_dir),
            max_trials_global=budget,
            max_trials_per_task=budget,
            num_trials_per_iter=min(TRIALS_PER_ROUND, per_task),
            builder=_in_process_builder(),
        )
    finally:
        if threads is None:
            os.environ.pop("TVM_NUM_THREADS", None)
        else:
            os.environ["TVM_NUM_THREADS"] = threads


def _check_tunable(target: TvmTarget) -> None:
    if target.is_cuda:
        raise TuningUnavailable(
            f"{target.name}: tuning measures candidates on a local GPU, and this TVM build "
            "has no CUDA runtime; compile with trials=0 (CUDA kernels then get TVM's default "
            "GPU schedules)"
        )
    missing = sorted(set(target.required_cpu_flags) - host_cpu_flags())
    if missing:
        raise TuningUnavailable(
            f"{target.name}: tuning measures candidates on this CPU, which lacks {missing}; "
            "compile with trials=0 here or tune on a machine that has them"
        )


# --- build and export ------------------------------------------------------------------


def _check_toolchain(tvm: Any, target: TvmTarget) -> None:
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise ToolchainMissing(
            f"export_library links the library with {compiler!r}, which is not on PATH "
            "(install g++ or set CXX)"
        )
    if target.is_cuda and tvm.get_global_func("target.build.cuda", allow_missing=True) is None:
        raise ToolchainMissing(
            f"{target.name}: this TVM build has no CUDA code generator (target.build.cuda)"
        )


def compile_onnx(
    source: Path,
    out_dir: Path,
    target: TvmTarget,
    input_shapes: dict[str, list[int]],
    *,
    tuning_dir: Path | None,
    trials: int,
    progress: Callable[[str], None] | None = None,
    population: int | None = None,
    seed: int | None = None,
    isolated: bool = True,
    records_from: Path | None = None,
) -> TvmBuild:
    """Compiles `source` for `target` into `out_dir/model.so`.

    trials == 0: an untuned build (operators fused, default schedules; TVM's default GPU
    schedules for CUDA). trials > 0: MetaSchedule tunes every task with a first round of
    at most an equal share of the budget, at least one trial each (the budget is raised to
    the task count when smaller), and the rest where latency falls most (see `_tune`),
    keeping records in `tuning_dir / target.name`. When every task there already has a
    record, tuned with at least this compile's per-task share, no trial runs and the
    records are applied (`tuning_reused`); otherwise the tasks short of it are tuned with
    their shares (every task when none has a record), the search starting from the
    records there. One compile at a time per tuning folder.

    Exponentials, tanh, erf and softmax are computed with TVM's fast approximations
    (`relax.transform.FastMathTransform`): vectorised polynomials, where the exact forms
    call libm once per element (the transformer's GELU took two fifths of its kernel
    time); on the demo models the outputs stay within 3e-5 of the fp32 source.

    `records_from`: a tuning folder kept elsewhere (the records committed with the demo
    models), only read: before deciding what to tune, each task's best record there is
    copied into `tuning_dir` when it was tuned there with a larger per-task budget, so a
    compile with committed records applies them without tuning.

    `population` (the evolutionary search's population per round) defaults to a size that
    grows with the per-task budget; `seed` makes the search repeatable.

    isolated (the default): the compile runs in a fresh Python process, so this process
    never loads TVM's compiler, and TVM's start-up is not slowed by the modules loaded here
    (TVMScript scans every loaded module for each of the ~26,000 functions it parses when
    MetaSchedule first loads its tensor intrinsics: 11 s in a fresh process, 30 s after
    building the demo models with scikit-learn). Errors arrive as the same exception types.
    """
    if trials < 0:
        raise ValueError(f"trials must be >= 0, got {trials}")
    if trials > 0 and tuning_dir is None:
        raise ValueError("tuning (trials > 0) needs a tuning_dir for its records")
    args = (source, out_dir, target, input_shapes, tuning_dir, trials, progress)
    if isolated:
        return _compile_in_child(*args, population, seed, records_from)
    return _compile(*args, population, seed, records_from)


def _compile(
    source: Path,
    out_dir: Path,
    target: TvmTarget,
    input_shapes: Mapping[str, Sequence[int]],
    tuning_dir: Path | None,
    trials: int,
    progress: Callable[[str], None] | None,
    population: int | None,
    seed: int | None,
    records_from: Path | None,
) -> TvmBuild:
    started = time.perf_counter()
    say = progress or (lambda message: _logger.info("%s", message))
    tvm = _tvm()
    _check_toolchain(tvm, target)
    tvm_target = _tvm_target(tvm, target, tuning=trials > 0)
    relax = tvm.relax

    with tempfile.TemporaryDirectory(prefix="switchyard-tvm-") as scratch:
        say(f"importing {source} into Relax with input shapes {input_shapes}")
        mod, shapes, outputs, via_ort = import_onnx(source, input_shapes, Path(scratch))
        if via_ort:
            say("TVM imported ONNX Runtime's basic-optimised graph (the raw one failed)")
    mod = relax.transform.FastMathTransform()(mod)

    tasks = 0
    budget = 0
    measured = 0
    reused = False
    keys: list[str] = []
    if trials > 0:
        assert tuning_dir is not None
        from tvm.s_tir import meta_schedule as ms  # type: ignore[import-untyped, unused-ignore]

        work_dir = tuning_dir / target.name
        work_dir.mkdir(parents=True, exist_ok=True)
        prepared = _prepare(tvm, mod, tvm_target)
        found = ms.relax_integration.extract_tasks(prepared, tvm_target)
        tasks = len(found)
        budget = max(trials, tasks)
        per_task = math.ceil(budget / tasks) if tasks else 0
        database = _fitting_database(ms, work_dir, found, tvm_target, say)
        keys = _task_keys(found)
        if records_from is not None:
            imported = _import_records(
                database, found, keys, tvm_target, records_from / target.name, work_dir
            )
            if imported:
                say(f"{len(imported)} of {tasks} tasks: records taken from {records_from}")
        untuned = _untuned_tasks(
            database, found, keys, tvm_target, _read_budgets(work_dir), per_task
        )
        if tasks and not untuned:
            reused = True
            say(
                f"{tasks} tasks: each has records from at least {per_task} trials in "
                f"{work_dir}; applying them, no new trials"
            )
        elif tasks:
            _check_tunable(target)
            if budget > trials:
                say(f"raised the trial budget from {trials} to {budget}: one per task")
            chosen = [i for i, task in enumerate(found) if task.task_name in untuned]
            tuning_budget = budget if len(chosen) == tasks else per_task * len(chosen)
            say(
                f"tuning {len(chosen)} of {tasks} tasks (not yet tuned with {per_task} trials "
                f"each) with {tuning_budget} trials in {work_dir}"
            )
            before = len(database)
            _tune([found[i] for i in chosen], work_dir, tuning_budget, per_task, population, seed)
            database = ms.database.JSONDatabase(work_dir=str(work_dir))
            measured = len(database) - before
            _write_budgets(work_dir, [keys[i] for i in chosen], per_task)
            say(f"tuning measured {measured} candidates")
        with database:
            mod = relax.get_pipeline(
                "static_shape_tuning", target=tvm_target, work_dir=str(work_dir), total_trials=0
            )(mod)
    else:
        with tvm_target:
            mod = relax.get_pipeline("zero")(mod)

    say(f"building for {target.name}")
    executable = tvm.compile(mod, target=tvm_target)
    out_dir.mkdir(parents=True, exist_ok=True)
    library = out_dir / LIBRARY
    write_atomically(library, lambda partial: executable.export_library(str(partial)), ".so")
    compile_s = time.perf_counter() - started
    say(f"exported {library} in {compile_s:.1f} s")
    return TvmBuild(
        library=library,
        target=target,
        input_shapes=shapes,
        output_shapes=outputs,
        tuned=trials > 0 and tasks > 0,
        trials=measured,
        trial_budget=budget,
        tasks=tasks,
        tvm_version=str(tvm.__version__),
        compile_s=compile_s,
        tuning_reused=reused,
        imported_via_ort=via_ort,
        task_keys=tuple(keys),
    )


# --- the compile in a child process ----------------------------------------------------

# Exceptions a child reports by name and the parent raises again.
_ERRORS: dict[str, type[Exception]] = {
    e.__name__: e for e in (TvmImportError, ToolchainMissing, TuningUnavailable, ValueError)
}


class CompileFailed(Exception):
    """The compile process failed in a way the other errors do not describe."""


def _compile_in_child(
    source: Path,
    out_dir: Path,
    target: TvmTarget,
    input_shapes: Mapping[str, Sequence[int]],
    tuning_dir: Path | None,
    trials: int,
    progress: Callable[[str], None] | None,
    population: int | None,
    seed: int | None,
    records_from: Path | None,
) -> TvmBuild:
    started = time.perf_counter()
    say = progress or (lambda message: _logger.info("%s", message))
    request = {
        "source": str(source),
        "out_dir": str(out_dir),
        "target": {
            "name": target.name,
            "target": dict(target.target),
            "required_cpu_flags": list(target.required_cpu_flags),
            "host": None if target.host is None else dict(target.host),
        },
        "input_shapes": {k: list(v) for k, v in input_shapes.items()},
        "tuning_dir": None if tuning_dir is None else str(tuning_dir),
        "trials": trials,
        "population": population,
        "seed": seed,
        "records_from": None if records_from is None else str(records_from),
    }
    env = dict(os.environ)
    env.pop("TVM_USE_RUNTIME_LIB", None)  # the child needs the compiler
    # The child imports this module the way this process did.
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    outcome: dict[str, Any] | None = None
    with subprocess.Popen(
        [sys.executable, "-m", __name__],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    ) as child:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(json.dumps(request))
        child.stdin.close()
        for line in child.stdout:
            message = json.loads(line)
            if "progress" in message:
                say(str(message["progress"]))
            else:
                outcome = message
    if outcome is None:
        raise CompileFailed(
            f"the TVM compile process for {source} ({target.name}) exited with status "
            f"{child.returncode} without a result (see its stderr)"
        )
    if "error" in outcome:
        error = outcome["error"]
        raise _ERRORS.get(error["type"], CompileFailed)(error["message"])
    built = outcome["build"]
    return TvmBuild(
        library=Path(built["library"]),
        target=target,
        input_shapes=built["input_shapes"],
        output_shapes=built["output_shapes"],
        tuned=built["tuned"],
        trials=built["trials"],
        trial_budget=built["trial_budget"],
        tasks=built["tasks"],
        tvm_version=built["tvm_version"],
        compile_s=time.perf_counter() - started,
        tuning_reused=built["tuning_reused"],
        imported_via_ort=built["imported_via_ort"],
        task_keys=tuple(built["task_keys"]),
    )


def _child_main() -> int:
    """The compile process: a JSON request on stdin; JSON lines (progress, then the build
    or the error) on its original stdout. Everything else written to stdout, by TVM or
    MetaSchedule, goes to stderr instead."""
    request = json.loads(sys.stdin.read())
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def reply(message: Mapping[str, Any]) -> None:
        replies.write(json.dumps(message) + "\n")

    spec = request["target"]
    target = TvmTarget(
        name=spec["name"],
        target=spec["target"],
        required_cpu_flags=tuple(spec["required_cpu_flags"]),
        host=spec["host"],
    )
    try:
        build = _compile(
            Path(request["source"]),
            Path(request["out_dir"]),
            target,
            request["input_shapes"],
            None if request["tuning_dir"] is None else Path(request["tuning_dir"]),
            request["trials"],
            lambda message: reply({"progress": message}),
            request["population"],
            request["seed"],
            None if request["records_from"] is None else Path(request["records_from"]),
        )
    except tuple(_ERRORS.values()) as exc:
        reply({"error": {"type": type(exc).__name__, "message": str(exc)}})
        return 1
    except Exception as exc:
        reply({"error": {"type": "CompileFailed", "message": _summary(exc)}})
        raise
    reply(
        {
            "build": {
                "library": str(build.library),
                "input_shapes": build.input_shapes,
                "output_shapes": build.output_shapes,
                "tuned": build.tuned,
                "trials": build.trials,
                "trial_budget": build.trial_budget,
                "tasks": build.tasks,
                "tvm_version": build.tvm_version,
                "tuning_reused": build.tuning_reused,
                "imported_via_ort": build.imported_via_ort,
                "task_keys": list(build.task_keys),
            }
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(_child_main())
