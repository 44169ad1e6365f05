"""TVM's compiler, imported on first use: `load_tvm` (which refuses a runtime-only install
or process), a target in TVM's form, the check that the tools a build needs are here, and
a one-line summary of TVM's long error texts.

TVM itself (the 260 MB compiler library) is imported inside `load_tvm` only, never at
import time: a process that imports this module can still choose to load TVM's runtime
only. Must not import TVM at module level, nor anything from gateway/.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

from backends.compile.tvm.search import TUNING_THREADS
from backends.compile.tvm.targets import TvmTarget


class ToolchainMissing(Exception):
    """A tool the target needs is missing here (CUDA code generator, C++ compiler)."""


def load_tvm() -> Any:
    """The `tvm` package with its compiler; ToolchainMissing where only its runtime is
    installed, or loaded in this process."""
    from backends.runtimes.install import runtime_only, tvm_package

    package = None if "tvm" in sys.modules else tvm_package()
    if package is not None and runtime_only(package):
        raise ToolchainMissing(
            f"TVM at {package} is runtime-only (its compiler was removed by "
            "`python -m backends.runtimes.install runtime-only`, as for a backend worker): "
            "compiling needs a full apache-tvm install"
        )
    import tvm  # type: ignore[import-untyped, unused-ignore]

    if tvm.base._RUNTIME_ONLY:
        raise ToolchainMissing(
            "this process loaded TVM's runtime only (TVM_USE_RUNTIME_LIB=1): "
            "compiling needs the full TVM library, in a process that does not set it"
        )
    return tvm


def tvm_target_for(tvm: Any, target: TvmTarget, *, tuning: bool) -> Any:
    """`target` as a `tvm.target.Target` (with the core count tuning needs on a CPU)."""
    spec = dict(target.target)
    if tuning and spec.get("kind") == "llvm":
        # MetaSchedule's CPU rules size parallel loops by the core count and refuse a
        # target without one.
        spec.setdefault("num-cores", TUNING_THREADS)
    if target.host is not None:
        return tvm.target.Target(spec, host=dict(target.host))
    return tvm.target.Target(spec)


def check_toolchain(tvm: Any, target: TvmTarget) -> None:
    """Raises ToolchainMissing unless the tools a build for `target` needs are here."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise ToolchainMissing(
            f"export_library links the library with {compiler!r}, which is not on PATH "
            "(install g++ or set CXX)"
        )
    if target.is_cuda and tvm.get_global_func("target.build.cuda", allow_missing=True) is None:
        raise ToolchainMissing(
            f"{target.name}: this TVM build has no CUDA code generator (target.build.cuda)"
        )


def error_summary(error: BaseException) -> str:
    """The error's type and the last line of its message."""
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    # TVM errors end with the message after a C++ backtrace.
    return f"{type(error).__name__}: {lines[-1] if lines else text}"
