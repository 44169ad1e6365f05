"""`switchyard profile` and `switchyard report`: what each variant costs on each
hardware class of the fleet, measured here and priced at the fleet's prices.

`profile` measures every servable variant on every hardware class the fleet
launches (threads and emulated delay as the class's worker runs them) and stores
the figures next to each variant. `report` turns them into the shop-around view:
per model, a table of variant x hardware class with p50, p99, throughput, cost
and carbon per million inferences, and the cheapest route under each SLA
threshold; as Markdown and as a PNG chart.

Imports no grpc and no generated protobuf; matplotlib only when the chart is drawn.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from backends.compile.cpu import cpu_flags
from backends.compile.profiler import DEFAULT_BATCH_SIZES, HardwareClass, measure_in_process, record
from backends.profiles import ProfileEntry, read_profile
from backends.repository import ModelRepository, Variant
from backends.worker.served import WorkerSettings, servable
from gateway.config import BackendSettings, ConfigError, FleetConfig, load_fleet
from gateway.report.markdown import markdown_table

if TYPE_CHECKING:
    from rich.console import Console

DEFAULT_SLA_MS = (2.0, 10.0, 100.0)


@dataclass(frozen=True, slots=True)
class Offer:
    """One row of the shop-around table: a variant on a hardware class, priced."""

    model: str
    variant: str
    hardware_class: str
    p50_ms: float
    p99_ms: float
    throughput_per_s: float
    """Best throughput over the measured batch sizes."""
    cost_usd_per_1m: float
    co2_g_per_1m: float | None
    untuned: bool
    entries: tuple[ProfileEntry, ...]

    def cost_within(self, sla_ms: float, price_usd_per_hour: float) -> float | None:
        """Cost per 1M when batches are only as large as the SLA allows; None: infeasible."""
        rates = [e.throughput_per_s for e in self.entries if e.p99_ms <= sla_ms]
        if not rates:
            return None
        return cost_per_1m(price_usd_per_hour, max(rates))


def cost_per_1m(price_usd_per_hour: float, throughput_per_s: float) -> float:
    return (
        price_usd_per_hour / 3600.0 / throughput_per_s * 1e6 if throughput_per_s > 0 else math.inf
    )


def co2_per_1m(backend: BackendSettings, throughput_per_s: float) -> float | None:
    if backend.power_w is None or backend.carbon_g_per_kwh is None or throughput_per_s <= 0:
        return None
    kwh = backend.power_w * (1e6 / throughput_per_s) / 3600.0 / 1000.0
    return kwh * backend.carbon_g_per_kwh


def hardware_classes(config: FleetConfig) -> dict[str, tuple[HardwareClass, BackendSettings]]:
    """The fleet's launched hardware classes, each with its cheapest backend."""
    found: dict[str, tuple[HardwareClass, BackendSettings]] = {}
    for backend in sorted(config.backends, key=lambda b: b.price_usd_per_hour):
        if backend.launch is None or backend.hardware_class in found:
            continue
        found[backend.hardware_class] = (
            HardwareClass(
                backend.hardware_class, backend.launch.threads, backend.launch.emulate_latency_ms
            ),
            backend,
        )
    return found


def servable_variants(repository: ModelRepository, model: str) -> list[Variant]:
    settings = WorkerSettings(repository=repository.root)
    flags = cpu_flags()
    return [v for v in repository.variants(model) if servable(v, settings, flags) is None]


def offers(repository: ModelRepository, model: str, config: FleetConfig) -> list[Offer]:
    classes = hardware_classes(config)
    rows = []
    # Only what a worker here would serve: a stale profile of a variant that has
    # since failed its accuracy check is not an offer.
    for variant in servable_variants(repository, model):
        profile = read_profile(variant)
        if profile is None:
            continue
        for name, (_, backend) in classes.items():
            entries = tuple(e for e in profile.entries if e.hardware_class == name)
            single = [e for e in entries if e.batch_size == 1]
            if not single:
                continue
            best = max(e.throughput_per_s for e in entries)
            tuning = variant.manifest.tuning
            rows.append(
                Offer(
                    model=model,
                    variant=variant.name,
                    hardware_class=name,
                    p50_ms=single[0].p50_ms,
                    p99_ms=single[0].p99_ms,
                    throughput_per_s=best,
                    cost_usd_per_1m=cost_per_1m(backend.price_usd_per_hour, best),
                    co2_g_per_1m=co2_per_1m(backend, best),
                    untuned=tuning is not None and not tuning.tuned,
                    entries=entries,
                )
            )
    return sorted(rows, key=lambda o: o.cost_usd_per_1m)


def cheapest_under(
    rows: Sequence[Offer], sla_ms: float, prices: dict[str, float]
) -> tuple[Offer, float] | None:
    """The cheapest (variant, hardware class) whose p99 meets `sla_ms`, and its cost."""
    best: tuple[Offer, float] | None = None
    for offer in rows:
        if offer.untuned:
            continue
        cost = offer.cost_within(sla_ms, prices[offer.hardware_class])
        if cost is not None and (best is None or cost < best[1]):
            best = (offer, cost)
    return best


def markdown(
    model: str, rows: Sequence[Offer], sla_ms: Sequence[float], prices: dict[str, float]
) -> str:
    offered = [
        (
            o.variant + (" (untuned)" if o.untuned else ""),
            o.hardware_class,
            f"{o.p50_ms:.3f}",
            f"{o.p99_ms:.3f}",
            f"{o.throughput_per_s:,.0f}",
            f"{o.cost_usd_per_1m:.4f}",
            f"{o.co2_g_per_1m:.1f}" if o.co2_g_per_1m is not None else "-",
        )
        for o in rows
    ]
    cheapest = []
    for sla in sla_ms:
        best = cheapest_under(rows, sla, prices)
        if best is None:
            cheapest.append((f"<= {sla:g} ms", "none meets it", "-"))
        else:
            route = f"{best[0].variant} on {best[0].hardware_class}"
            cheapest.append((f"<= {sla:g} ms", route, f"{best[1]:.4f}"))
    columns = ("variant", "hardware class", "p50 ms", "p99 ms", "throughput /s", "USD per 1M")
    lines = [
        f"### {model}",
        "",
        markdown_table(
            (*columns, "gCO2 per 1M"), offered, (False, False, True, True, True, True, True)
        ),
        "",
        markdown_table(
            ("SLA (p99)", "cheapest route", "USD per 1M"), cheapest, (False, False, True)
        ),
    ]
    return "\n".join(lines) + "\n"


def chart(model: str, rows: Sequence[Offer], sla_ms: Sequence[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    classes = sorted({o.hardware_class for o in rows})
    markers = "os^Dv<>ph"
    for index, hardware in enumerate(classes):
        mine = [o for o in rows if o.hardware_class == hardware]
        ax.scatter(
            [o.p99_ms for o in mine],
            [o.cost_usd_per_1m for o in mine],
            marker=markers[index % len(markers)],
            s=60,
            label=hardware,
        )
        for o in mine:
            ax.annotate(
                o.variant,
                (o.p99_ms, o.cost_usd_per_1m),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
            )
    for sla in sla_ms:
        ax.axvline(sla, color="grey", linestyle="--", linewidth=0.8)
        ax.text(sla, ax.get_ylim()[1], f" SLA {sla:g} ms", fontsize=7, va="top", color="grey")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("p99 latency at batch 1 (ms)")
    ax.set_ylabel("USD per 1M inferences (best batch)")
    ax.set_title(f"{model}: what each variant costs on each hardware class")
    ax.legend(title="hardware class", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _config(args: argparse.Namespace, console: Console) -> FleetConfig | None:
    """The fleet (`--config`, its repository overridden by `--repository`); None, with
    the reason printed, when it does not load."""
    try:
        config = load_fleet(args.config)
    except ConfigError as exc:
        console.print(f"[red]{exc}[/red]")
        return None
    if args.repository is not None:
        config = config.model_copy(update={"repository": args.repository})
    return config


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=None, help="fleet file (default: demo fleet)"
    )
    parser.add_argument("--repository", type=Path, default=None, help="override the fleet's")
    parser.add_argument("--models", nargs="*", default=[], help="default: every model")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES))
    parser.add_argument("--runs", type=int, default=50, help="timed calls per batch size")


def run_profile(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    console = Console()
    config = _config(args, console)
    if config is None:
        return 2
    repository = ModelRepository(config.repository)
    classes = hardware_classes(config)
    if not classes:
        console.print("[red]the fleet launches no backends: nothing to measure on[/red]")
        return 2
    models = args.models or repository.models()
    work = [
        (v, hc)
        for m in models
        for v in servable_variants(repository, m)
        for hc, _ in classes.values()
    ]
    failures = 0
    with Progress(console=console) as progress:
        task = progress.add_task("profiling", total=len(work))
        measured: dict[Path, list[ProfileEntry]] = {}
        for variant, hardware in work:
            progress.update(task, description=f"{variant.model}/{variant.name} on {hardware.name}")
            try:
                entries = measure_in_process(variant, hardware, args.batch_sizes, args.runs)
            except (RuntimeError, ValueError) as exc:
                console.print(
                    f"[red]{variant.model}/{variant.name} on {hardware.name}: {exc}[/red]"
                )
                failures += 1
            else:
                measured.setdefault(variant.directory, []).extend(entries)
                record(variant, measured[variant.directory])
            progress.advance(task)
    console.print(f"profiled {len(work) - failures} of {len(work)} (variant, hardware class) pairs")
    return 1 if failures else 0


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=None, help="fleet file (default: demo fleet)"
    )
    parser.add_argument("--repository", type=Path, default=None, help="override the fleet's")
    parser.add_argument("--models", nargs="*", default=[], help="default: every profiled model")
    parser.add_argument(
        "--out", type=Path, default=Path("report"), help="folder for report.md and charts"
    )
    parser.add_argument("--sla-ms", type=float, nargs="+", default=list(DEFAULT_SLA_MS))


def run_report(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    config = _config(args, console)
    if config is None:
        return 2
    repository = ModelRepository(config.repository)
    prices = {
        name: backend.price_usd_per_hour for name, (_, backend) in hardware_classes(config).items()
    }
    args.out.mkdir(parents=True, exist_ok=True)
    sections = [
        "# Shop-around report",
        "",
        "Measured by `switchyard profile`, priced at the fleet's prices; "
        "cost per 1M inferences at each route's best measured batch size.",
        "",
    ]
    for model in args.models or repository.models():
        rows = offers(repository, model, config)
        if not rows:
            continue
        sections.append(markdown(model, rows, args.sla_ms, prices))
        chart(model, rows, args.sla_ms, args.out / f"{model}.png")
        sections.append(f"![{model}]({model}.png)\n")
        table = Table(title=f"{model}")
        for column in ("variant", "hardware class", "p50 ms", "p99 ms", "infer/s", "USD/1M"):
            table.add_column(column)
        for o in rows:
            table.add_row(
                o.variant + (" (untuned)" if o.untuned else ""),
                o.hardware_class,
                f"{o.p50_ms:.3f}",
                f"{o.p99_ms:.3f}",
                f"{o.throughput_per_s:,.0f}",
                f"{o.cost_usd_per_1m:.4f}",
            )
        console.print(table)
    (args.out / "report.md").write_text("\n".join(sections))
    console.print(f"wrote {args.out / 'report.md'}")
    return 0
