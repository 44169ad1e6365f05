"""The load-test report: figures of a run computed from synthetic records (small
enough to work out by hand), the live checks, shares over time, and the files
`write_report` leaves behind (JSON, Markdown, PNG, CSV)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from rich.console import Console

from gateway.loadtest.records import NO_ROUTE, FiredEvent, Records, Stream
from gateway.loadtest.report import (
    RunSummary,
    chart_bin_s,
    check_live,
    print_summary,
    share_moved,
    shares_over_time,
    summarise,
    write_report,
)

SMALL = "small-cpu/ort-cpu-int8"
BIG = "big-cpu/tvm-llvm-avx512-fp32"
STATUSES = ["OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"]

# (send_s, scheduled_s, stream, latency_ms, status, route, cost_usd, answered)
Row = tuple[float, float, int, float, int, int, float, bool]


def make_records(streams: list[Stream], routes: list[str], rows: Sequence[Row]) -> Records:
    columns = list(zip(*rows, strict=True)) if rows else [()] * 8
    return Records(
        streams=streams,
        routes=routes,
        statuses=list(STATUSES),
        send_s=np.asarray(columns[0], dtype=np.float64),
        scheduled_s=np.asarray(columns[1], dtype=np.float64),
        stream=np.asarray(columns[2], dtype=np.int64),
        latency_ms=np.asarray(columns[3], dtype=np.float64),
        status=np.asarray(columns[4], dtype=np.int64),
        route=np.asarray(columns[5], dtype=np.int64),
        cost_usd=np.asarray(columns[6], dtype=np.float64),
        answered=np.asarray(columns[7], dtype=np.bool_),
    )


def hand_records() -> Records:
    """Nine requests: gold (SLA 10 ms) 2 of 4 met, bronze (SLA 100 ms) 2 of 5 met,
    silver (SLA 50 ms) none sent. One UNAVAILABLE, one DEADLINE_EXCEEDED, one lost;
    the last request was sent 100 ms late."""
    streams = [
        Stream("digits", "gold", 10.0),
        Stream("digits", "bronze", 100.0),
        Stream("resnet18", "silver", 50.0),
    ]
    nan = math.nan
    rows: list[Row] = [
        (0.0, 0.0, 0, 5.0, 0, 1, 2e-6, True),  # gold, within
        (0.5, 0.5, 0, 8.0, 0, 1, 2e-6, True),  # gold, within
        (1.0, 1.0, 0, 12.0, 0, 0, 1e-6, True),  # gold, late
        (1.5, 1.5, 0, 3.0, 1, NO_ROUTE, 0.0, True),  # gold, UNAVAILABLE
        (2.0, 2.0, 1, 50.0, 0, 0, 1e-6, True),  # bronze, within
        (2.5, 2.5, 1, 150.0, 0, 0, 1e-6, True),  # bronze, late
        (3.0, 3.0, 1, 20.0, 0, 0, 1e-6, True),  # bronze, within
        (3.5, 3.5, 1, nan, 0, NO_ROUTE, 0.0, False),  # bronze, lost
        (3.9, 3.8, 1, 100.0, 2, NO_ROUTE, 0.0, True),  # bronze, DEADLINE_EXCEEDED
    ]
    return make_records(streams, [SMALL, BIG], rows)


def price_change_records(fail_bin: int | None = 7) -> Records:
    """Ten seconds at 50/s of one gold stream: all on the small route for 5 s, then
    four in five on the big one; every request of second `fail_bin` is UNAVAILABLE."""
    rows: list[Row] = []
    for i in range(500):
        t = i / 50
        route = 0 if t < 5.0 or i % 5 == 0 else 1
        latency = 4.0 if route == 0 else 2.0
        cost = 1e-6 if route == 0 else 3e-6
        if fail_bin is not None and int(t) == fail_bin:
            rows.append((t, t, 0, 1.0, 1, NO_ROUTE, 0.0, True))
        else:
            rows.append((t, t, 0, latency + (i % 10) * 0.1, 0, route, cost, True))
    return make_records([Stream("digits", "gold", 10.0)], [SMALL, BIG], rows)


def test_summarise_hand_worked_figures() -> None:
    s = summarise(hand_records(), "switchyard", duration_s=4.0, asked_rate_per_s=2.25)
    assert (s.requests, s.answered, s.ok, s.lost) == (9, 8, 6, 1)
    assert s.errors == {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 1}
    assert s.attainment["gold"] == pytest.approx(0.5)
    assert s.attainment["bronze"] == pytest.approx(0.4)  # the lost and the error are misses
    assert math.isnan(s.attainment["silver"])
    assert s.latency_ms["gold"] == pytest.approx({"p50": 8.0, "p99": 12.0, "p99.9": 12.0})
    assert s.latency_ms["bronze"] == pytest.approx({"p50": 50.0, "p99": 150.0, "p99.9": 150.0})
    assert all(math.isnan(v) for v in s.latency_ms["silver"].values())
    # (2 x 2e-6 + 4 x 1e-6) / 6 OK answers x 1e6
    assert s.cost_usd_per_1m == pytest.approx(8 / 6)
    assert s.shares == pytest.approx({SMALL: 4 / 6, BIG: 2 / 6})
    assert s.sent_rate_per_s == pytest.approx(2.25)
    # lags: eight at 0 ms and one at 100 ms; p99 (nearest rank: the 9th of 9) = 100
    assert s.lag_p99_ms == pytest.approx(100.0)
    assert not s.kept_up
    assert s.worst_attainment == ("bronze", 0.4)


def test_kept_up_needs_both_the_rate_and_a_small_lag() -> None:
    records = price_change_records(fail_bin=None)
    assert summarise(records, "switchyard", 10.0, 50.0).kept_up
    assert summarise(records, "switchyard", 10.0, 51.5).kept_up  # 50 >= 0.97 x 51.5
    assert not summarise(records, "switchyard", 10.0, 52.0).kept_up
    records.send_s = records.send_s + 0.025  # every request 25 ms late
    assert not summarise(records, "switchyard", 10.0, 50.0).kept_up


def test_summary_of_nothing_does_not_crash() -> None:
    empty = make_records([Stream("digits", "gold", 10.0)], [], [])
    s = summarise(empty, "switchyard", 0.0, 0.0)
    assert (s.requests, s.ok, s.lost, s.errors, s.shares) == (0, 0, 0, {}, {})
    assert math.isnan(s.attainment["gold"]) and math.isnan(s.cost_usd_per_1m)
    assert json.loads(json.dumps(s.to_json(), allow_nan=False))["attainment"] == {"gold": None}


def test_to_json_is_plain_json_with_nan_as_null() -> None:
    s = summarise(hand_records(), "switchyard", 4.0, 2.25)
    data = json.loads(json.dumps(s.to_json(), allow_nan=False))
    assert data["routing"] == "switchyard"
    assert data["attainment"] == {"bronze": pytest.approx(0.4), "gold": 0.5, "silver": None}
    assert data["latency_ms"]["silver"] == {"p50": None, "p99": None, "p99.9": None}
    assert data["errors"] == {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 1}
    assert data["kept_up"] is False and data["lost"] == 1


def test_check_live() -> None:
    s = summarise(hand_records(), "switchyard", 4.0, 2.25)
    gold_only = check_live(s, ["gold"], 0.25)
    assert [(name, ok) for name, ok, _ in gold_only] == [
        ("gold meets p99 <= 10 ms", False),  # 2 of 4 within 10 ms
        ("errors <= 25.00%", True),  # 2 of 9
        ("no request lost", False),
        ("generator kept up", False),
    ]
    assert gold_only[0][2] == "50.00% within 10 ms (99% needed)"
    every = {name: (ok, detail) for name, ok, detail in check_live(s, None, 0.2)}
    assert every["bronze meets p99 <= 100 ms"] == (False, "40.00% within 100 ms (99% needed)")
    assert every["silver meets its SLA"] == (False, "no requests in this class")
    assert every["errors <= 20.00%"][0] is False
    assert "UNAVAILABLE 1" in every["errors <= 20.00%"][1]
    clean = summarise(price_change_records(fail_bin=None), "switchyard", 10.0, 50.0)
    assert all(ok for _, ok, _ in check_live(clean, None, 0.0))


def sla_run(within: int, percentile: float) -> RunSummary:
    """100 gold requests (SLA p`percentile` <= 10 ms), `within` of them within 10 ms."""
    rows: list[Row] = [
        (i / 100, i / 100, 0, 5.0 if i < within else 15.0, 0, 0, 1e-6, True) for i in range(100)
    ]
    records = make_records([Stream("digits", "gold", 10.0, percentile)], [SMALL], rows)
    return summarise(records, "switchyard", 1.0, 100.0)


@pytest.mark.parametrize(
    ("within", "percentile", "met"),
    [
        (91, 99.0, False),  # 91% within 10 ms misses p99 <= 10 ms, however close
        (98, 99.0, False),
        (99, 99.0, True),
        (100, 99.0, True),
        (91, 90.0, True),
        (89, 90.0, False),
        (50, 50.0, True),
    ],
)
def test_each_class_is_held_to_its_own_sla(within: int, percentile: float, met: bool) -> None:
    (gold, *_) = check_live(sla_run(within, percentile), None, None)
    assert gold == (
        f"gold meets p{percentile:g} <= 10 ms",
        met,
        f"{within:.2f}% within 10 ms ({percentile:g}% needed)",
    )


def test_shares_over_time_per_bin() -> None:
    starts, shares = shares_over_time(price_change_records(), bin_s=1.0)
    np.testing.assert_allclose(starts, np.arange(10.0))
    assert list(shares) == [SMALL, BIG]
    expected_small = [1.0] * 5 + [0.2, 0.2, 0.0, 0.2, 0.2]  # second 7: no OK answer
    np.testing.assert_allclose(shares[SMALL], expected_small)
    np.testing.assert_allclose(shares[BIG], [0.0] * 5 + [0.8, 0.8, 0.0, 0.8, 0.8])
    starts, shares = shares_over_time(price_change_records(), bin_s=2.5)
    np.testing.assert_allclose(starts, [0.0, 2.5, 5.0, 7.5])
    np.testing.assert_allclose(shares[BIG], [0.0, 0.0, 0.8, 0.8])


def test_share_moved_after_the_price_change() -> None:
    moved = share_moved(price_change_records(), before=(0.0, 5.0), after=(5.0, 10.0))
    assert moved[SMALL] == pytest.approx((1.0, 0.2))
    assert moved[BIG] == pytest.approx((0.0, 0.8))
    nothing = share_moved(price_change_records(), before=(0.0, 5.0), after=(20.0, 30.0))
    assert math.isnan(nothing[BIG][1]) and nothing[BIG][0] == 0.0


def test_chart_bins_stay_round_and_few() -> None:
    assert chart_bin_s(10.0) == 0.25
    assert chart_bin_s(60.0) == 0.5
    assert chart_bin_s(120.0) == 1.0
    assert chart_bin_s(600.0) == 5.0


def _baseline(records: Records, routing: str) -> tuple[RunSummary, Records]:
    """The same requests as if a baseline had routed them: all on the big route."""
    moved = make_records(
        records.streams,
        records.routes,
        [
            (
                float(records.send_s[i]),
                float(records.scheduled_s[i]),
                int(records.stream[i]),
                2.0,
                0,
                1,
                3e-6,
                True,
            )
            for i in range(len(records))
        ],
    )
    return summarise(moved, routing, 10.0, 50.0), moved


def test_write_report_files(tmp_path: Path) -> None:
    records = price_change_records()
    summary = summarise(records, "switchyard", 10.0, 50.0)
    events = [
        FiredEvent(5.0, "set_price small-cpu 0.80 USD/h"),
        FiredEvent(7.0, "kill big-cpu (pid 1234)", ok=False, detail="no such process"),
    ]
    checks = check_live(summary, None, 0.05)
    baseline = _baseline(records, "fastest-only")
    out = tmp_path / "report"
    description = "The small CPU's price rises."
    paths = write_report(
        out, "price-spike", description, records, summary, events, checks, [baseline]
    )
    assert paths == {
        "json": out / "report.json",
        "md": out / "report.md",
        "png": out / "report.png",
        "csv": out / "requests.csv",
    }

    data = json.loads(paths["json"].read_text())
    assert data["scenario"] == "price-spike"
    assert data["passed"] is False
    assert data["summary"]["requests"] == 500
    assert data["summary"]["errors"] == {"UNAVAILABLE": 50}
    # 450 OK: 250 + 40 on small (1e-6), 160 on big (3e-6)
    assert data["summary"]["cost_usd_per_1m"] == pytest.approx((290 + 480) / 450)
    assert data["baselines"][0]["routing"] == "fastest-only"
    assert data["baselines"][0]["cost_usd_per_1m"] == pytest.approx(3.0)
    saving = data["savings"]["fastest-only"]
    assert saving["saving"] == pytest.approx(1 - (770 / 450) / 3.0)
    assert saving["attainment_difference"]["gold"] == pytest.approx(0.9 - 1.0)
    assert data["events"][1] == {
        "at_s": 7.0,
        "label": "kill big-cpu (pid 1234)",
        "ok": False,
        "detail": "no such process",
    }
    assert {c["name"]: c["passed"] for c in data["checks"]} == {
        "gold meets p99 <= 10 ms": False,
        "errors <= 5.00%": False,
        "no request lost": True,
        "generator kept up": True,
    }

    md = paths["md"].read_text()
    assert md.startswith("# Load test: price-spike\n")
    assert "| gold | 10 | 500 | 90.00% |" in md
    assert "| UNAVAILABLE | 50 |" in md
    assert "1.7111 USD per 1M" in md
    assert f"| {SMALL} | 64.4% |" in md  # 290 of 450
    assert "| 7.00 | kill big-cpu (pid 1234) | FAILED | no such process |" in md
    assert "| gold meets p99 <= 10 ms | **FAIL** | 90.00% within 10 ms (99% needed) |" in md
    assert "| no request lost | pass |" in md
    assert "| fastest-only | 3.0000 | 43.0% | 100.00% |" in md

    image = imread(paths["png"])
    height, width = image.shape[:2]
    assert width > 1000 and height > 700  # 12 x 8 in at 110 dpi, trimmed to its content

    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 500
    assert rows[0]["backend"] == "small-cpu" and rows[0]["status"] == "OK"


def test_write_report_with_empty_classes_and_no_events(tmp_path: Path) -> None:
    records = hand_records()
    summary = summarise(records, "switchyard", 4.0, 2.25)
    paths = write_report(tmp_path, "sla-mix", "", records, summary, [], [])
    text = paths["json"].read_text()
    assert "NaN" not in text
    assert json.loads(text)["summary"]["attainment"]["silver"] is None
    md = paths["md"].read_text()
    assert "| silver | 50 | 0 | - | - | - | - |" in md
    assert "| (lost: never answered) | 1 |" in md
    assert paths["png"].stat().st_size > 10_000


def test_print_summary_tables() -> None:
    records = price_change_records()
    summary = summarise(records, "switchyard", 10.0, 50.0)
    checks = check_live(summary, None, 0.05)
    console = Console(file=io.StringIO(), width=160, record=True)
    print_summary(console, "price-spike", summary, checks, [_baseline(records, "fastest-only")])
    text = console.export_text()
    assert "price-spike" in text and "500 requests" in text
    assert "90.00%" in text and "1.7111" in text
    assert "UNAVAILABLE 50" in text
    assert "fastest-only" in text and "43.0%" in text
    assert "FAIL  gold meets p99 <= 10 ms" in text
    assert "pass  no request lost" in text
    # Baselines may also be given as bare summaries.
    bare = Console(file=io.StringIO(), width=160, record=True)
    print_summary(bare, "price-spike", summary, checks, [_baseline(records, "fastest-only")[0]])
    assert "43.0%" in bare.export_text()
