"""The formats of price and carbon feeds, from bytes to typed readings, and what they
say at a given time for the backends a feed's selectors cover:

- `aws-spot`: EC2 DescribeSpotPriceHistory as its JSON form returns it (the AWS CLI's
  and SDKs' `{"SpotPriceHistory": [{"InstanceType", "AvailabilityZone",
  "ProductDescription", "SpotPrice", "Timestamp"}]}`); per series (type, zone,
  product), the latest change at or before now is in force.
- `gcp-billing`: Cloud Billing catalog SKUs (`{"skus": [{"skuId", "pricingInfo":
  [{"effectiveTime", "pricingExpression": {"usageUnit", "tieredRates": [{"unitPrice":
  {"units", "nanos"}}]}}]}], "nextPageToken"}`); the first tier's rate of the latest
  pricing in effect, per hour.
- `schedule`: CSV with a header row (`time,backend,usd_per_hour`) or JSON lines
  (`{"time", "backend", "usd_per_hour"}`), times ISO 8601 or seconds since the epoch;
  per backend, the latest row at or before now is in force.
- `electricity-maps`: `/v3/carbon-intensity/latest` (`{"zone", "carbonIntensity",
  "datetime"}` in gCO2eq/kWh; a JSON list of such objects too, one per zone).

Every problem is a `FeedError` saying what is wrong, so a poller can keep the last good
readings and say why. Imports the fleet file's settings and the standard library only:
no grpc, no clock (the time is the caller's), no I/O; the simulator replays recorded
feeds through it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.config import FeedKind, FeedSelector

DEFAULT_PRODUCT = "Linux/UNIX"
"""aws-spot: the product a selector means when it names none."""
HOURLY_UNITS = frozenset({"h", "hour", "hr"})
"""gcp-billing: the usage units priced per hour; so is any `X.h` (per X and hour, such
as `GiBy.h`: a selector's multiplier then counts the Xs)."""


class FeedError(ValueError):
    """A feed's response cannot be read, or lacks what a selector needs: why."""


@dataclass(frozen=True, slots=True)
class SpotPrice:
    """One entry of EC2's spot price history: the price from `at_s` on."""

    instance_type: str
    availability_zone: str
    product_description: str
    usd_per_hour: float
    at_s: float
    """Its `Timestamp`, seconds since the epoch."""


@dataclass(frozen=True, slots=True)
class SkuPrice:
    """One pricing of a Cloud Billing SKU: its first tier's unit price from `at_s` on."""

    sku_id: str
    usd_per_unit: float
    usage_unit: str
    at_s: float
    """Its `effectiveTime`, seconds since the epoch (0 when it has none)."""


@dataclass(frozen=True, slots=True)
class ScheduleRow:
    at_s: float
    key: str
    """The `backend` column."""
    usd_per_hour: float


@dataclass(frozen=True, slots=True)
class CarbonIntensity:
    zone: str
    g_per_kwh: float
    at_s: float | None
    """Its `datetime`, seconds since the epoch, when given."""


@dataclass(frozen=True, slots=True)
class SkuPage:
    prices: list[SkuPrice]
    next_page_token: str
    """The next page's token; empty on the last page."""


Readings = list[SpotPrice] | list[SkuPrice] | list[ScheduleRow] | list[CarbonIntensity]
"""What one response of a feed holds."""


@dataclass(frozen=True, slots=True)
class Evaluation:
    """What a feed's readings say at one time for the backends its selectors cover."""

    values: dict[str, float]
    """Per backend: its price (USD per hour) or carbon intensity (gCO2eq/kWh)."""
    missing: list[str]
    """What selectors found no entry for, in words (their backends got no value)."""


# ---- reading responses --------------------------------------------------------------


def _json(data: bytes) -> Any:
    try:
        return json.loads(data, parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise FeedError(f"not UTF-8 text: {exc}") from exc
    except (ValueError, RecursionError) as exc:
        raise FeedError(f"not valid JSON: {exc}") from exc


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a feed may hold")


def parse_time(value: object, where: str) -> float:
    """Seconds since the epoch from ISO 8601 text (no zone: UTC) or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            try:
                moment = datetime.fromisoformat(text)
            except ValueError as exc:
                raise FeedError(f"{where}: {value!r} is not a time (ISO 8601)") from exc
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            seconds = moment.timestamp()
    else:
        raise FeedError(f"{where}: {value!r} is not a time")
    if not math.isfinite(seconds):
        raise FeedError(f"{where}: {value!r} is not a time")
    return seconds


def _number(value: object, where: str) -> float:
    """A finite, non-negative number from a number or its text (AWS sends prices as text)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise FeedError(f"{where}: {value!r} is not a number")
    try:
        number = float(value)
    except ValueError as exc:
        raise FeedError(f"{where}: {value!r} is not a number") from exc
    if not math.isfinite(number) or number < 0:
        raise FeedError(f"{where}: {value!r} is not a finite, non-negative number")
    return number


def _text(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise FeedError(f"{where}: {key} missing or not text")
    return value


def _list(document: Any, key: str, what: str) -> list[Any]:
    if not isinstance(document, dict):
        raise FeedError(f"expected a JSON object with {key}, got {type(document).__name__}")
    value = document.get(key)
    if not isinstance(value, list):
        raise FeedError(f"{key} missing or not a list ({what})")
    return value


def parse_aws_spot(data: bytes) -> list[SpotPrice]:
    """DescribeSpotPriceHistory's JSON: every entry of `SpotPriceHistory`."""
    entries = _list(_json(data), "SpotPriceHistory", "DescribeSpotPriceHistory's answer")
    prices = []
    for index, entry in enumerate(entries):
        where = f"SpotPriceHistory[{index}]"
        if not isinstance(entry, dict):
            raise FeedError(f"{where}: not an object")
        prices.append(
            SpotPrice(
                instance_type=_text(entry, "InstanceType", where),
                availability_zone=_text(entry, "AvailabilityZone", where),
                product_description=_text(entry, "ProductDescription", where),
                usd_per_hour=_number(entry.get("SpotPrice"), f"{where}.SpotPrice"),
                at_s=parse_time(entry.get("Timestamp"), f"{where}.Timestamp"),
            )
        )
    return prices


def _unit_price(money: object, where: str) -> float:
    """google.type.Money: `units` (an int64, as text in JSON) plus `nanos` (1e-9)."""
    if not isinstance(money, dict):
        raise FeedError(f"{where}: not an object")
    currency = money.get("currencyCode", "USD")
    if currency != "USD":
        raise FeedError(f"{where}: currency {currency!r}, expected USD")
    units_raw, nanos_raw = money.get("units", "0"), money.get("nanos", 0)
    try:
        units = int(units_raw)
        nanos = int(nanos_raw)
    except (TypeError, ValueError) as exc:
        raise FeedError(f"{where}: units {units_raw!r} and nanos {nanos_raw!r}") from exc
    if isinstance(units_raw, bool | float) or isinstance(nanos_raw, bool | float):
        raise FeedError(f"{where}: units and nanos must be whole numbers")
    if not -999_999_999 <= nanos <= 999_999_999:
        raise FeedError(f"{where}: nanos {nanos} out of range")
    price = units + nanos / 1e9
    if price < 0:
        raise FeedError(f"{where}: negative price {price}")
    return price


def parse_gcp_skus(data: bytes) -> SkuPage:
    """One page of the Cloud Billing catalog's `services.skus.list`."""
    document = _json(data)
    skus = _list(document, "skus", "services.skus.list's answer")
    prices = []
    for index, sku in enumerate(skus):
        where = f"skus[{index}]"
        if not isinstance(sku, dict):
            raise FeedError(f"{where}: not an object")
        sku_id = _text(sku, "skuId", where)
        for p_index, info in enumerate(_list(sku, "pricingInfo", where)):
            p_where = f"{where} ({sku_id}).pricingInfo[{p_index}]"
            if not isinstance(info, dict):
                raise FeedError(f"{p_where}: not an object")
            expression = info.get("pricingExpression")
            if not isinstance(expression, dict):
                raise FeedError(f"{p_where}.pricingExpression missing")
            tiers = _list(expression, "tieredRates", p_where)
            if not tiers:
                raise FeedError(f"{p_where}.pricingExpression.tieredRates is empty")
            if not all(isinstance(tier, dict) for tier in tiers):
                raise FeedError(f"{p_where}.pricingExpression.tieredRates: not all objects")
            starts = [
                _number(t.get("startUsageAmount", 0), f"{p_where} startUsageAmount") for t in tiers
            ]
            first = tiers[starts.index(min(starts))]
            prices.append(
                SkuPrice(
                    sku_id=sku_id,
                    usd_per_unit=_unit_price(
                        first.get("unitPrice"), f"{p_where}.tieredRates[].unitPrice"
                    ),
                    usage_unit=str(expression.get("usageUnit", "")),
                    at_s=parse_time(info["effectiveTime"], f"{p_where}.effectiveTime")
                    if "effectiveTime" in info
                    else 0.0,
                )
            )
    token = document.get("nextPageToken", "")
    return SkuPage(prices, token if isinstance(token, str) else "")


_SCHEDULE_COLUMNS = ("time", "backend", "usd_per_hour")


def _schedule_row(record: Mapping[str, Any], where: str) -> ScheduleRow:
    missing = [c for c in _SCHEDULE_COLUMNS if record.get(c) in (None, "")]
    if missing:
        raise FeedError(f"{where}: {', '.join(missing)} missing")
    key = record["backend"]
    if not isinstance(key, str):
        raise FeedError(f"{where}: backend {key!r} is not text")
    return ScheduleRow(
        at_s=parse_time(record["time"], f"{where} time"),
        key=key.strip(),
        usd_per_hour=_number(record["usd_per_hour"], f"{where} usd_per_hour"),
    )


def parse_schedule(data: bytes) -> list[ScheduleRow]:
    """A schedule: JSON lines (each line an object), or CSV with a header row naming at
    least `time`, `backend` and `usd_per_hour` (other columns are passed over). Blank
    lines and lines starting with # are skipped."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FeedError(f"not UTF-8 text: {exc}") from exc
    lines = [
        (number, line)
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines:
        raise FeedError("the schedule is empty")
    rows = []
    if lines[0][1].lstrip().startswith("{"):
        for number, line in lines:
            record = _json(line.encode())
            if not isinstance(record, dict):
                raise FeedError(f"line {number}: not a JSON object")
            rows.append(_schedule_row(record, f"line {number}"))
        return rows
    reader = csv.reader(io.StringIO("\n".join(line for _, line in lines)))
    header = [c.strip() for c in next(reader)]
    absent = [c for c in _SCHEDULE_COLUMNS if c not in header]
    if absent:
        raise FeedError(
            f"line {lines[0][0]}: the header row must name {', '.join(_SCHEDULE_COLUMNS)} "
            f"(missing {', '.join(absent)})"
        )
    for (number, _), row in zip(lines[1:], reader, strict=True):
        if len(row) != len(header):
            raise FeedError(f"line {number}: {len(row)} columns, the header has {len(header)}")
        rows.append(_schedule_row(dict(zip(header, row, strict=True)), f"line {number}"))
    return rows


def parse_carbon_intensity(data: bytes) -> list[CarbonIntensity]:
    """Electricity Maps' latest carbon intensity: one zone's object, or a list of them."""
    document = _json(data)
    entries = document if isinstance(document, list) else [document]
    readings = []
    for index, entry in enumerate(entries):
        where = "the answer" if len(entries) == 1 else f"entry {index}"
        if not isinstance(entry, dict):
            raise FeedError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        zone = _text(entry, "zone", where)
        if entry.get("carbonIntensity") is None:
            raise FeedError(f"{where} ({zone}): carbonIntensity missing (no data for the zone?)")
        moment = entry.get("datetime")
        readings.append(
            CarbonIntensity(
                zone=zone,
                g_per_kwh=_number(entry["carbonIntensity"], f"{where} ({zone}).carbonIntensity"),
                at_s=None if moment is None else parse_time(moment, f"{where}.datetime"),
            )
        )
    return readings


def parse(kind: FeedKind, pages: Iterable[bytes]) -> Readings:
    """A feed's readings from its response (gcp-billing: every page of it)."""
    if kind == "aws-spot":
        return [p for page in pages for p in parse_aws_spot(page)]
    if kind == "gcp-billing":
        return [p for page in pages for p in parse_gcp_skus(page).prices]
    if kind == "schedule":
        return [r for page in pages for r in parse_schedule(page)]
    return [r for page in pages for r in parse_carbon_intensity(page)]


# ---- what the readings say at a time --------------------------------------------------


def _latest(entries: Iterable[Any], now_s: float) -> Any:
    """The entry with the latest `at_s` at or before `now_s`; None when none is."""
    best = None
    for entry in entries:
        if entry.at_s <= now_s and (best is None or entry.at_s >= best.at_s):
            best = entry
    return best


def _spot(readings: list[SpotPrice], selector: FeedSelector, now_s: float) -> float | str:
    product = selector.product_description or DEFAULT_PRODUCT
    series: dict[str, list[SpotPrice]] = {}
    for p in readings:
        if p.instance_type != selector.instance_type or p.product_description != product:
            continue
        if selector.availability_zone not in (None, p.availability_zone):
            continue
        series.setdefault(p.availability_zone, []).append(p)
    in_force = [_latest(entries, now_s) for entries in series.values()]
    prices: list[float] = [p.usd_per_hour for p in in_force if p is not None]
    if not prices:
        zone = selector.availability_zone or "any zone"
        return f"no spot price in force for {selector.instance_type} in {zone} ({product})"
    return max(prices)


def _sku(readings: list[SkuPrice], selector: FeedSelector, now_s: float) -> float | str:
    pricing = _latest((p for p in readings if p.sku_id == selector.sku_id), now_s)
    if pricing is None:
        return f"no pricing in effect for SKU {selector.sku_id}"
    if pricing.usage_unit not in HOURLY_UNITS and not pricing.usage_unit.endswith(".h"):
        return f"SKU {selector.sku_id} is priced per {pricing.usage_unit!r}, not per hour"
    return float(pricing.usd_per_unit)


def _row(readings: list[ScheduleRow], key: str, now_s: float) -> float | str:
    row = _latest((r for r in readings if r.key == key), now_s)
    if row is None:
        return f"no schedule row for {key!r} at or before now"
    return float(row.usd_per_hour)


def _carbon(readings: list[CarbonIntensity], selector: FeedSelector) -> float | str:
    for reading in readings:
        if reading.zone == selector.zone:
            return reading.g_per_kwh
    zones = ", ".join(sorted({r.zone for r in readings})) or "none"
    return f"no carbon intensity for zone {selector.zone} (the answer has {zones})"


def evaluate(
    kind: FeedKind,
    readings: Readings,
    targets: Mapping[str, list[FeedSelector]],
    now_s: float,
) -> Evaluation:
    """What `readings` say at `now_s` (seconds since the epoch) for each backend of
    `targets` (backend -> the selectors that cover it): a price feed's price times each
    selector's multiplier, summed over its selectors; a carbon feed's intensity."""
    values: dict[str, float] = {}
    missing: list[str] = []
    for backend, selectors in targets.items():
        total = 0.0
        for selector in selectors:
            found: float | str
            if kind == "aws-spot":
                found = _spot(readings, selector, now_s)  # type: ignore[arg-type]
            elif kind == "gcp-billing":
                found = _sku(readings, selector, now_s)  # type: ignore[arg-type]
            elif kind == "schedule":
                found = _row(readings, selector.key or backend, now_s)  # type: ignore[arg-type]
            else:
                found = _carbon(readings, selector)  # type: ignore[arg-type]
            if isinstance(found, str):
                if found not in missing:
                    missing.append(found)
                break
            total += found * selector.multiplier
        else:
            values[backend] = total
    return Evaluation(values, missing)


def change_times(readings: Readings) -> list[float]:
    """Every time at which the readings say something changes, in order (a recorded
    feed's timeline)."""
    return sorted({r.at_s for r in readings if r.at_s is not None})


def price_changes(
    kind: FeedKind,
    readings: Readings,
    targets: Mapping[str, list[FeedSelector]],
    start_s: float,
    until_s: float,
) -> list[tuple[float, str, float]]:
    """A recorded price feed as a timeline: (time, backend, USD per hour) each time a
    backend's price changes from `start_s` to `until_s` (seconds since the epoch), the
    prices in force at `start_s` first. A backend with no entry in force yet gets none
    until it has one."""
    times = [start_s] + [t for t in change_times(readings) if start_s < t <= until_s]
    last: dict[str, float] = {}
    changes = []
    for moment in times:
        for backend, value in sorted(evaluate(kind, readings, targets, moment).values.items()):
            if last.get(backend) != value:
                changes.append((moment, backend, value))
                last[backend] = value
    return changes
