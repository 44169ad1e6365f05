"""Which variants `switchyard compile --fleet` builds: hardware class -> TVM target."""

from __future__ import annotations

import pytest

from backends.compile.compiler import (
    ORT_TARGET,
    UnknownHardwareClass,
    fleet_targets,
    tvm_target_for_class,
    tvm_targets,
)


@pytest.mark.parametrize(
    ("hardware_class", "target"),
    [
        ("cpu-x86-64-v4-2c", "tvm-llvm-avx512"),
        ("cpu-x86-64-v4-1c", "tvm-llvm-avx512"),
        ("cpu-x86-64-v4", "tvm-llvm-avx512"),
        ("cpu-x86-64-v3-1c", "tvm-llvm-avx2"),
        ("cpu-x86-64-v2-1c", "tvm-llvm-x86-64"),
        ("cpu-x86-64-v1-8c", "tvm-llvm-x86-64"),
        ("gpu-cuda-h100", "tvm-cuda-sm_90"),
        ("gpu-cuda-h200", "tvm-cuda-sm_90"),
        ("gpu-cuda-h100-2x", "tvm-cuda-sm_90"),
        ("gpu-cuda-a100", "tvm-cuda-sm_80"),
        ("gpu-cuda-l4", "tvm-cuda-sm_89"),
        ("gpu-cuda-l40", "tvm-cuda-sm_89"),
        ("gpu-cuda-l40s", "tvm-cuda-sm_89"),
        ("gpu-cuda-ada", "tvm-cuda-sm_89"),
    ],
)
def test_each_hardware_class_gets_the_target_it_needs(hardware_class: str, target: str) -> None:
    assert tvm_target_for_class(hardware_class) == target
    assert [t.name for t in tvm_targets([target])] == [target.removeprefix("tvm-")]


@pytest.mark.parametrize(
    "hardware_class",
    [
        "cpu",
        "test-1c",
        "cpu-x86-64-v5-1c",
        "cpu-x86-64-v4c",
        "cpu-arm64-1c",
        "gpu-cuda-v100",
        "gpu-cuda-",
        "gpu-rocm-mi300",
        "CPU-X86-64-V4-2C",
    ],
)
def test_a_class_without_a_target_is_an_error_naming_it(hardware_class: str) -> None:
    with pytest.raises(UnknownHardwareClass, match=f"hardware class '{hardware_class}'"):
        tvm_target_for_class(hardware_class)


@pytest.mark.parametrize(
    ("classes", "targets"),
    [
        (["cpu-x86-64-v4-2c"], [ORT_TARGET, "tvm-llvm-avx512"]),
        (
            ["cpu-x86-64-v4-1c", "cpu-x86-64-v4-2c", "cpu-x86-64-v2-1c"],
            [ORT_TARGET, "tvm-llvm-avx512", "tvm-llvm-x86-64"],
        ),
        (
            ["gpu-cuda-h100", "cpu-x86-64-v3-1c", "gpu-cuda-h200", "gpu-cuda-l4"],
            [ORT_TARGET, "tvm-cuda-sm_90", "tvm-llvm-avx2", "tvm-cuda-sm_89"],
        ),
        ([], [ORT_TARGET]),
    ],
)
def test_fleet_targets_are_ort_then_each_needed_target_once(
    classes: list[str], targets: list[str]
) -> None:
    assert fleet_targets(classes) == targets


def test_fleet_targets_fail_on_the_first_unmappable_class() -> None:
    with pytest.raises(UnknownHardwareClass, match="'gpu-tpu-v5'"):
        fleet_targets(["cpu-x86-64-v4-2c", "gpu-tpu-v5"])
