"""The request and model-configuration parameters that Switchyard's worker and gateway
both read or write, each in one place: Triton's `priority` and its queue rank, the
`switchyard_due_us` deadline, and the `switchyard_profile` a worker advertises in its
model configuration (each variant's p50, p99 and row fraction: the gateway's prior).

Plain values in, plain values out: imports no grpc, no protobuf and nothing from the
gateway (the worker and the gateway's converters put these on and take them off the
wire).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import NamedTuple

from backends.protocol.errors import InvalidInput

DUE_PARAMETER = "switchyard_due_us"
"""The request parameter by which a request is due: microseconds from its arrival."""

PROFILE_PARAMETER = "switchyard_profile"
"""The model-configuration parameter holding the worker's profile of each variant."""

DEFAULT_PRIORITY_LEVEL = 2**64
"""Where priority 0 (the default) ranks: after every explicit level (Triton's priorities
are uint64)."""

MAX_ROW_FRACTION = 2.0
"""The largest believable row fraction: an extra row costing two rows' time."""


def checked_priority(value: object) -> int:
    """Triton's `priority` request parameter as given (an integer, or a float or a
    string that is one; None when absent: the default, 0), checked: InvalidInput unless
    it is a non-negative integer."""
    return 0 if value is None else _non_negative_int("priority", value)


def checked_due_us(value: object) -> int | None:
    """The `switchyard_due_us` request parameter as given (None when absent), checked
    as `priority` is: InvalidInput unless it is a non-negative integer."""
    return None if value is None else _non_negative_int(DUE_PARAMETER, value)


def _non_negative_int(name: str, value: object) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(
            f"request parameter {name!r} must be a non-negative integer, got {value!r}"
        )
    return value


def priority_level(priority: int) -> int:
    """Queue rank of a request's `priority`: lower runs first."""
    return priority if priority > 0 else DEFAULT_PRIORITY_LEVEL


class VariantProfile(NamedTuple):
    """One variant's profile as a worker advertises it, at batch 1 on its hardware."""

    variant: str
    p50_ms: float
    p99_ms: float
    row_fraction: float | None
    """What each extra row of a batch adds, as a fraction of one row's time; None
    when not profiled at more than one batch size."""


def profile_parameter(profiles: Iterable[VariantProfile]) -> str:
    """The `switchyard_profile` parameter: a JSON list of objects with `variant`,
    `p50_ms`, `p99_ms` and `row_fraction` (null when unknown); times to 4 significant
    digits, the row fraction to 3."""
    return json.dumps(
        [
            {
                "variant": p.variant,
                "p50_ms": _round(p.p50_ms, 4),
                "p99_ms": _round(p.p99_ms, 4),
                "row_fraction": None if p.row_fraction is None else _round(p.row_fraction, 3),
            }
            for p in profiles
        ],
        separators=(",", ":"),
    )


def read_profile_parameter(text: str) -> tuple[tuple[VariantProfile, ...], list[str]]:
    """The profiles in a `switchyard_profile` parameter, and what was wrong with it.

    Text that is not a JSON list gives no profile; an entry without a variant name and
    positive, finite p50 and p99 is left out; a row fraction that is not a number in
    [0, MAX_ROW_FRACTION] is taken as unknown. Each of these is named in the list of
    problems (a foreign backend may send anything: never an exception)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        return (), [f"not JSON: {exc}"]
    if not isinstance(data, list):
        return (), [f"not a JSON list: {type(data).__name__}"]
    profiles: list[VariantProfile] = []
    problems: list[str] = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            problems.append(f"entry {index} is not an object")
            continue
        variant = entry.get("variant")
        p50, p99 = _number(entry.get("p50_ms")), _number(entry.get("p99_ms"))
        if not isinstance(variant, str) or not variant:
            problems.append(f"entry {index} names no variant")
            continue
        if p50 is None or p99 is None or p50 <= 0 or p99 <= 0:
            problems.append(f"{variant}: p50_ms and p99_ms must be positive numbers")
            continue
        given = entry.get("row_fraction")
        rows = _number(given)
        if rows is not None and not 0.0 <= rows <= MAX_ROW_FRACTION:
            rows = None
        if given is not None and rows is None:
            problems.append(
                f"{variant}: row_fraction {given!r} is not in [0, {MAX_ROW_FRACTION:g}]"
            )
        profiles.append(VariantProfile(variant, p50, p99, rows))
    return tuple(profiles), problems


def _number(value: object) -> float | None:
    """`value` as a finite float when it is a JSON number, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _round(value: float, digits: int) -> float:
    return float(f"{value:.{digits}g}")
