"""A worker's default variant: the fastest by its profile for the worker's hardware class
and threads, else by the worker's measurement at start, else ONNX Runtime fp32; untuned
TVM never while another variant serves. And the figures it advertises, marked by source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backends.compile.profiler import figures, time_runs
from backends.profiles import Profile, ProfileEntry, write_profile
from backends.protocol.parameters import (
    MEASURED_AT_START,
    PROFILED,
    VariantProfile,
    profile_parameter,
    read_profile_parameter,
)
from backends.repository import ArtifactEntry, Manifest, TensorEntry, TuningEntry, Variant
from backends.worker.served import (
    VariantFigure,
    WorkerSettings,
    default_reason,
    default_variant,
    variant_figure,
)

TENSOR = [TensorEntry(name="x", datatype="FP32", shape=[-1, 4])]


def variant(name: str, directory: Path | None = None, tuned: bool | None = None) -> Variant:
    """A variant of model `m` (never loaded): TVM tuned or untuned when `tuned` is given."""
    manifest = Manifest(
        model="m",
        variant=name,
        runtime="onnxruntime" if tuned is None else "tvm",
        runtime_version="1",
        target="cpu",
        precision="fp32",
        max_batch_size=8,
        inputs=TENSOR,
        outputs=TENSOR,
        artifacts=[ArtifactEntry(path="model.onnx", sha256="0" * 64)],
        source_sha256="0" * 64,
        tuning=None if tuned is None else TuningEntry(tuned=tuned, trials=0, tasks=1, reused=False),
    )
    return Variant("m", name, directory or Path("/nonexistent") / name, manifest)


def figure(p50_ms: float, source: str = MEASURED_AT_START) -> VariantFigure:
    return VariantFigure(p50_ms, p50_ms * 2, None, source, 20)


def entry(p50_ms: float, hardware_class: str = "cpu-x86-64-v4-1c", **extra: object) -> ProfileEntry:
    return ProfileEntry.model_validate(
        {
            "hardware_class": hardware_class,
            "threads": 1,
            "batch_size": 1,
            "p50_ms": p50_ms,
            "p99_ms": p50_ms * 2,
            "throughput_per_s": 1000 / p50_ms,
            "runs": 50,
            **extra,
        }
    )


@pytest.mark.parametrize(
    ("timed", "expected"),
    [
        ({"ort-cpu-fp32": 2.0, "ort-cpu-int8-qdq": 0.5}, "ort-cpu-int8-qdq"),
        ({"ort-cpu-fp32": 0.5, "ort-cpu-int8-qdq": 2.0}, "ort-cpu-fp32"),
        # Equal figures: the first by name, so the choice does not depend on dict order.
        ({"ort-cpu-int8-qdq": 1.0, "ort-cpu-fp16": 1.0}, "ort-cpu-fp16"),
        # Only one variant has a figure: it is the only one known to be fast.
        ({"ort-cpu-int8-qdq": 3.0}, "ort-cpu-int8-qdq"),
        # No figures at all: ONNX Runtime fp32.
        ({}, "ort-cpu-fp32"),
    ],
)
def test_the_default_is_the_fastest_variant_with_a_figure(
    timed: dict[str, float], expected: str
) -> None:
    variants = {n: variant(n) for n in ("ort-cpu-fp16", "ort-cpu-fp32", "ort-cpu-int8-qdq")}
    assert default_variant(variants, {n: figure(p50) for n, p50 in timed.items()}) == expected


def test_untuned_tvm_is_never_the_default_while_another_variant_serves() -> None:
    variants = {
        "ort-cpu-fp32": variant("ort-cpu-fp32"),
        "tvm-llvm-avx512-fp32-untuned": variant("tvm-llvm-avx512-fp32-untuned", tuned=False),
        "tvm-llvm-avx512-fp32": variant("tvm-llvm-avx512-fp32", tuned=True),
    }
    timed = {
        "ort-cpu-fp32": figure(2.0),
        "tvm-llvm-avx512-fp32-untuned": figure(0.1),
        "tvm-llvm-avx512-fp32": figure(1.0),
    }
    assert default_variant(variants, timed) == "tvm-llvm-avx512-fp32"
    del variants["tvm-llvm-avx512-fp32"]
    assert default_variant(variants, timed) == "ort-cpu-fp32"
    assert default_variant(variants, {}) == "ort-cpu-fp32"
    only = {"tvm-llvm-avx512-fp32-untuned": variants["tvm-llvm-avx512-fp32-untuned"]}
    assert default_variant(only, timed) == "tvm-llvm-avx512-fp32-untuned"


def test_without_fp32_or_figures_the_first_variant_by_name() -> None:
    variants = {n: variant(n) for n in ("ort-cpu-int8-qdq", "ort-cpu-fp16")}
    assert default_variant(variants, {}) == "ort-cpu-fp16"


def test_a_profile_for_this_class_and_threads_comes_before_a_measurement(tmp_path: Path) -> None:
    settings = WorkerSettings(repository=tmp_path, hardware_class="cpu-x86-64-v4-1c")
    profiled = variant("ort-cpu-fp32", tmp_path / "fp32")
    profiled.directory.mkdir()
    write_profile(
        profiled.directory,
        Profile(
            model="m",
            variant="ort-cpu-fp32",
            entries=[entry(3.0), entry(0.1, "cpu-x86-64-v4-2c"), entry(0.2, threads=2)],
        ),
    )
    measured_here = entry(0.7, runs=20)
    got = variant_figure(profiled, settings, measured_here)
    assert got == VariantFigure(3.0, 6.0, None, PROFILED, 50)
    # Another class's (or thread count's) profile does not stand for this worker.
    other = WorkerSettings(repository=tmp_path, hardware_class="cpu-x86-64-v3-1c")
    assert variant_figure(profiled, other, measured_here) == VariantFigure(
        0.7, 1.4, None, MEASURED_AT_START, 20
    )
    assert variant_figure(profiled, other, None) is None
    assert variant_figure(variant("none", tmp_path / "none"), settings, None) is None


def test_a_profiled_figure_is_shifted_by_the_workers_emulated_delay(tmp_path: Path) -> None:
    profiled = variant("ort-cpu-fp32", tmp_path)
    write_profile(
        tmp_path,
        Profile(model="m", variant="ort-cpu-fp32", entries=[entry(3.0, emulated_latency_ms=1.0)]),
    )
    settings = WorkerSettings(
        repository=tmp_path, hardware_class="cpu-x86-64-v4-1c", emulate_latency_ms=5.0
    )
    got = variant_figure(profiled, settings, None)
    assert got is not None and (got.p50_ms, got.p99_ms) == (7.0, 10.0)


def test_the_log_line_says_where_the_defaults_figure_came_from() -> None:
    settings = WorkerSettings(repository=Path("."), hardware_class="cpu-x86-64-v4-1c")
    assert default_reason("a", {"a": figure(0.25, PROFILED)}, settings) == (
        "p50 0.25 ms at batch 1, profile for cpu-x86-64-v4-1c/1 thread"
    )
    assert default_reason("a", {"a": figure(0.25)}, settings) == (
        "p50 0.25 ms at batch 1, measured at start, 20 runs"
    )
    assert "fallback" in default_reason("ort-cpu-fp32", {}, settings)


def test_the_advertised_profile_says_each_figures_source() -> None:
    profiles = [VariantProfile("a", 1.0, 2.0, 0.25), VariantProfile("b", 0.5, 0.75, None)]
    text = profile_parameter(profiles, {"b": MEASURED_AT_START})
    assert [e["source"] for e in json.loads(text)] == [PROFILED, MEASURED_AT_START]
    # A reader that knows no `source` (the gateway's) takes the figures as before.
    assert read_profile_parameter(text) == (tuple(profiles), [])


class Clock:
    """A clock each call to the timed function advances by `step_s`."""

    def __init__(self, step_s: float) -> None:
        self.now_s = 0.0
        self.step_s = step_s
        self.calls = 0

    def __call__(self) -> float:
        return self.now_s

    def run(self) -> None:
        self.calls += 1
        self.now_s += self.step_s


@pytest.mark.parametrize(
    ("step_s", "budget_s", "runs"),
    [(0.001, 0.5, 20), (0.1, 0.5, 5), (2.0, 0.5, 1), (0.1, None, 20)],
)
def test_measuring_stops_at_the_run_count_or_the_time_budget(
    step_s: float, budget_s: float | None, runs: int
) -> None:
    clock = Clock(step_s)
    times_ms = time_runs(clock.run, 20, 0.5, budget_s, clock)
    assert clock.calls == len(times_ms) == runs
    assert times_ms == pytest.approx([step_s * 1000 + 0.5] * runs)
    got = figures(times_ms, 1)
    assert got["runs"] == runs and got["p50_ms"] == pytest.approx(step_s * 1000 + 0.5)
