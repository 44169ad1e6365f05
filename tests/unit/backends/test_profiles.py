"""Compile-time profiles (backends/profiles.py): what each extra row of a batch costs."""

from __future__ import annotations

import pytest

from backends.profiles import Profile, ProfileEntry, profile_row_fraction


def test_row_fraction_comes_from_the_profile_at_batch_1_and_the_largest_batch() -> None:
    def entry(batch: int, per_call_ms: float, hardware: str = "cpu-1c") -> ProfileEntry:
        return ProfileEntry(
            hardware_class=hardware,
            threads=1,
            batch_size=batch,
            p50_ms=per_call_ms,
            p99_ms=per_call_ms,
            throughput_per_s=1000.0 * batch / per_call_ms,
            runs=10,
        )

    # One row 2 ms, 16 rows 8 ms: each extra row adds 6/15 ms = 0.2 of a row.
    profile = Profile(
        model="m", variant="v", entries=[entry(1, 2.0), entry(4, 4.0), entry(16, 8.0)]
    )
    assert profile_row_fraction(profile, "cpu-1c", 1) == pytest.approx(0.2)
    # A worker emulating 8 ms more per row: batching saves almost nothing.
    assert profile_row_fraction(profile, "cpu-1c", 1, shift_ms=8.0) == pytest.approx(
        (8.0 + 16 * 8.0) / (2.0 + 8.0) / 15 - 1 / 15
    )
    assert profile_row_fraction(profile, "gpu", 1) is None  # not profiled there
    assert (
        profile_row_fraction(Profile(model="m", variant="v", entries=[entry(1, 2.0)]), "cpu-1c", 1)
        is None
    )
