"""Compiles an ONNX model with Apache TVM (0.27, Relax) into one exported library.

The variant compiler calls `compile_onnx` once per (model, target): the model is imported
with static input shapes (`importer`; the batch dimension fixed, typically to 1),
optionally tuned with MetaSchedule (`search`, keeping its records as `records` says),
built, and exported with `export_library` as `model.so`. A worker loads that file with
`backends.runtimes.tvm`, which needs TVM's runtime only.

By default `compile_onnx` runs the compile in a fresh Python process (`child`), so the
caller never loads TVM's compiler at all; `compile_in_process` is the compile itself.

TVM itself (the 260 MB compiler library), onnx and onnxruntime are imported inside the
functions that use them, never at import time: importing this module loads no compiler.
Must not import them at module level, nor anything from gateway/. Nothing here reads the
environment or argv at import time.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from backends.compile.tvm.importer import import_onnx
from backends.compile.tvm.records import (
    fitting_database,
    import_records,
    read_budgets,
    task_keys,
    untuned_tasks,
    write_budgets,
)
from backends.compile.tvm.search import check_tunable, prepare_for_tuning, tune_tasks
from backends.compile.tvm.targets import TvmTarget
from backends.compile.tvm.toolchain import check_toolchain, load_tvm, tvm_target_for
from backends.files import write_atomically

LIBRARY = "model.so"
"""File name of the exported library inside `out_dir`."""

RUNTIME_NAME = "tvm"

_logger = logging.getLogger(__name__)


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
    the task count when smaller), and the rest where latency falls most (see `tune_tasks`),
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
        # Imported here: the child module imports this one (the compile it runs, the
        # TvmBuild it returns).
        from backends.compile.tvm.child import compile_in_child

        return compile_in_child(*args, population, seed, records_from)
    return compile_in_process(*args, population, seed, records_from)


def compile_in_process(
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
    """The compile itself, in this process, which therefore loads TVM's compiler (see
    `compile_onnx`; `child` runs it in a fresh process)."""
    started = time.perf_counter()
    say = progress or (lambda message: _logger.info("%s", message))
    tvm = load_tvm()
    check_toolchain(tvm, target)
    tvm_target = tvm_target_for(tvm, target, tuning=trials > 0)
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
        prepared = prepare_for_tuning(tvm, mod, tvm_target)
        found = ms.relax_integration.extract_tasks(prepared, tvm_target)
        tasks = len(found)
        budget = max(trials, tasks)
        per_task = math.ceil(budget / tasks) if tasks else 0
        database = fitting_database(ms, work_dir, found, tvm_target, say)
        keys = task_keys(found)
        if records_from is not None:
            imported = import_records(
                database, found, keys, tvm_target, records_from / target.name, work_dir
            )
            if imported:
                say(f"{len(imported)} of {tasks} tasks: records taken from {records_from}")
        untuned = untuned_tasks(database, found, keys, tvm_target, read_budgets(work_dir), per_task)
        if tasks and not untuned:
            reused = True
            say(
                f"{tasks} tasks: each has records from at least {per_task} trials in "
                f"{work_dir}; applying them, no new trials"
            )
        elif tasks:
            check_tunable(target)
            if budget > trials:
                say(f"raised the trial budget from {trials} to {budget}: one per task")
            chosen = [i for i, task in enumerate(found) if task.task_name in untuned]
            tuning_budget = budget if len(chosen) == tasks else per_task * len(chosen)
            say(
                f"tuning {len(chosen)} of {tasks} tasks (not yet tuned with {per_task} trials "
                f"each) with {tuning_budget} trials in {work_dir}"
            )
            before = len(database)
            tune_tasks(
                [found[i] for i in chosen], work_dir, tuning_budget, per_task, population, seed
            )
            database = ms.database.JSONDatabase(work_dir=str(work_dir))
            measured = len(database) - before
            write_budgets(work_dir, [keys[i] for i in chosen], per_task)
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
