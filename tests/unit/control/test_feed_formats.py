"""Feed formats on recorded answers (tests/fixtures/feeds): each kind read into
readings, what is in force at a time, and malformed answers refused with a reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.config import FeedSelector
from gateway.control.feeds.formats import (
    FeedError,
    change_times,
    evaluate,
    parse,
    parse_aws_spot,
    parse_carbon_intensity,
    parse_gcp_skus,
    parse_schedule,
)

FIXTURES = Path(__file__).parents[2] / "fixtures" / "feeds"


def at(hh_mm: str) -> float:
    """Seconds since the epoch at HH:MM on 2024-05-01, UTC (the fixtures' day)."""
    hours, minutes = (int(p) for p in hh_mm.split(":"))
    return datetime(2024, 5, 1, hours, minutes, tzinfo=UTC).timestamp()


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def select(**fields: object) -> FeedSelector:
    return FeedSelector.model_validate({"backends": ["x"], **fields})


def test_aws_spot_history_reads_every_entry() -> None:
    prices = parse_aws_spot(fixture("aws-spot-history.json"))
    assert len(prices) == 6
    first = prices[0]
    assert (first.instance_type, first.availability_zone, first.product_description) == (
        "g5.xlarge",
        "us-east-1a",
        "Linux/UNIX",
    )
    assert first.usd_per_hour == pytest.approx(0.4521)
    assert first.at_s == at("12:40")


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        ("11:49", None),  # nothing yet for us-east-1a
        ("11:50", 0.385),
        ("12:19", 0.385),
        ("12:20", 0.4012),  # the entries are newest first in the file: order is by Timestamp
        ("12:39", 0.4012),
        ("12:40", 0.4521),
        ("23:00", 0.4521),
    ],
)
def test_aws_spot_the_latest_change_before_now_is_in_force(
    now: str, expected: float | None
) -> None:
    readings = parse("aws-spot", [fixture("aws-spot-history.json")])
    selector = select(instance_type="g5.xlarge", availability_zone="us-east-1a")
    result = evaluate("aws-spot", readings, {"gpu": [selector]}, at(now))
    if expected is None:
        assert result.values == {}
        assert result.missing == ["no spot price in force for g5.xlarge in us-east-1a (Linux/UNIX)"]
    else:
        assert result.values == {"gpu": pytest.approx(expected)}
        assert result.missing == []


def test_aws_spot_product_zone_and_multiplier() -> None:
    readings = parse("aws-spot", [fixture("aws-spot-history.json")])
    targets = {
        # Windows, not the default Linux/UNIX.
        "win": [
            select(
                instance_type="g5.xlarge",
                availability_zone="us-east-1a",
                product_description="Windows",
            )
        ],
        # No zone: the dearest price in force among the zones (1a 0.4012, 1b 0.3987).
        "any": [select(instance_type="g5.xlarge")],
        # A quarter of the instance.
        "share": [select(instance_type="c7i.2xlarge", multiplier=0.25)],
    }
    result = evaluate("aws-spot", readings, targets, at("12:30"))
    assert result.values == {
        "win": pytest.approx(0.9123),
        "any": pytest.approx(0.4012),
        "share": pytest.approx(0.038),
    }


def test_gcp_skus_units_plus_nanos_first_tier_and_pages() -> None:
    page1 = parse_gcp_skus(fixture("gcp-skus-page1.json"))
    page2 = parse_gcp_skus(fixture("gcp-skus-page2.json"))
    assert page1.next_page_token == "CiA2RjgxLTU4NDQtNDU2QQ"
    assert page2.next_page_token == ""
    by_id = {p.sku_id: p for p in page1.prices + page2.prices}
    assert by_id["4D19-A3B5-77E0"].usd_per_unit == pytest.approx(11.0609)  # "11" + 60900000 nanos
    # Tiers listed out of order: the first tier is the one starting at 0.
    assert by_id["2A3C-55D1-9B0F"].usd_per_unit == pytest.approx(0.024988)
    readings = parse(
        "gcp-billing", [fixture("gcp-skus-page1.json"), fixture("gcp-skus-page2.json")]
    )
    # A g2-standard-8 with one L4: 8 vCPUs, 32 GiB and the GPU, the SKUs added up.
    g2 = [
        select(sku_id="2A3C-55D1-9B0F", multiplier=8),
        select(sku_id="8E1F-6D0A-4C2B", multiplier=32),
        select(sku_id="0B6B-7C91-2E84"),
    ]
    result = evaluate("gcp-billing", readings, {"g2": g2}, at("12:00"))
    assert result.values["g2"] == pytest.approx(8 * 0.024988 + 32 * 0.002927 + 0.56)
    # Not yet in effect, a monthly unit, an unknown SKU: each says so.
    assert evaluate("gcp-billing", readings, {"g2": g2}, at("08:00")).missing == [
        "no pricing in effect for SKU 2A3C-55D1-9B0F"
    ]
    monthly = evaluate(
        "gcp-billing", readings, {"d": [select(sku_id="9C2D-1E3F-0A4B")]}, at("12:00")
    )
    assert monthly.missing == ["SKU 9C2D-1E3F-0A4B is priced per 'GiBy.mo', not per hour"]
    unknown = evaluate("gcp-billing", readings, {"d": [select(sku_id="NOPE")]}, at("12:00"))
    assert unknown.values == {} and unknown.missing == ["no pricing in effect for SKU NOPE"]


@pytest.mark.parametrize("name", ["schedule.csv", "schedule.jsonl"])
def test_schedule_csv_and_json_lines_read_alike(name: str) -> None:
    rows = parse_schedule(fixture(name))
    assert [(r.at_s, r.key, r.usd_per_hour) for r in rows] == [
        (at("12:00"), "gpu", 2.40),
        (at("12:00"), "cpu", 0.04),
        (at("12:15"), "gpu", 0.95),
        (at("12:30"), "gpu", 3.10),
    ]
    targets = {"gpu": [select()], "small": [select(key="cpu", multiplier=0.5)]}
    result = evaluate("schedule", rows, targets, at("12:20"))
    assert result.values == {"gpu": pytest.approx(0.95), "small": pytest.approx(0.02)}
    assert change_times(rows) == [at("12:00"), at("12:15"), at("12:30")]


def test_electricity_maps_latest_one_zone_or_a_list() -> None:
    [reading] = parse_carbon_intensity(fixture("electricity-maps-latest.json"))
    assert (reading.zone, reading.g_per_kwh, reading.at_s) == ("DE", 302.0, at("12:00"))
    both = json.dumps(
        [{"zone": "DE", "carbonIntensity": 302}, {"zone": "FR", "carbonIntensity": 31.5}]
    ).encode()
    readings = parse("electricity-maps", [both])
    result = evaluate(
        "electricity-maps", readings, {"a": [select(zone="FR")], "b": [select(zone="PL")]}, 0.0
    )
    assert result.values == {"a": 31.5}
    assert result.missing == ["no carbon intensity for zone PL (the answer has DE, FR)"]


@pytest.mark.parametrize(
    ("kind", "data", "why"),
    [
        ("aws-spot", b"<html>502 Bad Gateway</html>", "not valid JSON"),
        ("aws-spot", b'{"NextToken": ""}', "SpotPriceHistory missing or not a list"),
        ("aws-spot", b"[1, 2]", "expected a JSON object with SpotPriceHistory"),
        (
            "aws-spot",
            b'{"SpotPriceHistory": [{"InstanceType": "g5.xlarge", "AvailabilityZone": "a", "ProductDescription": "Linux/UNIX", "SpotPrice": "cheap", "Timestamp": "2024-05-01T12:00:00Z"}]}',
            "SpotPriceHistory[0].SpotPrice: 'cheap' is not a number",
        ),
        (
            "aws-spot",
            b'{"SpotPriceHistory": [{"InstanceType": "g5.xlarge", "AvailabilityZone": "a", "ProductDescription": "Linux/UNIX", "SpotPrice": "-1", "Timestamp": "2024-05-01T12:00:00Z"}]}',
            "is not a finite, non-negative number",
        ),
        (
            "aws-spot",
            b'{"SpotPriceHistory": [{"InstanceType": "g5.xlarge", "AvailabilityZone": "a", "ProductDescription": "Linux/UNIX", "SpotPrice": "1", "Timestamp": "yesterday"}]}',
            "SpotPriceHistory[0].Timestamp: 'yesterday' is not a time",
        ),
        ("aws-spot", b'{"SpotPriceHistory": [{"SpotPrice": NaN}]}', "not valid JSON"),
        (
            "gcp-billing",
            b'{"skus": [{"skuId": "A", "pricingInfo": [{"pricingExpression": {"usageUnit": "h", "tieredRates": []}}]}]}',
            "tieredRates is empty",
        ),
        (
            "gcp-billing",
            b'{"skus": [{"skuId": "A", "pricingInfo": [{"pricingExpression": {"usageUnit": "h", "tieredRates": [{"unitPrice": {"currencyCode": "EUR", "units": "1"}}]}}]}]}',
            "currency 'EUR', expected USD",
        ),
        (
            "gcp-billing",
            b'{"skus": [{"skuId": "A", "pricingInfo": [{"pricingExpression": {"usageUnit": "h", "tieredRates": [{"unitPrice": {"units": "1.5"}}]}}]}]}',
            "units '1.5' and nanos 0",
        ),
        (
            "gcp-billing",
            b'{"skus": [{"skuId": "A", "pricingInfo": [{"pricingExpression": {"usageUnit": "h", "tieredRates": [{"unitPrice": {"units": "0", "nanos": 2000000000}}]}}]}]}',
            "nanos 2000000000 out of range",
        ),
        ("schedule", b"", "the schedule is empty"),
        (
            "schedule",
            b"when,backend,usd_per_hour\n1,a,1\n",
            "must name time, backend, usd_per_hour (missing time)",
        ),
        ("schedule", b"time,backend,usd_per_hour\n1,a\n", "line 2: 2 columns, the header has 3"),
        ("schedule", b'{"time": 1, "backend": "a"}\n', "line 1: usd_per_hour missing"),
        ("schedule", b"\xff\xfe", "not UTF-8 text"),
        ("electricity-maps", b'{"zone": "DE", "carbonIntensity": null}', "carbonIntensity missing"),
        ("electricity-maps", b'{"error": "unauthorized"}', "zone missing or not text"),
    ],
)
def test_malformed_answers_say_what_is_wrong(kind: str, data: bytes, why: str) -> None:
    with pytest.raises(FeedError) as caught:
        parse(kind, [data])  # type: ignore[arg-type]
    assert why in str(caught.value)
