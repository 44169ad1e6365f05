"""The report of a live load test (`switchyard load ... --report DIR`).

Turns the `Records` of a run (one row per request sent) into what an SRE reads
afterwards: per SLA class the attainment and latency percentiles, errors by gRPC
status, cost per million inferences, how requests were shared between routes (over
the run and over time), the scenario's events, the run's checks, and the same
figures for baseline routing policies side by side. Written as `report.json`,
`report.md`, `report.png` and `requests.csv`, and printed as tables at the end of
the run.

Pure: no gRPC, no clock, no network; it reads only what it is given and writes
only under the directory it is given. matplotlib is imported when the chart is
drawn (Agg canvas, no pyplot state), so importing this module stays cheap.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.loadtest.records import NO_ROUTE, BoolArray, FiredEvent, FloatArray, IntArray, Records
from gateway.report.markdown import markdown_table
from gateway.routing.percentiles import percentile

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from rich.console import Console

PERCENTILES = (("p50", 50.0), ("p99", 99.0), ("p99.9", 99.9))
"""The latency percentiles reported per class: (name, percentile)."""

MAX_LAG_P99_MS = 20.0
"""The generator kept up when its p99 lateness is at most this..."""
MIN_SENT_FRACTION = 0.97
"""...and it sent at least this fraction of the asked rate."""

NO_ROUTE_NAME = "(no route)"
"""Share key of OK answers that named no route (should not happen)."""

Check = tuple[str, bool, str]
"""(name, passed, detail)."""


@dataclass
class RunSummary:
    """One run (Switchyard routing, or a baseline routing policy) of one scenario."""

    routing: str
    """`switchyard`, `fastest-only`, `cheapest-only`, `round-robin` or `least-loaded`."""
    requests: int
    answered: int
    ok: int
    errors: dict[str, int]
    """Answered requests that did not end OK, by gRPC status name."""
    lost: int
    """Sent but never answered (0 in a good run)."""
    duration_s: float
    asked_rate_per_s: float
    """What the scenario asked for (mean over the run)."""
    sent_rate_per_s: float
    lag_p99_ms: float
    """send_s - scheduled_s at p99: the generator's own lateness."""
    kept_up: bool
    """False when the generator could not keep the asked rate."""
    attainment: dict[str, float]
    """Per SLA class: fraction of its requests answered OK within their sla_ms
    (errors and lost requests are misses); NaN for a class with no requests."""
    latency_ms: dict[str, dict[str, float]]
    """Per class: {"p50", "p99", "p99.9"} over answered OK requests; NaN when none."""
    cost_usd_per_1m: float
    """Sum of cost_usd of OK answers / OK answers x 1e6; NaN when none was OK."""
    shares: dict[str, float] = field(default_factory=dict)
    """Per route (`backend/variant`): its share of the OK answers over the run."""
    sla: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Per SLA class: its SLA, (percentile, latency ms): met when at least that
    percentile of its requests were answered OK within that latency (the strictest
    of its streams' where they differ)."""

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def worst_attainment(self) -> tuple[str, float] | None:
        """The class with the lowest attainment, or None when no class had requests."""
        known = [(k, v) for k, v in self.attainment.items() if not math.isnan(v)]
        return min(known, key=lambda kv: kv[1]) if known else None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values; NaN becomes null."""
        out: dict[str, Any] = _finite(
            {
                "routing": self.routing,
                "requests": self.requests,
                "answered": self.answered,
                "ok": self.ok,
                "errors": dict(self.errors),
                "lost": self.lost,
                "duration_s": self.duration_s,
                "asked_rate_per_s": self.asked_rate_per_s,
                "sent_rate_per_s": self.sent_rate_per_s,
                "lag_p99_ms": self.lag_p99_ms,
                "kept_up": self.kept_up,
                "attainment": dict(self.attainment),
                "sla": {k: {"percentile": p, "latency_ms": ms} for k, (p, ms) in self.sla.items()},
                "latency_ms": {k: dict(v) for k, v in self.latency_ms.items()},
                "cost_usd_per_1m": self.cost_usd_per_1m,
                "shares": dict(self.shares),
            }
        )
        return out


# ---- figures --------------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _class_index(records: Records) -> tuple[list[str], IntArray, FloatArray]:
    """Class names, and per request its class (index into the names) and its sla_ms."""
    names = records.class_names()
    stream_class = np.asarray(
        [names.index(s.sla_class) for s in records.streams] or [0], dtype=np.int64
    )
    stream_sla = np.asarray([s.sla_ms for s in records.streams] or [math.nan], dtype=np.float64)
    klass: IntArray = stream_class[records.stream]
    sla: FloatArray = stream_sla[records.stream]
    return names, klass, sla


def _route_names(records: Records, ok: BoolArray) -> tuple[list[str], IntArray]:
    """Route names to report, and per request an index into them (NO_ROUTE mapped last)."""
    names = list(records.routes)
    route = records.route.copy()
    if bool((ok & (route == NO_ROUTE)).any()):
        names.append(NO_ROUTE_NAME)
        route[route == NO_ROUTE] = len(names) - 1
    return names, route


def summarise(
    records: Records, routing: str, duration_s: float, asked_rate_per_s: float
) -> RunSummary:
    """The figures of one run."""
    n = len(records)
    answered = records.answered
    ok = records.ok
    errors: dict[str, int] = {}
    failed = answered & ~ok
    if failed.any():
        counts = np.bincount(records.status[failed], minlength=len(records.statuses))
        errors = {records.statuses[i]: int(c) for i, c in enumerate(counts) if c > 0}
        errors = dict(sorted(errors.items(), key=lambda kv: (-kv[1], kv[0])))

    lag_ms: FloatArray = (records.send_s - records.scheduled_s) * 1000.0
    lag_p99_ms = percentile(lag_ms, 99.0)
    sent_rate = n / duration_s if duration_s > 0 else 0.0
    kept_up = lag_p99_ms <= MAX_LAG_P99_MS and sent_rate >= MIN_SENT_FRACTION * asked_rate_per_s

    names, klass, sla = _class_index(records)
    targets: dict[str, tuple[float, float]] = {}
    for stream in records.streams:
        pct, ms = targets.get(stream.sla_class, (0.0, math.inf))
        targets[stream.sla_class] = (max(pct, stream.percentile), min(ms, stream.sla_ms))
    attainment: dict[str, float] = {}
    latency: dict[str, dict[str, float]] = {}
    within = ok & (records.latency_ms <= sla)
    for index, name in enumerate(names):
        mine = klass == index
        count = int(mine.sum())
        attainment[name] = float((within & mine).sum()) / count if count else math.nan
        done = records.latency_ms[mine & ok]
        latency[name] = {label: percentile(done, q) for label, q in PERCENTILES}

    ok_count = int(ok.sum())
    cost = float(records.cost_usd[ok].sum()) / ok_count * 1e6 if ok_count else math.nan
    route_names, route = _route_names(records, ok)
    shares: dict[str, float] = {}
    if route_names:
        per_route = np.bincount(route[ok], minlength=len(route_names))
        shares = {
            r: float(c) / ok_count if ok_count else 0.0
            for r, c in zip(route_names, per_route, strict=True)
        }
    return RunSummary(
        routing=routing,
        requests=n,
        answered=int(answered.sum()),
        ok=ok_count,
        errors=errors,
        lost=n - int(answered.sum()),
        duration_s=duration_s,
        asked_rate_per_s=asked_rate_per_s,
        sent_rate_per_s=sent_rate,
        lag_p99_ms=lag_p99_ms,
        kept_up=bool(kept_up),
        attainment=attainment,
        sla={name: targets[name] for name in names if name in targets},
        latency_ms=latency,
        cost_usd_per_1m=cost,
        shares=shares,
    )


def _bin_count(records: Records, bin_s: float, until_s: float = 0.0) -> int:
    last = max(float(records.send_s.max()) if len(records) else 0.0, until_s)
    return max(1, math.ceil(last / bin_s)) if until_s > 0 else int(last // bin_s) + 1


def _bin_of(times_s: FloatArray, bin_s: float, bins: int) -> IntArray:
    index: IntArray = np.clip(np.floor(times_s / bin_s), 0, bins - 1).astype(np.int64)
    return index


def shares_over_time(
    records: Records, bin_s: float = 1.0, until_s: float = 0.0
) -> tuple[FloatArray, dict[str, FloatArray]]:
    """Bin starts (s), and per route the share of the OK answers sent in each bin
    (0 where a bin has no OK answer); the bins cover the sends, or [0, until_s)."""
    bins = _bin_count(records, bin_s, until_s)
    starts: FloatArray = np.arange(bins, dtype=np.float64) * bin_s
    ok = records.ok
    names, route = _route_names(records, ok)
    if not names:
        return starts, {}
    where = _bin_of(records.send_s[ok], bin_s, bins)
    counts = np.bincount(where * len(names) + route[ok], minlength=bins * len(names)).reshape(
        bins, len(names)
    )
    totals = counts.sum(axis=1)
    share = np.divide(
        counts, totals[:, None], out=np.zeros(counts.shape), where=totals[:, None] > 0
    )
    return starts, {name: share[:, i].astype(np.float64) for i, name in enumerate(names)}


def window_shares(records: Records, from_s: float, to_s: float) -> dict[str, float]:
    """Per route, its share of the OK answers to requests sent in [from_s, to_s).
    NaN for every route when the window has no OK answer, so that no comparison on
    it passes by accident."""
    ok = records.ok
    names, route = _route_names(records, ok)
    inside = ok & (records.send_s >= from_s) & (records.send_s < to_s)
    total = int(inside.sum())
    counts = np.bincount(route[inside], minlength=len(names)).astype(np.float64)
    shares: FloatArray = counts / total if total else np.full(len(names), math.nan)
    return {name: float(shares[i]) for i, name in enumerate(names)}


def share_moved(
    records: Records, before: tuple[float, float], after: tuple[float, float]
) -> dict[str, tuple[float, float]]:
    """Per route, its share of the OK answers sent in `before` and in `after`
    (each a [start_s, end_s) window; see `window_shares`)."""
    first, second = window_shares(records, *before), window_shares(records, *after)
    return {name: (share, second[name]) for name, share in first.items()}


def sla_met(attainment: float, percentile: float) -> bool:
    """Whether a class met its SLA: at least `percentile` % of its requests answered OK
    within its latency (`attainment`, a fraction; NaN: no requests, not met)."""
    return not math.isnan(attainment) and attainment >= percentile / 100.0


def check_live(
    summary: RunSummary,
    classes: Sequence[str] | None,
    max_error_fraction: float | None,
) -> list[Check]:
    """The live run's checks: each class (of `classes`; every class when None) held to
    its own SLA, the error fraction, no request lost, and the generator kept up."""
    out: list[Check] = []
    for name in summary.attainment if classes is None else classes:
        met = summary.attainment.get(name, math.nan)
        target = summary.sla.get(name)
        if target is None or math.isnan(met):
            out.append((f"{name} meets its SLA", False, "no requests in this class"))
            continue
        pct, latency_ms = target
        out.append(
            (
                f"{name} meets p{pct:g} <= {latency_ms:g} ms",
                sla_met(met, pct),
                f"{met:.2%} within {latency_ms:g} ms ({pct:g}% needed)",
            )
        )
    if max_error_fraction is not None:
        errors = summary.error_count
        fraction = errors / summary.requests if summary.requests else 0.0
        detail = f"{errors:,} of {summary.requests:,} ({fraction:.3%})"
        if summary.errors:
            detail += ": " + ", ".join(f"{k} {v:,}" for k, v in summary.errors.items())
        out.append((f"errors <= {max_error_fraction:.2%}", fraction <= max_error_fraction, detail))
    out.append(
        (
            "no request lost",
            summary.lost == 0,
            f"{summary.lost:,} of {summary.requests:,} never answered",
        )
    )
    out.append(
        (
            "generator kept up",
            summary.kept_up,
            f"sent {summary.sent_rate_per_s:,.1f}/s of {summary.asked_rate_per_s:,.1f}/s asked, "
            f"lag p99 {summary.lag_p99_ms:.1f} ms (limits: >= {MIN_SENT_FRACTION:.0%} of the "
            f"asked rate, <= {MAX_LAG_P99_MS:g} ms)",
        )
    )
    return out


def _saving(ours: RunSummary, baseline: RunSummary) -> float:
    if baseline.cost_usd_per_1m > 0 and not math.isnan(baseline.cost_usd_per_1m):
        return 1.0 - ours.cost_usd_per_1m / baseline.cost_usd_per_1m
    return math.nan


def savings(ours: RunSummary, baselines: Sequence[RunSummary]) -> dict[str, dict[str, Any]]:
    """Per baseline: the fraction of its cost that `ours` saves, and per class
    `ours`' attainment minus the baseline's."""
    return {
        b.routing: {
            "saving": _saving(ours, b),
            "attainment_difference": {
                name: met - b.attainment.get(name, math.nan)
                for name, met in ours.attainment.items()
            },
        }
        for b in baselines
    }


# ---- formatting -----------------------------------------------------------------------------


def _pct(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}%}"


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def _usd(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"


def _class_sla(records: Records) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for s in records.streams:
        if s.sla_ms not in out.setdefault(s.sla_class, []):
            out[s.sla_class].append(s.sla_ms)
    return {k: sorted(v) for k, v in out.items()}


def _class_requests(records: Records) -> dict[str, int]:
    names, klass, _ = _class_index(records)
    counts = np.bincount(klass, minlength=len(names))
    return {name: int(counts[i]) for i, name in enumerate(names)}


def markdown(
    scenario_name: str,
    description: str,
    records: Records,
    summary: RunSummary,
    events: Sequence[FiredEvent],
    checks: Sequence[Check],
    baselines: Sequence[tuple[RunSummary, Records]] = (),
) -> str:
    """report.md."""
    s = summary
    passed = all(c[1] for c in checks)
    lines = [f"# Load test: {scenario_name}", ""]
    if description:
        lines += [description.strip(), ""]
    lines += [
        f"Routing: **{s.routing}**. {s.requests:,} requests over {s.duration_s:g} s: "
        f"{s.answered:,} answered, {s.ok:,} OK, {s.error_count:,} errors, {s.lost:,} lost. "
        f"Asked {s.asked_rate_per_s:,.1f}/s, sent {s.sent_rate_per_s:,.1f}/s, generator lag p99 "
        f"{_ms(s.lag_p99_ms)} ms ({'kept up' if s.kept_up else 'did NOT keep up'}).",
        "",
        f"Checks: **{'all passed' if passed else 'FAILED'}**.",
        "",
        "## SLA attainment and latency per class",
        "",
    ]
    sla = _class_sla(records)
    counts = _class_requests(records)
    rows = [
        [
            name,
            " / ".join(f"{v:g}" for v in sla.get(name, [])),
            f"{counts.get(name, 0):,}",
            _pct(met),
            *(_ms(s.latency_ms[name][label]) for label, _ in PERCENTILES),
        ]
        for name, met in s.attainment.items()
    ]
    lines.append(
        markdown_table(
            ["class", "SLA (ms)", "requests", "attainment", "p50 (ms)", "p99 (ms)", "p99.9 (ms)"],
            rows,
        )
    )
    lines += [
        "",
        "Attainment: the class's requests answered OK within their SLA; errors and lost "
        "requests count as misses. Latency percentiles are over OK answers, nearest rank "
        "(each is a latency that was measured, as in `switchyard simulate`).",
        "",
        "## Cost",
        "",
        f"{_usd(s.cost_usd_per_1m)} USD per 1M inferences (the gateway's `switchyard_cost_usd` "
        "of OK answers).",
        "",
        "## Errors by status",
        "",
    ]
    if s.errors or s.lost:
        error_rows = [[k, f"{v:,}"] for k, v in s.errors.items()]
        if s.lost:
            error_rows.append(["(lost: never answered)", f"{s.lost:,}"])
        lines.append(markdown_table(["status", "requests"], error_rows))
    else:
        lines.append("None.")
    lines += ["", "## Routing shares (OK answers over the run)", ""]
    if s.shares:
        lines.append(
            markdown_table(
                ["route", "share"],
                [[r, _pct(v, 1)] for r, v in sorted(s.shares.items(), key=lambda kv: -kv[1])],
            )
        )
    else:
        lines.append("No route answered.")
    lines += ["", "## Events", ""]
    if events:
        lines.append(
            markdown_table(
                ["at (s)", "event", "applied", "detail"],
                [
                    [f"{e.at_s:.2f}", e.label, "yes" if e.ok else "FAILED", e.detail or ""]
                    for e in events
                ],
                right=(False, False, False, False),
            )
        )
    else:
        lines.append("None.")
    lines += ["", "## Checks", ""]
    if checks:
        lines.append(
            markdown_table(
                ["check", "result", "detail"],
                [[name, "pass" if ok else "**FAIL**", detail] for name, ok, detail in checks],
                right=(False, False, False),
            )
        )
    else:
        lines.append("None.")
    if baselines:
        others = [b for b, _ in baselines]
        classes = list(s.attainment)
        lines += [
            "",
            "## Against baseline routing policies",
            "",
            f"The same scenario with each baseline policy routing; `saving` is the fraction of "
            f"the baseline's cost that {s.routing} saves.",
            "",
        ]
        header = ["routing", "USD per 1M", "saving"]
        header += [f"{c} attainment" for c in classes] + [f"{c} p99 (ms)" for c in classes]
        header += ["errors", "lost"]
        rows = []
        for run in (s, *others):
            rows.append(
                [
                    run.routing,
                    _usd(run.cost_usd_per_1m),
                    "-" if run is s else _pct(_saving(s, run), 1),
                    *(_pct(run.attainment.get(c, math.nan)) for c in classes),
                    *(_ms(run.latency_ms.get(c, {}).get("p99", math.nan)) for c in classes),
                    f"{run.error_count:,}",
                    f"{run.lost:,}",
                ]
            )
        lines.append(markdown_table(header, rows))
    lines += [
        "",
        "## Files",
        "",
        "- `report.png`: routing shares, p99 latency per class and request rate over time, "
        "with the events marked",
        "- `report.json`: these figures for machines",
        "- `requests.csv`: one row per request sent",
        "",
    ]
    return "\n".join(lines)


def report_json(
    scenario_name: str,
    description: str,
    summary: RunSummary,
    events: Sequence[FiredEvent],
    checks: Sequence[Check],
    baselines: Sequence[RunSummary] = (),
) -> dict[str, Any]:
    """report.json, as plain JSON values (NaN as null)."""
    return {
        "scenario": scenario_name,
        "description": description,
        "passed": all(c[1] for c in checks),
        "summary": summary.to_json(),
        "baselines": [b.to_json() for b in baselines],
        "savings": _finite(savings(summary, baselines)),
        "events": [
            {"at_s": e.at_s, "label": e.label, "ok": e.ok, "detail": e.detail} for e in events
        ],
        "checks": [{"name": n, "passed": ok, "detail": d} for n, ok, d in checks],
    }


# ---- the chart ------------------------------------------------------------------------------

_NICE_BINS_S = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0)


def chart_bin_s(duration_s: float, max_bins: int = 120) -> float:
    """The chart's bin width: the smallest round width giving at most `max_bins` bins."""
    for width in _NICE_BINS_S:
        if duration_s / width <= max_bins:
            return width
    return math.ceil(duration_s / max_bins)


def _p99_per_bin(records: Records, bin_s: float, bins: int) -> dict[str, FloatArray]:
    names, klass, _ = _class_index(records)
    ok = records.ok
    where = _bin_of(records.send_s, bin_s, bins)
    out: dict[str, FloatArray] = {}
    for index, name in enumerate(names):
        mine = ok & (klass == index)
        b, lat = where[mine], records.latency_ms[mine]
        order = np.argsort(b, kind="stable")
        b, lat = b[order], lat[order]
        edges = np.searchsorted(b, np.arange(bins + 1))
        out[name] = np.asarray(
            [percentile(lat[edges[i] : edges[i + 1]], 99.0) for i in range(bins)],
            dtype=np.float64,
        )
    return out


def _mark_events(axes: Sequence[Axes], events: Sequence[FiredEvent]) -> None:
    for e in events:
        colour = "black" if e.ok else "red"
        for ax in axes:
            ax.axvline(e.at_s, color=colour, linestyle=":", linewidth=1.0, alpha=0.8)
        axes[0].text(
            e.at_s,
            0.98,
            " " + e.label + ("" if e.ok else " (failed)"),
            transform=axes[0].get_xaxis_transform(),
            rotation=90,
            va="top",
            ha="right",
            fontsize=7,
            color=colour,
            bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1},
        )


def chart(
    path: Path,
    scenario_name: str,
    records: Records,
    summary: RunSummary,
    events: Sequence[FiredEvent],
) -> None:
    """report.png: three panels over the run's time: routing shares (stacked), p99
    latency per class against its SLA, and requests/s asked and sent with errors."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    duration = max(summary.duration_s, float(records.send_s.max()) if len(records) else 0.0)
    bin_s = chart_bin_s(duration)
    starts, shares = shares_over_time(records, bin_s, until_s=duration)
    bins = len(starts)
    mids = starts + bin_s / 2
    edges = np.append(starts, starts[-1] + bin_s)

    fig = Figure(figsize=(12, 8), dpi=110)
    FigureCanvasAgg(fig)
    share_ax, latency_ax, rate_ax = fig.subplots(
        3, 1, sharex=True, gridspec_kw={"height_ratios": [1.2, 1.0, 0.8]}
    )
    fig.suptitle(
        f"{scenario_name}: {summary.routing} routing, {summary.requests:,} requests "
        f"(bins of {bin_s:g} s)"
    )

    # Routing shares, stacked.
    routes = [r for r in shares if shares[r].any()]
    if routes:
        share_ax.stackplot(
            edges,
            *[np.append(shares[r], shares[r][-1]) for r in routes],
            labels=routes,
            step="post",
            alpha=0.85,
        )
    share_ax.set_ylim(0, 1)
    share_ax.set_ylabel("share of OK answers")
    share_ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    if routes:
        share_ax.legend(
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize=7,
            title="route",
            title_fontsize=8,
            frameon=False,
        )

    # p99 latency per class, SLA dashed.
    colours = [f"C{i}" for i in range(10)]
    sla = _class_sla(records)
    seen: list[float] = []
    for i, (name, p99) in enumerate(_p99_per_bin(records, bin_s, bins).items()):
        colour = colours[i % len(colours)]
        latency_ax.plot(mids, p99, marker=".", markersize=3, color=colour, label=f"{name} p99")
        seen += [float(v) for v in p99[np.isfinite(p99)]]
        for target in sla.get(name, []):
            seen.append(target)
            latency_ax.axhline(
                target,
                color=colour,
                linestyle="--",
                linewidth=1.0,
                label=f"{name} SLA {target:g} ms",
            )
    positive = [v for v in seen if v > 0]
    if positive and max(positive) / min(positive) > 20:
        # Spikes of seconds next to targets of milliseconds: a log axis keeps both readable.
        latency_ax.set_yscale("log")
        latency_ax.yaxis.set_major_formatter(lambda v, _: f"{v:g}")
    else:
        latency_ax.set_ylim(bottom=0, top=max([*seen, 1.0]) * 1.1)
    latency_ax.set_ylabel("latency p99 (ms)")
    latency_ax.grid(True, which="both", alpha=0.3)
    if latency_ax.get_legend_handles_labels()[0]:
        latency_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)

    # Requests/s asked (by schedule) and sent; errors per second on their own axis.

    def per_s(times_s: FloatArray) -> FloatArray:
        counts = np.bincount(_bin_of(times_s, bin_s, bins), minlength=bins) / bin_s
        return np.append(counts, counts[-1]).astype(np.float64)  # the last bin's step drawn

    failed = records.answered & ~records.ok
    lost = ~records.answered
    asked = per_s(records.scheduled_s)
    rate_ax.step(edges, asked, where="post", color="grey", linestyle="--", label="asked/s")
    rate_ax.step(edges, per_s(records.send_s), where="post", color="C0", label="sent/s")
    rate_ax.set_ylim(bottom=0)
    rate_ax.set_ylabel("requests/s")
    rate_ax.set_xlabel("time since start (s)")
    rate_ax.grid(True, alpha=0.3)
    error_ax = rate_ax.twinx()
    errors = per_s(records.send_s[failed])
    error_ax.step(edges, errors, where="post", color="C3", label="errors/s")
    top = float(errors.max())
    if lost.any():
        lost_rate = per_s(records.send_s[lost])
        top = max(top, float(lost_rate.max()))
        error_ax.step(edges, lost_rate, where="post", color="C1", linestyle=":", label="lost/s")
    error_ax.set_ylabel("errors/s", color="C3")
    error_ax.set_ylim(bottom=0, top=max(1.0, top * 1.15))
    handles, labels = rate_ax.get_legend_handles_labels()
    more_handles, more_labels = error_ax.get_legend_handles_labels()
    rate_ax.legend(
        handles + more_handles,
        labels + more_labels,
        loc="upper left",
        bbox_to_anchor=(1.06, 1.0),
        fontsize=7,
        frameon=False,
    )

    rate_ax.set_xlim(0, max(duration, bin_s))
    _mark_events([share_ax, latency_ax, rate_ax], events)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")


# ---- writing and printing -------------------------------------------------------------------


def write_report(
    out_dir: Path,
    scenario_name: str,
    description: str,
    records: Records,
    summary: RunSummary,
    events: Sequence[FiredEvent],
    checks: Sequence[Check],
    baselines: Sequence[tuple[RunSummary, Records]] = (),
) -> dict[str, Path]:
    """Writes report.json, report.md, report.png and requests.csv under `out_dir`
    (created if missing); returns their paths by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "report.json",
        "md": out_dir / "report.md",
        "png": out_dir / "report.png",
        "csv": out_dir / "requests.csv",
    }
    document = report_json(
        scenario_name, description, summary, events, checks, [b for b, _ in baselines]
    )
    paths["json"].write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    paths["md"].write_text(
        markdown(scenario_name, description, records, summary, events, checks, baselines)
    )
    chart(paths["png"], scenario_name, records, summary, events)
    records.write_csv(paths["csv"])
    return paths


def print_summary(
    console: Console,
    scenario_name: str,
    summary: RunSummary,
    checks: Sequence[Check],
    baselines: Sequence[RunSummary | tuple[RunSummary, Records]] = (),
) -> None:
    """The end-of-run tables: per class attainment and latency, cost, shares, errors,
    checks; with baselines, a side-by-side table."""
    from rich.table import Table

    s = summary
    console.print(
        f"[bold]{scenario_name}[/bold] ({s.routing}): {s.requests:,} requests over "
        f"{s.duration_s:g} s, {s.ok:,} OK, {s.error_count:,} errors, {s.lost:,} lost; "
        f"sent {s.sent_rate_per_s:,.1f}/s of {s.asked_rate_per_s:,.1f}/s asked, "
        f"lag p99 {_ms(s.lag_p99_ms)} ms; {_usd(s.cost_usd_per_1m)} USD per 1M"
    )
    table = Table(title="SLA attainment and latency (OK answers) per class")
    table.add_column("class")
    for title in ("attainment", "p50 ms", "p99 ms", "p99.9 ms"):
        table.add_column(title, justify="right")
    for name, met in s.attainment.items():
        table.add_row(name, _pct(met), *(_ms(s.latency_ms[name][k]) for k, _ in PERCENTILES))
    console.print(table)

    if s.shares:
        shares = Table(title="Routing shares (OK answers)")
        shares.add_column("route")
        shares.add_column("share", justify="right")
        for route, share in sorted(s.shares.items(), key=lambda kv: -kv[1]):
            shares.add_row(route, _pct(share, 1))
        console.print(shares)
    if s.errors:
        console.print("errors: " + ", ".join(f"{k} {v:,}" for k, v in s.errors.items()))

    others = [b[0] if isinstance(b, tuple) else b for b in baselines]
    if others:
        side = Table(title="Against baseline routing policies")
        side.add_column("routing")
        side.add_column("USD per 1M", justify="right")
        side.add_column(f"{s.routing} saves", justify="right")
        side.add_column("worst attainment", justify="right")
        side.add_column("errors", justify="right")
        side.add_column("lost", justify="right")
        for run in (s, *others):
            worst = run.worst_attainment
            side.add_row(
                run.routing,
                _usd(run.cost_usd_per_1m),
                "-" if run is s else _pct(_saving(s, run), 1),
                "-" if worst is None else f"{_pct(worst[1])} ({worst[0]})",
                f"{run.error_count:,}",
                f"{run.lost:,}",
            )
        console.print(side)

    for name, ok, detail in checks:
        mark = "[green]pass[/green]" if ok else "[red]FAIL[/red]"
        console.print(f"{mark}  {name}: {detail}")
