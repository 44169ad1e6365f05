"""MetaSchedule tuning records committed with the demo models, and how they are made.

`RECORDS / <model> / <target>` (in `backends/compile/tvm/tuning_records/`) holds, for each
demo model TVM imports, MetaSchedule's JSON database pruned to the best schedule of each workload,
the per-task budgets it was tuned with (`switchyard_trials.json`, as `tvm.records` writes
it) and what the tuning cost (`switchyard_tuning.json`). A compile of a demo model passes
`records_for(model)` to `tvm.build.compile_onnx` as `records_from`: the records are
copied into the repository's own tuning folder and applied, and no trial runs when the
compile asks for no more trials per task than they were tuned with.

`python -m backends.compile.tvm.tuning tune --models cnn --trials 1000` tunes a demo
model of the model repository, continuing from the full records it keeps in
`.bench/tuning/<model>/`, and writes the pruned records here; it takes from minutes to an
hour per model on two cores, and neither `make models` nor `make test` runs it.
`python -m backends.compile.tvm.tuning apply` (`make models-tvm`) builds the tuned TVM
variants of the demo repository from the committed records, without tuning.

This module reads and writes MetaSchedule's JSON files itself and imports no TVM; the
compile runs in `tvm.child`'s own process. Nothing is read from argv or the
environment at import time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from backends.compile.tvm.records import BUDGETS
from backends.compile.tvm.targets import TvmTarget

ROOT = Path(__file__).resolve().parents[3]
RECORDS = Path(__file__).resolve().parent / "tuning_records"
"""Committed records: `RECORDS / <model> / <target name>`."""
WORKLOADS = "database_workload.json"
TUNING_RECORDS = "database_tuning_record.json"
INFO = "switchyard_tuning.json"
"""What the records cost: trials, tasks, tuning wall time, TVM version, CPU."""
FAILED_RUN_S = 1e9
"""MetaSchedule records a candidate that failed to build or run with a run time of 1e10 s."""
DEFAULT_TRIALS = 1000
"""Trial budget of a model tuned for the first time."""
DEMO_MODELS = ("cnn", "resnet", "mobilenet", "transformer", "magika")
"""The demo models TVM imports (digits uses ai.onnx.ml operators; echo has nothing to tune)."""


@dataclass(frozen=True, slots=True)
class TuningInfo:
    """How a folder of records was made (`switchyard_tuning.json`)."""

    model: str
    target: str
    trials: int
    """The trial budget of the compiles that tuned them (the last one's, when tuned in steps)."""
    tasks: int
    measured: int
    """Candidates measured, over every step."""
    tuning_s: float
    """Wall time of the compiles that tuned them (import, tuning, build), over every step."""
    tvm_version: str
    cpu: str
    date: str
    population: int | None = None
    """The evolutionary search's population per round, when not `tvm_compile`'s default."""


def records_for(model: str, root: Path = RECORDS) -> Path | None:
    """The committed tuning folder of demo model `model` (targets below it), if any."""
    folder = root / model
    return folder if folder.is_dir() else None


def read_info(folder: Path) -> TuningInfo | None:
    """The `switchyard_tuning.json` of one target's records, if readable."""
    try:
        return TuningInfo(**json.loads((folder / INFO).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_info(folder: Path, info: TuningInfo) -> None:
    (folder / INFO).write_text(json.dumps(asdict(info), indent=1) + "\n")


def _mean_s(run_secs: Sequence[float]) -> float:
    return math.fsum(run_secs) / len(run_secs) if run_secs else math.inf


def prune(work_dir: Path, out_dir: Path, keys: Collection[str] | None = None) -> int:
    """Writes to `out_dir` the database of `work_dir` with only the fastest record of each
    workload (failed candidates dropped, workloads without a record dropped) and its
    per-task budgets; with `keys`, only those workloads (a model's current tasks, not
    those of operators it no longer has). Returns the number of records written."""
    workloads = [
        json.loads(line) for line in (work_dir / WORKLOADS).read_text().splitlines() if line.strip()
    ]
    best: dict[int, tuple[float, list[object]]] = {}
    for line in (work_dir / TUNING_RECORDS).read_text().splitlines():
        if not line.strip():
            continue
        index, record = json.loads(line)
        if keys is not None and workloads[index][0] not in keys:
            continue
        mean_s = _mean_s(record[1])
        if mean_s < FAILED_RUN_S and mean_s < best.get(index, (math.inf, []))[0]:
            best[index] = (mean_s, record)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept = sorted(best)
    (out_dir / WORKLOADS).write_text("".join(json.dumps(workloads[i]) + "\n" for i in kept))
    (out_dir / TUNING_RECORDS).write_text(
        "".join(json.dumps([new, best[old][1]]) + "\n" for new, old in enumerate(kept))
    )
    if (work_dir / BUDGETS).is_file():
        budgets = json.loads((work_dir / BUDGETS).read_text())
        if keys is not None:
            budgets = {k: v for k, v in budgets.items() if k in keys}
        (out_dir / BUDGETS).write_text(json.dumps(budgets, indent=1, sort_keys=True) + "\n")
    return len(kept)


def _compiled_graph(repository: Path, model: str) -> tuple[Path, dict[str, list[int]]]:
    """The graph TVM compiles for `model` (its source after `backends.compile.rewrites`, so that
    tuning tasks match the compiler's) and the static input shapes it compiles with."""
    from backends.compile.compiler import tvm_input_shapes
    from backends.compile.rewrites import prepared_source
    from backends.runtimes.ort import signature

    source, _ = prepared_source(repository / model / "model.onnx")
    return source, tvm_input_shapes(signature(source)[0])


def tune(
    repository: Path,
    model: str,
    target: TvmTarget,
    trials: int,
    work: Path,
    out: Path,
    seed: int | None = 0,
    population: int | None = None,
) -> TuningInfo:
    """Tunes `model` of the model repository for `target` with `trials` trials, keeping
    MetaSchedule's full records in `work / model` (a later call continues from them), and
    writes the pruned records and their `TuningInfo` to `out / model / target.name`."""
    from backends.compile.cpu import cpu_model
    from backends.compile.tvm.build import compile_onnx

    source, shapes = _compiled_graph(repository, model)
    tuning_dir = work / model
    started = time.perf_counter()
    build = compile_onnx(
        source,
        tuning_dir / "build",
        target,
        shapes,
        tuning_dir=tuning_dir,
        trials=trials,
        seed=seed,
        population=population,
        progress=lambda text: print(f"{model}: {text}", flush=True),
    )
    tuning_s = time.perf_counter() - started
    work_dir = tuning_dir / target.name
    previous = read_info(work_dir)
    info = TuningInfo(
        model=model,
        target=target.name,
        trials=build.trial_budget,
        tasks=build.tasks,
        measured=build.trials + (previous.measured if previous else 0),
        tuning_s=round(tuning_s + (previous.tuning_s if previous and build.trials else 0), 1),
        tvm_version=build.tvm_version,
        cpu=cpu_model(),
        date=f"{dt.datetime.now(dt.UTC):%Y-%m-%d}",
        population=population,
    )
    if build.trials:
        write_info(work_dir, info)
    else:  # nothing tuned: the records and their cost are the earlier ones
        info = previous or info
    destination = out / model / target.name
    kept = prune(work_dir, destination, build.task_keys)
    write_info(destination, info)
    print(f"{model}: {kept} records for {info.tasks} tasks in {destination}", flush=True)
    return info


def apply(repository: Path, models: Sequence[str], root: Path = RECORDS) -> list[str]:
    """Builds tuned TVM for this CPU's best target into the model repository for each of
    `models` that has committed records for that target, applying them (no tuning when
    they match the model). Returns one line per model."""
    from backends.compile.compiler import compile_model
    from backends.compile.tvm.targets import best_cpu_target, host_cpu_flags
    from backends.repository import ModelRepository

    target = best_cpu_target(host_cpu_flags())
    store = ModelRepository(repository)
    lines = []
    for model in models:
        records = records_for(model, root)
        info = read_info(records / target.name) if records else None
        if info is None:
            lines.append(f"{model}: no committed records for {target.name}")
            continue
        started = time.perf_counter()
        (outcome,) = compile_model(
            store.source(model),
            model,
            store,
            targets=["tvm-host"],
            trials=info.trials,
            tuning_records=records,
        )
        lines.append(
            f"{model}: {outcome.variant} {outcome.status} in "
            f"{time.perf_counter() - started:.1f} s ({outcome.detail})"
        )
    return lines


def check(repository: Path, models: Sequence[str], root: Path = RECORDS) -> tuple[list[str], bool]:
    """For each of `models`, whether its committed records for this CPU's best target fit
    every task of the model as the compiler sees it now (graph rewrites included): one
    line per model, and whether all fit. Imports TVM in this process."""
    import tempfile

    from backends.compile.tvm.records import check_records
    from backends.compile.tvm.targets import best_cpu_target, host_cpu_flags

    target = best_cpu_target(host_cpu_flags())
    lines, ok = [], True
    for model in models:
        records = records_for(model, root)
        folder = None if records is None else records / target.name
        if folder is None or not folder.is_dir():
            lines.append(f"{model}: no committed records for {target.name}")
            continue
        source, shapes = _compiled_graph(repository, model)
        with tempfile.TemporaryDirectory() as scratch:
            found = check_records(source, shapes, target, folder, Path(scratch))
        if found.unbudgeted or found.stale:
            ok = False
            lines.append(
                f"{model}: {found.tasks} tasks; would tune {found.unbudgeted or 'none'}; "
                f"schedules that no longer apply: {found.stale or 'none'}"
            )
        else:
            lines.append(f"{model}: the records fit all {found.tasks} tasks")
    return lines, ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m backends.compile.tvm.tuning",
        description="Tuning records of the demo models for this CPU's best TVM target.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    tune_parser = sub.add_parser(
        "tune", help="tune with MetaSchedule and write the pruned records (hours)"
    )
    tune_parser.add_argument(
        "--trials",
        type=int,
        default=None,
        help="trial budget per model (default: the committed records' budget, "
        f"else {DEFAULT_TRIALS})",
    )
    tune_parser.add_argument("--work", type=Path, default=ROOT / ".bench" / "tuning")
    tune_parser.add_argument("--out", type=Path, default=RECORDS)
    tune_parser.add_argument("--seed", type=int, default=0)
    tune_parser.add_argument(
        "--population",
        type=int,
        default=None,
        help="evolutionary search population per round (default: grows with the budget "
        "per task up to 512; smaller searches faster on a busy machine)",
    )
    apply_parser = sub.add_parser(
        "apply", help="build tuned TVM variants into the repository from the committed records"
    )
    check_parser = sub.add_parser(
        "check",
        help="whether the committed records fit every task of each model as it compiles now "
        "(exit 1 when a task would be tuned or a schedule no longer applies)",
    )
    for each in (tune_parser, apply_parser, check_parser):
        each.add_argument("--repository", type=Path, default=ROOT / "models")
        each.add_argument("--models", nargs="+", default=list(DEMO_MODELS))
    args = parser.parse_args(argv)
    if args.command == "apply":
        for line in apply(args.repository, args.models):
            print(line, flush=True)
        return 0
    if args.command == "check":
        lines, ok = check(args.repository, args.models)
        for line in lines:
            print(line, flush=True)
        return 0 if ok else 1
    from backends.compile.tvm.targets import best_cpu_target, host_cpu_flags

    target = best_cpu_target(host_cpu_flags())
    for model in args.models:
        committed = records_for(model, args.out)
        known = read_info(committed / target.name) if committed else None
        trials = args.trials or (known.trials if known else DEFAULT_TRIALS)
        info = tune(
            args.repository,
            model,
            target,
            trials,
            args.work,
            args.out,
            args.seed,
            args.population,
        )
        print(
            f"{model}: {info.trials} trials, {info.measured} measured, "
            f"{info.tuning_s:.0f} s of tuning",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
