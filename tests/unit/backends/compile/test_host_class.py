"""The hardware class `switchyard compile` measures its variants as: named from this CPU's
x86-64 level in the fleet's naming, or the fleet's classes of this host's level."""

from __future__ import annotations

import pytest

from backends.compile.compiler import (
    class_threads,
    host_hardware_class,
    profile_classes,
    tvm_target_for_class,
)
from backends.compile.profiler import HardwareClass

V2 = frozenset({"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"})
V3 = V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
V4 = V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


@pytest.mark.parametrize(
    ("flags", "threads", "expected", "target"),
    [
        (V4, 1, "cpu-x86-64-v4-1c", "tvm-llvm-avx512"),
        (V4, 2, "cpu-x86-64-v4-2c", "tvm-llvm-avx512"),
        (V3, 1, "cpu-x86-64-v3-1c", "tvm-llvm-avx2"),
        (V4 - {"avx512bw"}, 1, "cpu-x86-64-v3-1c", "tvm-llvm-avx2"),
        (V2, 4, "cpu-x86-64-v2-4c", "tvm-llvm-x86-64"),
        (frozenset({"sse2"}), 1, "cpu-x86-64-v1-1c", "tvm-llvm-x86-64"),
    ],
)
def test_the_host_class_names_its_level_and_cores_as_the_fleet_does(
    flags: frozenset[str], threads: int, expected: str, target: str
) -> None:
    assert host_hardware_class(flags, threads) == expected
    # A name the compiler's own class -> target mapping reads back.
    assert tvm_target_for_class(expected) == target


def test_a_class_names_its_cores() -> None:
    assert class_threads("cpu-x86-64-v4-2c") == 2
    assert class_threads("cpu-x86-64-v4-16c") == 16
    assert class_threads("cpu-x86-64-v4") is None
    assert class_threads("gpu-cuda-h100") is None


def test_a_named_class_is_measured_as_given() -> None:
    assert profile_classes("lab-box", 3, ["cpu-x86-64-v4-1c"], V4, 8) == (
        [HardwareClass("lab-box", 3)],
        [],
    )


def test_without_a_fleet_the_host_class_at_the_profile_threads() -> None:
    assert profile_classes(None, 2, [], V3, 8) == ([HardwareClass("cpu-x86-64-v3-2c", 2)], [])


def test_the_fleets_classes_of_this_hosts_level_at_their_cores() -> None:
    fleet = [
        "cpu-x86-64-v4-1c",
        "cpu-x86-64-v4-2c",
        "cpu-x86-64-v4-1c",  # a second backend of the same class: measured once
        "cpu-x86-64-v3-1c",
        "cpu-x86-64-v4-8c",
        "gpu-cuda-h100",
        "cpu-x86-64-v4",
    ]
    chosen, left = profile_classes(None, 1, fleet, V4, 2)
    assert chosen == [
        HardwareClass("cpu-x86-64-v4-1c", 1),
        HardwareClass("cpu-x86-64-v4-2c", 2),
        HardwareClass("cpu-x86-64-v4", 1),
    ]
    assert left == [
        "cpu-x86-64-v3-1c: this host is x86-64-v4",
        "cpu-x86-64-v4-8c: needs 8 cores, this host has 2",
        "gpu-cuda-h100: not a CPU class",
    ]


def test_a_fleet_with_no_class_of_this_level_measures_the_host_class() -> None:
    chosen, left = profile_classes(None, 1, ["cpu-x86-64-v4-1c"], V3, 2)
    assert chosen == [HardwareClass("cpu-x86-64-v3-1c", 1)]
    assert left == ["cpu-x86-64-v4-1c: this host is x86-64-v3"]
