"""The targets TVM compiles for (ISA levels of x86-64, CUDA architectures) and which CPU
targets a CPU runs, from its `/proc/cpuinfo` flags.

Tables and set logic only, cheap to import: the variant compiler, `tuning` and the gateway's
bench choose a target without loading TVM. Must not import TVM, onnx or onnxruntime (their
TVM form is made in `toolchain`), nor anything from gateway/.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.compile.cpu import cpu_flags


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


def host_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU flags of this machine (empty where /proc/cpuinfo is missing)."""
    return cpu_flags(cpuinfo)


def runnable_cpu_targets(flags: frozenset[str]) -> list[TvmTarget]:
    """The CPU targets a CPU with `flags` runs, most portable first."""
    return [t for t in CPU_TARGETS.values() if set(t.required_cpu_flags) <= flags]


def best_cpu_target(flags: frozenset[str]) -> TvmTarget:
    """The fastest CPU target a CPU with `flags` runs."""
    return runnable_cpu_targets(flags)[-1]
