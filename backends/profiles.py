"""Variant profiles: measured latency and throughput of a variant on a hardware
class, stored next to the variant (`profile.json`) as the router's prior and the
worker's choice of default variant. Written by `switchyard compile` (this host's
hardware class, after building) and `switchyard profile` (each hardware class of a
fleet). A worker never writes here: it measures a variant without a profile for its
hardware class when it starts, and keeps that figure in memory.

Imports pydantic and the repository only: no grpc, no generated protobuf, nothing from
the gateway.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.repository import Variant

PROFILE = "profile.json"


class ProfileEntry(BaseModel):
    """One measurement: a variant on a hardware class, at a thread count and batch size."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    hardware_class: str
    threads: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    p50_ms: float = Field(ge=0)
    p99_ms: float = Field(ge=0)
    throughput_per_s: float = Field(ge=0)
    """Inferences (rows) per second at this batch size, one call at a time."""
    runs: int = Field(ge=1)
    emulated_latency_ms: float = 0.0
    """Service delay added to stand for slower hardware (included in the figures)."""


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    format_version: int = 1
    model: str
    variant: str
    entries: list[ProfileEntry] = []


def read_profile(variant: Variant) -> Profile | None:
    path = variant.directory / PROFILE
    try:
        return Profile.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError, ValidationError):
        return None


def write_profile(directory: Path, profile: Profile) -> None:
    (directory / PROFILE).write_text(profile.model_dump_json(indent=2) + "\n")


def profiled_entry(
    variant: Variant, hardware_class: str, threads: int, batch_size: int = 1
) -> ProfileEntry | None:
    """The variant's measurement on this hardware class, thread count and batch size."""
    profile = read_profile(variant)
    return None if profile is None else profile_entry(profile, hardware_class, threads, batch_size)


def profile_entry(
    profile: Profile, hardware_class: str, threads: int, batch_size: int = 1
) -> ProfileEntry | None:
    """`profile`'s measurement on this hardware class, thread count and batch size."""
    for entry in profile.entries:
        if (entry.hardware_class, entry.threads, entry.batch_size) == (
            hardware_class,
            threads,
            batch_size,
        ):
            return entry
    return None


def profiled_p50_ms(
    variant: Variant, hardware_class: str, threads: int, batch_size: int = 1
) -> float | None:
    """The variant's measured p50 on this hardware class and thread count, if any."""
    entry = profiled_entry(variant, hardware_class, threads, batch_size)
    return None if entry is None else entry.p50_ms


def profile_row_fraction(
    profile: Profile, hardware_class: str, threads: int, shift_ms: float = 0.0
) -> float | None:
    """What each extra row of a batch adds to one call's time, as a fraction of a
    one-row call's, on this hardware class and thread count (batch 1 against the
    largest batch profiled): about 1 where batching saves nothing, near 0 where a
    batch costs what one row does. `shift_ms` per row is added to both (a worker's
    emulated delay beyond the profile's). None without batch 1 and a larger batch."""
    entries = {
        e.batch_size: e
        for e in profile.entries
        if (e.hardware_class, e.threads) == (hardware_class, threads) and e.throughput_per_s > 0
    }
    if 1 not in entries or len(entries) < 2:
        return None
    largest = max(entries)
    one = 1000.0 / entries[1].throughput_per_s + shift_ms
    many = 1000.0 * largest / entries[largest].throughput_per_s + shift_ms * largest
    if one <= 0:
        return None
    return min(1.0, max(0.0, (many / one - 1.0) / (largest - 1)))
