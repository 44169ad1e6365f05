"""What this machine's CPU can run and what it is: its /proc/cpuinfo flags and model name.

Imports the standard library only.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path


@cache
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The flags of the first processor listed (empty where /proc is unavailable)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The model name of the first processor listed ("unknown" where /proc is unavailable)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return "unknown"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return "unknown"


EXACT_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
"""x86-64 flags of an int8 dot product that accumulates in int32 (VNNI, AMX)."""


def int8_dot_products(flags: frozenset[str]) -> str | None:
    """How ONNX Runtime's int8 kernels multiply on a CPU with these flags: `exact` with
    VNNI or AMX (products summed in int32); `saturating` on other x86-64 CPUs, whose AVX2
    kernel (vpmaddubsw) sums pairs of uint8 x int8 products in int16, which saturates,
    so an int8 model's outputs there differ from a VNNI CPU's; None where the flags are
    not x86-64's (unknown)."""
    if any(flag in flags for flag in EXACT_INT8_FLAGS):
        return "exact"
    if "sse2" in flags:
        return "saturating"
    return None


def missing_flags(required: list[str] | tuple[str, ...], flags: frozenset[str]) -> list[str]:
    """The required flags this CPU lacks (empty: it can run the variant)."""
    return [flag for flag in required if flag not in flags]
