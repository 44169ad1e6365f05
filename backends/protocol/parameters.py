"""The request and model-configuration parameters that Switchyard's worker and gateway
both read or write, each in one place: Triton's `priority` and its queue rank, the
`switchyard_due_us` deadline, the `sla_ms` and `timeout` checks and the bounds on every
parameters map, and the `switchyard_profile` a worker advertises in its model
configuration (each variant's p50, p99 and row fraction: the gateway's prior). Every
value here is caller input (or a foreign backend's): it is checked for kind, finiteness
and range, and a bad one is InvalidInput naming the parameter and the value.

Plain values in, plain values out: imports no grpc, no protobuf and nothing from the
gateway (the worker and the gateway's converters put these on and take them off the
wire).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from backends.protocol.errors import InvalidInput, shown

DUE_PARAMETER = "switchyard_due_us"
"""The request parameter by which a request is due: microseconds from its arrival."""

REFUSE_LATE_PARAMETER = "switchyard_refuse_late"
"""The request parameter (a bool) by which a request with a due time asks to be refused
at once (RESOURCE_EXHAUSTED, `LATE_REFUSAL` in its message) rather than queued when the
worker predicts it would be answered past that time: a gateway whose view of a shared
backend's queue is partial sends it, and sends a refused request elsewhere."""

AFTER_WAITING_PARAMETER = "switchyard_after_waiting"
"""The request parameter (a bool) by which a request is due when the latest-due of the
requests waiting at the worker as it arrives is (at once, where none waits), whatever
`switchyard_due_us` says: it goes after every one of them and ahead of those that come
later. A gateway's latency probe of a busy backend sends it: it runs within the time the
queue takes to drain, and makes none of the requests already waiting late."""

LATE_REFUSAL = "would be answered past its due time"
"""What the message of a request refused by `REFUSE_LATE_PARAMETER` says."""

PROFILE_PARAMETER = "switchyard_profile"
"""The model-configuration parameter holding the worker's profile of each variant."""

DEFAULT_PRIORITY_LEVEL = 2**64
"""Where priority 0 (the default) ranks: after every explicit level (Triton's priorities
are uint64)."""

PROFILED = "profile"
"""A `switchyard_profile` entry's `source`: the variant's profile (`profile.json`) for
the worker's hardware class and threads."""

MEASURED_AT_START = "start"
"""A `switchyard_profile` entry's `source`: measured by the worker when it started (the
variant has no profile for its hardware class and threads), over a few runs."""

MAX_ROW_FRACTION = 2.0
"""The largest believable row fraction: an extra row costing two rows' time."""

MAX_PROFILE_MS = 3_600_000.0
"""The largest believable profiled latency (one hour): a larger p50 or p99 is left out."""


MAX_PRIORITY = 2**64 - 1
"""The highest `priority` a request may give (Triton's priorities are uint64)."""

MAX_DUE_US = 2**63 - 1
"""The largest `switchyard_due_us` (an int64 on the wire)."""

MAX_SLA_MS = 3_600_000.0
"""The longest latency target a request may give in `sla_ms`: one hour."""

MAX_TIMEOUT_US = 3_600_000_000
"""The longest Triton `timeout` a request may give: one hour, in microseconds."""

MAX_PARAMETERS = 64
"""The most entries one parameters map may hold (a request's, an input's or an
output's); more are INVALID_ARGUMENT."""

MAX_STRING_PARAMETER_BYTES = 4096
"""The longest parameter name, and the longest string parameter value, in UTF-8 bytes."""


def checked_priority(value: object) -> int:
    """Triton's `priority` request parameter as given (an integer, or a float or a
    string that is one; None when absent: the default, 0), checked: InvalidInput unless
    it is an integer in 0..MAX_PRIORITY."""
    return 0 if value is None else _non_negative_int("priority", value, MAX_PRIORITY)


def checked_due_us(value: object) -> int | None:
    """The `switchyard_due_us` request parameter as given (None when absent), checked
    as `priority` is: InvalidInput unless it is an integer in 0..MAX_DUE_US."""
    return None if value is None else _non_negative_int(DUE_PARAMETER, value, MAX_DUE_US)


def checked_flag(name: str, value: object) -> bool:
    """A bool request parameter, `switchyard_refuse_late` or `switchyard_after_waiting`
    (False when absent): InvalidInput naming it unless it is a bool."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidInput(f"request parameter {name!r} must be a bool, got {shown(value)}")
    return value


def parameter_number(name: str, value: object) -> int | float:
    """A request parameter that must be a number: an integer or a double, or a string
    holding one (tritonclient sends what it is given). InvalidInput naming `name` and
    the value for anything else; integers stay exact, and the number may still be NaN
    or infinite (the callers check their ranges)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and len(value) <= 64:
        text = value.strip()
        try:
            return int(text) if text.isascii() and text.isdigit() else float(text)
        except ValueError:
            pass
    raise InvalidInput(f"request parameter {name!r} must be a number, got {shown(value)}")


def checked_sla_ms(value: object) -> float:
    """The `sla_ms` request parameter as given: a finite number of milliseconds in
    (0, MAX_SLA_MS]; InvalidInput naming the parameter and the value otherwise."""
    return _in_range("sla_ms", parameter_number("sla_ms", value), MAX_SLA_MS, "ms")


def checked_timeout_us(value: object) -> float:
    """Triton's `timeout` request parameter as given: a finite number of microseconds
    in (0, MAX_TIMEOUT_US]; InvalidInput naming the parameter and the value otherwise."""
    return _in_range("timeout", parameter_number("timeout", value), MAX_TIMEOUT_US, "us")


def _in_range(name: str, number: float, maximum: float, unit: str) -> float:
    if not math.isfinite(number):
        raise InvalidInput(f"request parameter {name!r} must be a finite number, got {number!r}")
    if number <= 0:
        raise InvalidInput(f"request parameter {name!r} must be positive, got {number!r}")
    if number > maximum:
        raise InvalidInput(
            f"request parameter {name!r} must be at most {maximum:.0f} {unit}, got {number!r}"
        )
    return float(number)


def check_parameter_map(where: str, parameters: Mapping[str, object]) -> None:
    """InvalidInput when a parameters map (`where`: "request", "input 'x'", ...) holds
    more than MAX_PARAMETERS entries, or a name or string value longer than
    MAX_STRING_PARAMETER_BYTES; values are as given (bool, int, float, str or None)."""
    if len(parameters) > MAX_PARAMETERS:
        raise InvalidInput(
            f"{where} has {len(parameters)} parameters; at most {MAX_PARAMETERS} are allowed"
        )
    for key, value in parameters.items():
        if len(key.encode()) > MAX_STRING_PARAMETER_BYTES:
            raise InvalidInput(
                f"{where} has a parameter name of {len(key.encode())} bytes "
                f"({shown(key)}); at most {MAX_STRING_PARAMETER_BYTES} are allowed"
            )
        if isinstance(value, str) and len(value.encode()) > MAX_STRING_PARAMETER_BYTES:
            raise InvalidInput(
                f"{where} parameter {shown(key)} is a string of {len(value.encode())} bytes; "
                f"at most {MAX_STRING_PARAMETER_BYTES} are allowed"
            )


def _non_negative_int(name: str, value: object, maximum: int) -> int:
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        try:
            value = int(value)
        except ValueError:  # more digits than Python converts
            pass
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(
            f"request parameter {name!r} must be a non-negative integer, got {shown(value)}"
        )
    if value > maximum:
        raise InvalidInput(
            f"request parameter {name!r} must be at most {maximum}, got {shown(value)}"
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


def profile_parameter(
    profiles: Iterable[VariantProfile], sources: Mapping[str, str] | None = None
) -> str:
    """The `switchyard_profile` parameter: a JSON list of objects with `variant`,
    `p50_ms`, `p99_ms`, `row_fraction` (null when unknown) and `source` (where the
    figures came from, by variant in `sources`: PROFILED, the default, or
    MEASURED_AT_START; readers may ignore it); times to 4 significant digits, the row
    fraction to 3."""
    given = sources or {}
    return json.dumps(
        [
            {
                "variant": p.variant,
                "p50_ms": _round(p.p50_ms, 4),
                "p99_ms": _round(p.p99_ms, 4),
                "row_fraction": None if p.row_fraction is None else _round(p.row_fraction, 3),
                "source": given.get(p.variant, PROFILED),
            }
            for p in profiles
        ],
        separators=(",", ":"),
    )


def read_profile_parameter(text: str) -> tuple[tuple[VariantProfile, ...], list[str]]:
    """The profiles in a `switchyard_profile` parameter, and what was wrong with it.

    Text that is not a JSON list gives no profile; an entry without a variant name and
    positive, finite p50 and p99 (at most MAX_PROFILE_MS) is left out; a row fraction
    that is not a number in [0, MAX_ROW_FRACTION] is taken as unknown. Each of these is
    named in the list of problems (a foreign backend may send anything: never an
    exception)."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
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
        if (
            p50 is None
            or p99 is None
            or not (0 < p50 <= MAX_PROFILE_MS and 0 < p99 <= MAX_PROFILE_MS)
        ):
            problems.append(
                f"{variant}: p50_ms and p99_ms must be positive finite numbers of at most "
                f"{MAX_PROFILE_MS:.0f} ms, got {shown(entry.get('p50_ms'))} and "
                f"{shown(entry.get('p99_ms'))}"
            )
            continue
        given = entry.get("row_fraction")
        rows = _number(given)
        if rows is not None and not 0.0 <= rows <= MAX_ROW_FRACTION:
            rows = None
        if given is not None and rows is None:
            problems.append(
                f"{variant}: row_fraction {shown(given)} is not in [0, {MAX_ROW_FRACTION:g}]"
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
