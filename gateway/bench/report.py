"""The results of `make bench`: the tables on the terminal (rich) and BENCHMARKS.md.

Pure formatting over plain data; imports no gRPC or protobuf code.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gateway.report.markdown import markdown_table

GATEWAY_VS_KSERVE_TARGET = 0.8
"""Gateway throughput at the highest concurrency over KServe's must be at least this."""
OVERHEAD_P50_TARGET_MS = 0.3
"""Gateway p50 minus backend-direct p50 at the lowest concurrency must be at most this."""

DIRECT = "direct"
GATEWAY = "gateway"
GATEWAY_UNARY = "gateway-unary"
"""The gateway with `backend_streams: 0`: one unary call to the backend per request."""
KSERVE = "kserve"
BARE_PROXY = "bare-proxy"
"""gateway.bench.bare_proxy in front of the same worker: the floor of a Python hop."""


@dataclass(frozen=True, slots=True)
class Measurement:
    throughput_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    requests: int = 0
    errors: int = 0
    throughput_min_per_s: float = math.nan
    """Over rounds: the lowest and highest throughput (nan: one measurement)."""
    throughput_max_per_s: float = math.nan
    rounds: int = 1
    cpu_us_per_infer: dict[str, float] = field(default_factory=dict)
    """Process (`client`, `gateway`, `worker`, `kserve`) -> CPU microseconds per call."""


def combine(rounds: Sequence[Measurement]) -> Measurement:
    """Several rounds of one cell: the median of each figure, and the throughput range."""
    return Measurement(
        throughput_per_s=statistics.median(m.throughput_per_s for m in rounds),
        latency_p50_ms=statistics.median(m.latency_p50_ms for m in rounds),
        latency_p99_ms=statistics.median(m.latency_p99_ms for m in rounds),
        requests=sum(m.requests for m in rounds),
        errors=sum(m.errors for m in rounds),
        throughput_min_per_s=min(m.throughput_per_s for m in rounds),
        throughput_max_per_s=max(m.throughput_per_s for m in rounds),
        rounds=len(rounds),
        cpu_us_per_infer={
            name: statistics.median(m.cpu_us_per_infer.get(name, math.nan) for m in rounds)
            for name in rounds[0].cpu_us_per_infer
        },
    )


@dataclass(slots=True)
class Results:
    """Everything one run measured; missing cells are simply absent."""

    models: list[str]
    concurrency: list[int]
    targets: dict[str, str]
    """Target key -> label, in display order."""
    loadgen: dict[tuple[str, str, int], Measurement] = field(default_factory=dict)
    """(target, model, concurrency) -> the rounds combined."""
    rounds: dict[tuple[str, str, int], list[Measurement]] = field(default_factory=dict)
    """(target, model, concurrency) -> each round's measurement."""
    perf_analyzer: dict[tuple[str, str, int], Measurement] = field(default_factory=dict)
    rounds_run: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    """Target or tool -> why it was not measured."""


@dataclass(frozen=True, slots=True)
class Ratio:
    name: str
    value: float
    unit: str
    target: str
    met: bool | None


def ratios(
    cells: dict[tuple[str, str, int], Measurement], model: str, concurrency: Sequence[int]
) -> list[Ratio]:
    """The figures the project tracks, from one model's cells (nan where missing)."""
    low, high = min(concurrency), max(concurrency)

    def get(target: str, c: int) -> Measurement | None:
        return cells.get((target, model, c))

    def divide(a: Measurement | None, b: Measurement | None) -> float:
        if a is None or b is None or b.throughput_per_s <= 0:
            return math.nan
        return a.throughput_per_s / b.throughput_per_s

    def p50_over_direct(target: str) -> float:
        """`target`'s p50 less backend direct's, at the lowest concurrency."""
        a, b = get(target, low), get(DIRECT, low)
        return math.nan if a is None or b is None else a.latency_p50_ms - b.latency_p50_ms

    gw_high = get(GATEWAY, high)
    vs_kserve = divide(gw_high, get(KSERVE, high))
    vs_direct = divide(gw_high, get(DIRECT, high))
    overhead = p50_over_direct(GATEWAY)
    return [
        Ratio(
            f"gateway / KServe throughput, c={high}",
            vs_kserve,
            "x",
            f">= {GATEWAY_VS_KSERVE_TARGET}",
            None if math.isnan(vs_kserve) else vs_kserve >= GATEWAY_VS_KSERVE_TARGET,
        ),
        Ratio(f"gateway / backend-direct throughput, c={high}", vs_direct, "x", "-", None),
        Ratio(
            f"gateway over streams / over unary calls, throughput c={high}",
            divide(gw_high, get(GATEWAY_UNARY, high)),
            "x",
            "-",
            None,
        ),
        Ratio(
            f"gateway p50 - backend-direct p50, c={low}",
            overhead,
            "ms",
            f"<= {OVERHEAD_P50_TARGET_MS:g} ms",
            None if math.isnan(overhead) else overhead <= OVERHEAD_P50_TARGET_MS,
        ),
        Ratio(
            f"gateway / bare proxy throughput, c={high}",
            divide(gw_high, get(BARE_PROXY, high)),
            "x",
            "-",
            None,
        ),
        Ratio(
            f"bare proxy p50 - backend-direct p50, c={low}",
            p50_over_direct(BARE_PROXY),
            "ms",
            "-",
            None,
        ),
    ]


def _num(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def _met(ratio: Ratio) -> str:
    return {True: "met", False: "NOT met", None: "-"}[ratio.met]


def _ratio_value(ratio: Ratio) -> str:
    if ratio.unit == "ms":
        return "n/a" if math.isnan(ratio.value) else f"{ratio.value:+.3f} ms"
    return _num(ratio.value, 3)


def _spread(m: Measurement) -> str:
    if math.isnan(m.throughput_min_per_s):
        return "-"
    return f"{m.throughput_min_per_s:,.0f}-{m.throughput_max_per_s:,.0f}"


def _rows(
    results: Results,
    cells: dict[tuple[str, str, int], Measurement],
    model: str,
    spread: bool = False,
) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for key, label in results.targets.items():
        for c in results.concurrency:
            m = cells.get((key, model, c))
            if m is None:
                why = results.skipped.get(key, "not measured")
                rows.append(
                    (
                        label,
                        str(c),
                        "-",
                        *(("-",) if spread else ()),
                        "-",
                        f"- ({why})" if c == results.concurrency[0] else "-",
                    )
                )
                continue
            rows.append(
                (
                    label,
                    str(c),
                    _num(m.throughput_per_s, 1),
                    *((_spread(m),) if spread else ()),
                    _num(m.latency_p50_ms, 3),
                    _num(m.latency_p99_ms, 3),
                )
            )
    return rows


def print_tables(results: Results, console: Console | None = None) -> None:
    console = console or Console()
    for model in results.models:
        table = Table(
            title=f"{model}: closed-loop load client (gRPC, batch 1), "
            f"median of {results.rounds_run} round(s)"
        )
        table.add_column("target", no_wrap=True)
        for column in ("c", "infer/s", "range", "p50 ms", "p99 ms"):
            table.add_column(column, justify="right", no_wrap=True)
        for row in _rows(results, results.loadgen, model, spread=True):
            table.add_row(*row)
        console.print(table)
        ratio_table = Table(title=f"{model}: tracked figures")
        for column in ("figure", "value", "target", ""):
            ratio_table.add_column(column)
        for r in ratios(results.loadgen, model, results.concurrency):
            style = {True: "green", False: "bold red", None: ""}[r.met]
            ratio_table.add_row(
                r.name, _ratio_value(r), r.target, f"[{style}]{_met(r)}[/]" if style else _met(r)
            )
        console.print(ratio_table)
        rows = cpu_rows(results, model)
        if rows:
            cpu_table = Table(title=f"{model}: CPU microseconds per inference")
            cpu_table.add_column("target", no_wrap=True)
            for column in CPU_HEADER[1:]:
                cpu_table.add_column(column, justify="right", no_wrap=True)
            for row in rows:
                cpu_table.add_row(*row)
            console.print(cpu_table)
        if any(k[1] == model for k in results.perf_analyzer):
            pa = Table(title=f"{model}: cross-check with Triton perf_analyzer")
            pa.add_column("target", no_wrap=True)
            for column in ("c", "infer/s", "p50 ms", "p99 ms"):
                pa.add_column(column, justify="right", no_wrap=True)
            for row in _rows(results, results.perf_analyzer, model):
                if row[2] != "-":
                    pa.add_row(*row)
            console.print(pa)


CPU_PROCESSES = ("client", "gateway", "worker", "kserve")


def cpu_rows(results: Results, model: str) -> list[tuple[str, ...]]:
    """CPU microseconds per call, by process, for every measured cell."""
    rows: list[tuple[str, ...]] = []
    for key, label in results.targets.items():
        for c in results.concurrency:
            m = results.loadgen.get((key, model, c))
            if m is None or not m.cpu_us_per_infer:
                continue
            cells = [m.cpu_us_per_infer.get(p, math.nan) for p in CPU_PROCESSES]
            servers = sum(
                v
                for p, v in zip(CPU_PROCESSES, cells, strict=True)
                if p != "client" and not math.isnan(v)
            )
            rows.append(
                (
                    label,
                    str(c),
                    *("-" if math.isnan(v) else f"{v:,.0f}" for v in cells),
                    f"{servers:,.0f}",
                )
            )
    return rows


CPU_HEADER = ("target", "c", "client", "gateway", "worker", "kserve", "servers total")


def model_markdown(results: Results, model: str) -> str:
    parts = [f"### {model}", ""]
    parts.append(
        markdown_table(
            (
                "target",
                "concurrency",
                "throughput (infer/s)",
                "throughput range over rounds",
                "p50 (ms)",
                "p99 (ms)",
            ),
            _rows(results, results.loadgen, model, spread=True),
            (False, True, True, True, True, True),
        )
    )
    parts += ["", "Tracked figures (load client above):", ""]
    parts.append(
        markdown_table(
            ("figure", "value", "target", "status"),
            [
                (r.name, _ratio_value(r), r.target, _met(r))
                for r in ratios(results.loadgen, model, results.concurrency)
            ],
            (False, True, False, False),
        )
    )
    rows = cpu_rows(results, model)
    if rows:
        parts += [
            "",
            "CPU time per inference (microseconds, user + system, all threads; "
            "median over rounds):",
            "",
        ]
        parts.append(markdown_table(CPU_HEADER, rows, (False, *([True] * 6))))
    return "\n".join(parts)


def perf_analyzer_sections(results: Results) -> list[str]:
    """Each model's perf_analyzer cross-check that has figures, in model order."""
    return [s for s in (perf_analyzer_markdown(results, m) for m in results.models) if s]


def perf_analyzer_markdown(results: Results, model: str) -> str:
    rows = [row for row in _rows(results, results.perf_analyzer, model) if row[2] != "-"]
    if not rows:
        return ""
    table = markdown_table(
        ("target", "concurrency", "throughput (infer/s)", "p50 (ms)", "p99 (ms)"),
        rows,
        (False, True, True, True, True),
    )
    figures = [
        r
        for r in ratios(results.perf_analyzer, model, results.concurrency)
        if not math.isnan(r.value)
    ]
    lines = [f"#### {model}", "", table]
    if figures:
        lines += ["", "; ".join(f"{r.name}: {_ratio_value(r)}" for r in figures) + "."]
    return "\n".join(lines)


VARIANTS_BEGIN = "<!-- variants: written by `python -m gateway.bench.variants` -->"
VARIANTS_END = "<!-- /variants -->"


def find_section(text: str, begin: str = VARIANTS_BEGIN, end: str = VARIANTS_END) -> str:
    """The marked section of `text`, markers included; empty when there is none."""
    start = text.find(begin)
    stop = text.find(end, start) if start >= 0 else -1
    return text[start : stop + len(end)] if start >= 0 and stop >= 0 else ""


def marked_sections(text: str) -> str:
    """Every marked section of `text` (`<!-- NAME: ... -->` to `<!-- /NAME -->`), in
    order: what other benchmark commands wrote, kept when the main one rewrites."""
    import re

    found = re.findall(r"<!-- (\w+): .*?-->.*?<!-- /\1 -->", text, flags=re.S)
    sections = []
    for name in found:
        begin = text.find(f"<!-- {name}: ")
        end_marker = f"<!-- /{name} -->"
        stop = text.find(end_marker, begin)
        sections.append(text[begin : stop + len(end_marker)])
    return "\n\n".join(sections)


def with_section(text: str, body: str, begin: str = VARIANTS_BEGIN, end: str = VARIANTS_END) -> str:
    """`text` with its marked section replaced by `body` where it stands (appended when
    missing), so the sections keep the order a reader finds them in."""
    new = f"{begin}\n{body.rstrip()}\n{end}"
    old = find_section(text, begin, end)
    if old:
        return text.replace(old, new, 1)
    return f"{text.rstrip()}\n\n{new}\n"


def write_section(
    path: Path, body: str, begin: str = VARIANTS_BEGIN, end: str = VARIANTS_END
) -> None:
    """Writes `body` as `path`'s marked section (a new BENCHMARKS.md when missing),
    leaving the rest of the file as it was."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    path.write_text(with_section(text, body, begin, end))


def publish(body: str, out: Path | None, begin: str, end: str) -> None:
    """Prints a benchmark's section and, with `out` (BENCHMARKS.md), writes it there
    between its markers."""
    print(body)
    if out is not None:
        write_section(out, body, begin, end)
