"""Protocol converters (gateway/serving/converters.py)."""

from __future__ import annotations

from gateway.serving.converters import parse_profile


def test_profile_parameter_parses_row_fractions_and_skips_bad_entries() -> None:
    text = "a:1:2;b:1.5:3:0.25;c:1:2:x;d:1:2:5;e:nope:2;f:1"
    assert parse_profile(text) == (
        ("a", 1.0, 2.0, None),
        ("b", 1.5, 3.0, 0.25),
        ("c", 1.0, 2.0, None),
        ("d", 1.0, 2.0, None),
    )
