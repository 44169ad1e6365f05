"""The MetaSchedule tuning records a compile reads and writes: the per-task trial budgets
kept beside them, which tasks to tune, records taken from a folder kept elsewhere (the
records committed with the demo models), records that no longer replay (moved aside), and
`check_records`, whether a folder of records fits a model's tasks.

MetaSchedule keeps its JSON database (`database_workload.json`,
`database_tuning_record.json`, `logs/`) in `tuning_dir / target.name`, one folder per
target, because MetaSchedule keys records by workload only: a CPU schedule must never be
applied to the same operator built for CUDA. Records are shared across models: an
operator tuned for one model is reused by every model that has the same operator.

`tuning` imports this module in a process that never loads TVM: TVM is imported inside the
functions that use it, never at import time. Must not import TVM at module level, nor
anything from gateway/.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.compile.tvm.importer import import_onnx
from backends.compile.tvm.search import prepare_for_tuning
from backends.compile.tvm.targets import TvmTarget
from backends.compile.tvm.toolchain import error_summary, load_tvm, tvm_target_for
from backends.files import write_text_atomically

BUDGETS = "switchyard_trials.json"
"""In each tuning folder: the per-task trial budget each task was tuned with, so that a
compile asking for more trials than the records came from tunes again."""


def task_keys(tasks: Sequence[Any]) -> list[str]:
    """A stable key per task: the structural hash of its PrimFunc module, which is how
    MetaSchedule's database identifies a workload."""
    import tvm_ffi

    return [str(tvm_ffi.structural_hash(task.dispatched[0])) for task in tasks]


def read_budgets(work_dir: Path) -> dict[str, int]:
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


def write_budgets(work_dir: Path, keys: Sequence[str], per_task: int) -> None:
    """Records that the tasks `keys` in `work_dir` were tuned with `per_task` trials each."""
    budgets = read_budgets(work_dir)
    for key in keys:
        budgets[key] = max(budgets.get(key, 0), per_task)
    _save_budgets(work_dir, budgets)


def untuned_tasks(
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


def import_records(
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
    source_budgets = read_budgets(records_dir)
    budgets = read_budgets(work_dir)
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
    tvm = load_tvm()
    from tvm.s_tir import meta_schedule as ms  # type: ignore[import-untyped, unused-ignore]

    tvm_target = tvm_target_for(tvm, target, tuning=True)
    mod, _, _, _ = import_onnx(source, input_shapes, scratch)
    prepared = prepare_for_tuning(tvm, tvm.relax.transform.FastMathTransform()(mod), tvm_target)
    tasks = ms.relax_integration.extract_tasks(prepared, tvm_target)
    budgets = read_budgets(records_dir)
    database = ms.database.JSONDatabase(work_dir=str(records_dir), allow_missing=False)
    unbudgeted = [
        task.task_name
        for task, key in zip(tasks, task_keys(tasks), strict=True)
        if key not in budgets
    ]
    return RecordsCheck(len(tasks), unbudgeted, _stale_tasks(database, tasks, tvm_target))


def fitting_database(
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
        reason = f"its records do not load ({error_summary(exc)})"
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
