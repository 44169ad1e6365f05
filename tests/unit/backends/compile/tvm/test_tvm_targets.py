"""The TVM target tables and host-CPU matching: pure logic, no TVM imported."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.compile.tvm.targets import (
    CPU_TARGETS,
    CUDA_TARGETS,
    best_cpu_target,
    host_cpu_flags,
    runnable_cpu_targets,
)

V3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
V4 = V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


@pytest.mark.parametrize(
    ("flags", "runnable"),
    [
        (set(), ["llvm-x86-64"]),
        ({"sse2", "sse4_2"}, ["llvm-x86-64"]),
        (V3 - {"fma"}, ["llvm-x86-64"]),
        (V3, ["llvm-x86-64", "llvm-avx2"]),
        (V3 | {"avx512f"}, ["llvm-x86-64", "llvm-avx2"]),
        (V4, ["llvm-x86-64", "llvm-avx2", "llvm-avx512"]),
        (V4 - {"avx2"}, ["llvm-x86-64"]),
        (V4 | {"amx_tile", "avx512_fp16"}, ["llvm-x86-64", "llvm-avx2", "llvm-avx512"]),
    ],
)
def test_runnable_targets_follow_cpu_flags(flags: set[str], runnable: list[str]) -> None:
    assert [t.name for t in runnable_cpu_targets(frozenset(flags))] == runnable
    assert best_cpu_target(frozenset(flags)).name == runnable[-1]


def test_host_cpu_flags_reads_the_flags_line(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 fma\nbugs\t\t: spectre\n"
    )
    assert host_cpu_flags(cpuinfo) == frozenset({"fpu", "sse2", "avx2", "fma"})
    assert host_cpu_flags(tmp_path / "missing") == frozenset()


def test_target_tables_are_tvm_027_dicts() -> None:
    for name, target in CPU_TARGETS.items():
        assert target.name == name and name.startswith("llvm-")
        assert target.target["kind"] == "llvm" and target.target["mcpu"]
        assert not target.is_cuda and target.host is None
    for name, target in CUDA_TARGETS.items():
        assert target.name == name == f"cuda-{target.target['arch']}"
        assert target.is_cuda and target.host is not None and target.required_cpu_flags == ()
    assert "cuda-sm_90" in CUDA_TARGETS
