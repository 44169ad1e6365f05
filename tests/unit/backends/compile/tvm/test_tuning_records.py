"""Committed tuning records: pruning MetaSchedule's JSON database to the best record of
each workload, and the records committed for the demo models. Pure file handling, no TVM."""

from __future__ import annotations

import json
from pathlib import Path

from backends.compile.tvm.records import BUDGETS
from backends.compile.tvm.targets import CPU_TARGETS
from backends.compile.tvm.tuning import (
    DEMO_MODELS,
    INFO,
    RECORDS,
    TUNING_RECORDS,
    WORKLOADS,
    TuningInfo,
    prune,
    read_info,
    records_for,
)

FAILED = 1e10  # what MetaSchedule records for a candidate that did not build or run


def record(index: int, name: str, run_secs: list[float]) -> str:
    trace = [[["GetSBlock", [], [name, "main"], ["b0"]]], []]
    return json.dumps([index, [trace, run_secs, {"kind": "llvm"}, []]]) + "\n"


def write_database(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / WORKLOADS).write_text(
        "".join(json.dumps([str(hash_), f"mod{i}"]) + "\n" for i, hash_ in enumerate((11, 22, 33)))
    )
    (folder / TUNING_RECORDS).write_text(
        record(0, "slow", [3e-6, 3e-6])
        + record(2, "only-failed", [FAILED])
        + record(0, "fast", [1e-6, 2e-6])
        + record(1, "single", [5e-6])
        + record(0, "failed", [FAILED])
    )
    (folder / BUDGETS).write_text(json.dumps({"11": 100, "22": 100, "33": 100}))


def read_lines(path: Path) -> list[list[object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prune_keeps_the_fastest_valid_record_of_each_workload(tmp_path: Path) -> None:
    write_database(tmp_path / "work")
    assert prune(tmp_path / "work", tmp_path / "out") == 2
    assert read_lines(tmp_path / "out" / WORKLOADS) == [["11", "mod0"], ["22", "mod1"]]
    records = read_lines(tmp_path / "out" / TUNING_RECORDS)
    kept = [(index, body[0][0][0][2][0], body[1]) for index, body in records]  # type: ignore[index]
    assert kept == [(0, "fast", [1e-6, 2e-6]), (1, "single", [5e-6])]
    # The budgets go along: a task searched without a valid schedule still counts as tuned.
    assert json.loads((tmp_path / "out" / BUDGETS).read_text())["33"] == 100


def test_prune_keeps_only_the_given_workloads(tmp_path: Path) -> None:
    write_database(tmp_path / "work")
    assert prune(tmp_path / "work", tmp_path / "out", keys={"22", "33"}) == 1
    assert read_lines(tmp_path / "out" / WORKLOADS) == [["22", "mod1"]]
    assert [r[0] for r in read_lines(tmp_path / "out" / TUNING_RECORDS)] == [0]
    assert json.loads((tmp_path / "out" / BUDGETS).read_text()) == {"22": 100, "33": 100}


def test_records_for_finds_only_existing_folders(tmp_path: Path) -> None:
    (tmp_path / "cnn").mkdir()
    assert records_for("cnn", tmp_path) == tmp_path / "cnn"
    assert records_for("nothing", tmp_path) is None


def test_committed_records_are_small_pruned_and_described() -> None:
    """Whatever is committed: one record per workload, a budget per task, its cost known,
    and a few MB in all."""
    total = 0
    for model in DEMO_MODELS:
        folder = records_for(model)
        if folder is None:
            continue
        for target_dir in folder.iterdir():
            assert target_dir.name in CPU_TARGETS
            info = read_info(target_dir)
            assert isinstance(info, TuningInfo), f"{target_dir / INFO} unreadable"
            assert (info.model, info.target) == (model, target_dir.name)
            workloads = read_lines(target_dir / WORKLOADS)
            indices = [r[0] for r in read_lines(target_dir / TUNING_RECORDS)]
            assert indices == list(range(len(workloads)))
            budgets = json.loads((target_dir / BUDGETS).read_text())
            assert {w[0] for w in workloads} <= set(budgets)
            assert len(budgets) == info.tasks
            total += sum(f.stat().st_size for f in target_dir.iterdir())
    assert total < 8_000_000
    assert RECORDS.name == "tuning_records"
