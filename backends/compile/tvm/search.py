"""MetaSchedule's search over a model's tuning tasks: the passes before task extraction,
a builder that builds candidates in this process, and a tuning run sized to the trial budget
(search rounds, population, the cores candidates are measured on), on a machine that can
run the target's code.

What the search leaves behind (the tuning folder, its records and budgets) is `records`'
concern. TVM is imported inside the functions that use it, never at import time. Must not
import TVM at module level, nor anything from gateway/.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from backends.compile.tvm.targets import TvmTarget, host_cpu_flags

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


class TuningUnavailable(Exception):
    """Tuning measures candidates on this machine, which cannot run the target's code."""


def prepare_for_tuning(tvm: Any, mod: Any, target: Any) -> Any:
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


TENSOR_INTRINSICS = "tvm.s_tir.tensor_intrin"


@contextlib.contextmanager
def _x86_tensor_intrinsics_only() -> Iterator[None]:
    """While MetaSchedule's tune contexts are made and tuned: its tensor intrinsics package
    holding x86's alone. Every TuneContext imports the whole package, which registers the
    intrinsics of every GPU and CPU TVM knows: 26 s per compile process on a 2-core Zen 3
    (CUDA's alone 19 s), where the x86 targets tuned here (check_tunable refuses the rest)
    use x86's (VNNI and AVX-512 dot products, 0.4 s). Afterwards the package is the real
    one again for any later import (x86's module stays loaded, registered once)."""
    if TENSOR_INTRINSICS in sys.modules:  # already loaded whole: nothing to save
        yield
        return
    import tvm  # type: ignore[import-untyped, unused-ignore]

    package = types.ModuleType(TENSOR_INTRINSICS)
    package.__path__ = [os.path.join(os.path.dirname(tvm.__file__), "s_tir", "tensor_intrin")]
    sys.modules[TENSOR_INTRINSICS] = package
    try:
        importlib.import_module(f"{TENSOR_INTRINSICS}.x86")
        yield
    finally:
        if sys.modules.get(TENSOR_INTRINSICS) is package:
            del sys.modules[TENSOR_INTRINSICS]


def _quiet_meta_schedule() -> None:
    """MetaSchedule prints its task table on stdout at INFO; its log files keep it."""
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    if ms_logger.level == logging.NOTSET:
        ms_logger.setLevel(logging.WARNING)


def tune_tasks(
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
        with _x86_tensor_intrinsics_only():
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


def check_tunable(target: TvmTarget) -> None:
    """Raises TuningUnavailable unless this machine can measure candidates for `target`."""
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
