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


def missing_flags(required: list[str] | tuple[str, ...], flags: frozenset[str]) -> list[str]:
    """The required flags this CPU lacks (empty: it can run the variant)."""
    return [flag for flag in required if flag not in flags]
