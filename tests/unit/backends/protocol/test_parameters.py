"""Request parameters as caller input: kind, finiteness and range, each bad value an
InvalidInput naming the parameter and the value; parameters maps bounded."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.protocol.errors import InvalidInput
from backends.protocol.parameters import (
    MAX_PARAMETERS,
    MAX_PRIORITY,
    MAX_SLA_MS,
    MAX_STRING_PARAMETER_BYTES,
    MAX_TIMEOUT_US,
    check_parameter_map,
    checked_due_us,
    checked_priority,
    checked_sla_ms,
    checked_timeout_us,
    read_profile_parameter,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(5, 5.0), (0.5, 0.5), ("20", 20.0), (" 2.5 ", 2.5), (MAX_SLA_MS, MAX_SLA_MS), (2**63, None)],
)
def test_sla_ms_takes_positive_finite_numbers_up_to_an_hour(
    value: object, expected: float | None
) -> None:
    if expected is None:
        with pytest.raises(InvalidInput, match="must be at most 3600000 ms"):
            checked_sla_ms(value)
    else:
        assert checked_sla_ms(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (math.nan, "'sla_ms' must be a finite number, got nan"),
        (math.inf, "'sla_ms' must be a finite number, got inf"),
        ("NaN", "'sla_ms' must be a finite number, got nan"),
        ("1e999", "'sla_ms' must be a finite number, got inf"),
        (1e30, "'sla_ms' must be at most 3600000 ms, got 1e+30"),
        (0, "'sla_ms' must be positive, got 0"),
        (-5, "'sla_ms' must be positive, got -5"),
        (True, "'sla_ms' must be a number, got True"),
        ("fast", "'sla_ms' must be a number, got 'fast'"),
        ("9" * 5000, "'sla_ms' must be a number, got '99999"),
    ],
)
def test_bad_sla_ms_names_the_parameter_and_the_value(value: object, message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        checked_sla_ms(value)
    assert message in str(caught.value)
    assert len(str(caught.value)) < 200


def test_timeout_is_positive_finite_microseconds_up_to_an_hour() -> None:
    assert checked_timeout_us(50_000) == 50_000.0
    assert checked_timeout_us(MAX_TIMEOUT_US) == MAX_TIMEOUT_US
    for bad, message in [
        (0, "'timeout' must be positive"),
        (-1.0, "'timeout' must be positive"),
        (math.nan, "'timeout' must be a finite number"),
        (2**64 - 1, "'timeout' must be at most 3600000000 us"),
        ("soon", "'timeout' must be a number"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            checked_timeout_us(bad)


def test_priority_is_a_uint64_and_nothing_else() -> None:
    assert checked_priority(None) == 0
    assert checked_priority(3) == 3
    assert checked_priority(3.0) == 3
    assert checked_priority(" 7 ") == 7
    assert checked_priority(MAX_PRIORITY) == MAX_PRIORITY
    for bad in (-1, 1.5, math.nan, math.inf, "high", "²", "١٢", True, "-3"):
        with pytest.raises(InvalidInput, match="'priority' must be a non-negative integer"):
            checked_priority(bad)
    for huge in (MAX_PRIORITY + 1, 1e30, "9" * 30):
        with pytest.raises(InvalidInput, match="'priority' must be at most 18446744073709551615"):
            checked_priority(huge)
    with pytest.raises(InvalidInput, match="'switchyard_due_us' must be at most"):
        checked_due_us(2**63)


@given(st.one_of(st.floats(), st.integers(), st.text(max_size=30), st.booleans()))
def test_checks_answer_any_value_with_a_number_or_invalid_input(value: object) -> None:
    for check in (checked_sla_ms, checked_timeout_us, checked_priority, checked_due_us):
        try:
            result = check(value)
        except InvalidInput:
            continue
        assert result is None or math.isfinite(result)


def test_parameter_maps_are_bounded() -> None:
    check_parameter_map("request", {f"p{i}": i for i in range(MAX_PARAMETERS)})
    with pytest.raises(InvalidInput, match=f"request has 65 parameters; at most {MAX_PARAMETERS}"):
        check_parameter_map("request", {f"p{i}": i for i in range(MAX_PARAMETERS + 1)})
    long = "x" * (MAX_STRING_PARAMETER_BYTES + 1)
    with pytest.raises(InvalidInput, match="input 'x' parameter 'k' is a string of 4097 bytes"):
        check_parameter_map("input 'x'", {"k": long})
    with pytest.raises(InvalidInput, match="parameter name of 4097 bytes") as caught:
        check_parameter_map("request", {long: 1})
    assert len(str(caught.value)) < 200


def test_profile_figures_that_are_not_finite_or_believable_are_left_out() -> None:
    text = (
        '[{"variant": "a", "p50_ms": Infinity, "p99_ms": 2},'
        ' {"variant": "b", "p50_ms": 1, "p99_ms": NaN},'
        ' {"variant": "c", "p50_ms": -1, "p99_ms": 2},'
        ' {"variant": "d", "p50_ms": 1e300, "p99_ms": 1e301},'
        ' {"variant": "e", "p50_ms": 1, "p99_ms": 2}]'
    )
    profiles, problems = read_profile_parameter(text)
    assert [p.variant for p in profiles] == ["e"]
    assert len(problems) == 4
    assert read_profile_parameter("[" * 100_000)[0] == ()  # too deep: no profile, no exception
