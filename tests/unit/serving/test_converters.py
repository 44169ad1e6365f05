"""Protocol converters (gateway/serving/converters.py)."""

from __future__ import annotations

import json

from backends.protocol.parameters import VariantProfile, profile_parameter
from gateway.serving.converters import parse_profile


def test_profile_parameter_parses_row_fractions_and_skips_bad_entries() -> None:
    text = json.dumps(
        [
            {"variant": "a", "p50_ms": 1, "p99_ms": 2, "row_fraction": None},
            {"variant": "b", "p50_ms": 1.5, "p99_ms": 3, "row_fraction": 0.25},
            {"variant": "c", "p50_ms": 1, "p99_ms": 2, "row_fraction": "x"},
            {"variant": "d", "p50_ms": 1, "p99_ms": 2, "row_fraction": 5},
            {"variant": "e", "p50_ms": "nope", "p99_ms": 2},
            {"variant": "f", "p50_ms": 1},
        ]
    )
    assert parse_profile(text) == (
        ("a", 1.0, 2.0, None),
        ("b", 1.5, 3.0, 0.25),
        ("c", 1.0, 2.0, None),
        ("d", 1.0, 2.0, None),
    )


def test_profile_parameter_round_trips_and_bad_json_is_no_profile() -> None:
    profiles = (VariantProfile("a", 1.23456, 2.5, None), VariantProfile("b", 0.1, 0.2, 0.25))
    assert parse_profile(profile_parameter(profiles)) == (
        ("a", 1.235, 2.5, None),
        ("b", 0.1, 0.2, 0.25),
    )
    for text in ("a:1:2;b:1.5:3:0.25", "{}", "[1, 2]", ""):
        assert parse_profile(text) == ()
