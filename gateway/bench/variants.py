"""The variant benchmark (`make bench`, second part): every demo model compiled
here (ONNX Runtime fp32, fp16, int8 dynamic and QDQ; TVM untuned and tuned for
this CPU), each variant measured one call at a time on one pinned core, and the
figures the variant compiler is held to, side by side from one run:

- the fastest servable variant against the best of ONNX Runtime fp32 and untuned TVM;
- int8 QDQ against fp32 on the conv nets, with its top-1 agreement;
- tuned TVM against ONNX Runtime fp32;
- a second compile of a tuned model against the first (tuning records reused).

Tuned TVM takes the demo models' committed tuning records (`backends/compile/tvm/tuning_records/`,
made by `python -m backends.compile.tvm.tuning`): the compile applies them without tuning, and the
first compile it is compared with is the tuning that made them, as their
`switchyard_tuning.json` records it. `--no-committed-records` tunes here instead, with
`--trials` trials, and compiles twice.

Each variant is loaded as a worker loads it (the profiler's measuring process, through
`backends.runtimes.loader`): its artifacts checked against its manifest, a refused
variant logged and left out.

Writes its section of BENCHMARKS.md (between markers) and leaves the rest.

Imports the compiler and the profiler (backends.compile): no grpc, no protobuf.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from backends.compile.compiler import ORT_TARGET, compile_model
from backends.compile.profiler import HardwareClass, measure_in_process
from backends.compile.rewrites import prepared_source
from backends.compile.tvm.targets import best_cpu_target, host_cpu_flags
from backends.compile.tvm.tuning import TuningInfo, read_info, records_for
from backends.repository import ModelRepository
from gateway.bench.report import write_section
from gateway.report.markdown import markdown_table

ROOT = Path(__file__).resolve().parents[2]
CONV_NETS = ("cnn", "resnet", "mobilenet")
HARDWARE = HardwareClass("bench-1c", threads=1)
FASTEST = "fastest servable >= best of ORT fp32 and untuned TVM"
QDQ = "int8 QDQ >= 2x ORT fp32 on the conv nets, top-1 >= 99%"
TUNED = "tuned TVM within 1.5x of ORT fp32"
SECOND = "second compile under 0.1 of the first"
TARGETS = (FASTEST, QDQ, TUNED, SECOND)
SUMMARY_COLUMNS = (
    "model",
    "fastest servable",
    "vs best of ORT fp32 / untuned TVM",
    "int8 QDQ vs fp32 (top-1)",
    "ORT fp32 p50 ms",
    "tuned TVM p50 ms",
    "tuned TVM vs ORT fp32",
    "trials",
    "2nd compile / 1st",
)
"""The variant compiler's targets, as the summary's Targets table states them."""
DEFAULT_TRIALS = 64
"""Trials for a model without committed records, or with `--no-committed-records`."""


@dataclass(frozen=True, slots=True)
class Row:
    variant: str
    p50_ms: float
    throughput_per_s: float
    passed: bool
    top1: float | None
    max_abs_diff: float | None
    untuned: bool


def measure_all(repository: ModelRepository, model: str, runs: int) -> list[Row]:
    rows = []
    for variant in repository.variants(model):
        if variant.manifest.device != "cpu":
            continue
        tuning = variant.manifest.tuning
        untuned = tuning is not None and not tuning.tuned
        # Untuned TVM can be 100x slower: batch 1 and a few runs say enough about it.
        entries = measure_in_process(
            variant, HARDWARE, (1,) if untuned else (1, 16), min(runs, 10) if untuned else runs
        )
        single = next(e for e in entries if e.batch_size == 1)
        accuracy = variant.manifest.accuracy
        rows.append(
            Row(
                variant=variant.name,
                p50_ms=single.p50_ms,
                throughput_per_s=max(e.throughput_per_s for e in entries),
                passed=accuracy is None or accuracy.passed,
                top1=accuracy.top1_agreement if accuracy else None,
                max_abs_diff=accuracy.max_abs_diff if accuracy else None,
                untuned=untuned,
            )
        )
    return sorted(rows, key=lambda r: r.p50_ms)


def _prepare(source_repo: Path, work: Path, model: str) -> ModelRepository:
    target = work / model
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shutil.copyfile(source_repo / model / "model.onnx", target / "model.onnx")
    shutil.copytree(source_repo / model / "samples", target / "samples")
    return ModelRepository(work)


def _compile_tuned(
    repository: ModelRepository, model: str, trials: int, records: Path | None
) -> float:
    """Compiles tuned TVM for this CPU; returns the wall time."""
    start = time.perf_counter()
    compile_model(
        repository.source(model),
        model,
        repository,
        targets=["tvm-host"],
        trials=trials,
        tuning_records=records,
    )
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    console = Console()
    work = args.work.resolve()
    target = best_cpu_target(host_cpu_flags()).name
    committed = not args.no_committed_records
    command = "python -m gateway.bench.variants" + (
        f" --no-committed-records --trials {args.trials}" if not committed else ""
    )
    lines = [
        "## Variants",
        "",
        f"- Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; command: `make bench` "
        f"(`{command}`).",
        f"- Each variant measured alone in a process pinned to one core with one runtime "
        f"thread ({args.runs} timed calls per batch size, batch 1 and 16); p50 at batch 1, "
        "throughput the better of the two. Accuracy: against the fp32 source on the 32 "
        "sample inputs (the compile-time check). TVM: this CPU's best target "
        f"(`tvm-host`: {target}), untuned and tuned with MetaSchedule "
        + (
            "(the committed records of `backends/compile/tvm/tuning_records/`, applied "
            "without tuning; "
            "trials per model in the summary). "
            "2nd compile / 1st: the compile here, which applies the committed records, "
            "against the tuning that made them (from their `switchyard_tuning.json`)."
            if committed
            else f"({args.trials} trials, tuned here)."
        ),
        "",
    ]
    summary: list[tuple[str, ...]] = []
    verdicts: dict[str, list[tuple[str, bool]]] = {name: [] for name in TARGETS}
    for model in args.models:
        repository = _prepare(args.repository, work, model)
        console.log(f"{model}: compiling")
        compile_model(
            repository.source(model), model, repository, targets=[ORT_TARGET, "tvm-host"], trials=0
        )
        first_s = second_s = None
        records = records_for(model) if committed else None
        info: TuningInfo | None = read_info(records / target) if records else None
        trials = info.trials if info is not None else args.trials
        if info is not None:
            first_s = info.tuning_s
            second_s = _compile_tuned(repository, model, trials, records)
        elif trials > 0:
            first_s = _compile_tuned(repository, model, trials, records)
            second_s = _compile_tuned(repository, model, trials, records)
        console.log(f"{model}: measuring")
        rows = measure_all(repository, model, args.runs)
        by_name = {r.variant: r for r in rows}
        _, rewrites = prepared_source(repository.source(model))
        lines += [f"### {model}", ""]
        if rewrites:
            lines += [
                f"Every variant built from the rewritten graph ({', '.join(rewrites)}; "
                "`backends/compile/rewrites.py`).",
                "",
            ]
        measured = []
        for r in rows:
            status = "passed" if r.passed else "rejected"
            diff = f" (max diff {r.max_abs_diff:.2g})" if r.max_abs_diff is not None else ""
            measured.append(
                (
                    r.variant + (" (untuned: never preferred)" if r.untuned else ""),
                    f"{r.p50_ms:.3f}",
                    f"{r.throughput_per_s:,.0f}",
                    f"{status}{diff}",
                    f"{r.top1:.1%}" if r.top1 is not None else "-",
                )
            )
        lines += [
            markdown_table(
                ("variant", "p50 ms (batch 1)", "infer/s", "accuracy", "top-1"),
                measured,
                (False, True, True, False, True),
            ),
            "",
        ]
        servable = [r for r in rows if r.passed and not r.untuned]
        fastest = min(servable, key=lambda r: r.p50_ms)
        baselines = [r for r in rows if r.variant == "ort-cpu-fp32" or r.untuned]
        best_base = min(baselines, key=lambda r: r.p50_ms)
        fp32 = by_name["ort-cpu-fp32"]
        qdq = by_name.get("ort-cpu-int8-qdq")
        qdq_text = "-"
        speedup = best_base.p50_ms / fastest.p50_ms
        verdicts[FASTEST].append((f"{model} {speedup:.2f}x", speedup >= 1.0))
        if qdq is not None and model in CONV_NETS:
            qdq_text = f"{fp32.p50_ms / qdq.p50_ms:.2f}x"
            if qdq.top1 is not None:
                qdq_text += f" ({qdq.top1:.0%})"
            verdicts[QDQ].append(
                (
                    f"{model} {qdq_text}",
                    fp32.p50_ms / qdq.p50_ms >= 2.0 and qdq.passed and (qdq.top1 or 0) >= 0.99,
                )
            )
        tuned = next((r for r in rows if r.variant.startswith("tvm-") and not r.untuned), None)
        tuned_ms = "-"
        if tuned is not None:
            ratio = tuned.p50_ms / fp32.p50_ms
            tuned_text = f"{ratio:.2f}x slower" if ratio > 1 else f"{1 / ratio:.2f}x faster"
            tuned_ms = f"{tuned.p50_ms:.3f}"
            verdicts[TUNED].append((f"{model} {tuned_text}", ratio <= 1.5))
        elif any(r.variant.startswith("tvm-") for r in rows):
            tuned_text = "not tuned in this run"
        else:
            tuned_text = "TVM cannot import it"
        compile_text = (
            f"{second_s / first_s:.3f} ({second_s:.1f} s / {first_s:.0f} s)"
            if first_s and second_s and tuned
            else "-"
        )
        if first_s and second_s and tuned:
            verdicts[SECOND].append((f"{model} {second_s / first_s:.3f}", second_s < 0.1 * first_s))
        trials_text = f"{trials:,}" if tuned is not None else "-"
        summary.append(
            (
                model,
                fastest.variant,
                f"{best_base.p50_ms / fastest.p50_ms:.2f}x",
                qdq_text,
                f"{fp32.p50_ms:.3f}",
                tuned_ms,
                tuned_text,
                trials_text,
                compile_text,
            )
        )
    lines += [
        "### Summary",
        "",
        markdown_table(SUMMARY_COLUMNS, summary, (False, False, *[True] * 7)),
        "",
        "### Targets",
        "",
        markdown_table(
            ("target", "status", "per model"),
            [_target_row(name, verdicts[name]) for name in TARGETS],
            (False, False, False),
        ),
        "",
    ]
    write_section(args.out, "\n".join(lines))
    console.log(f"wrote the variants section of {args.out}")
    return 0


def _target_row(name: str, verdicts: list[tuple[str, bool]]) -> tuple[str, str, str]:
    """(target, met / NOT met (which models), each model's figure)."""
    if not verdicts:
        return name, "not measured in this run", "-"
    missed = [text.split(" ", 1)[0] for text, ok in verdicts if not ok]
    status = "met" if not missed else f"NOT met: {', '.join(missed)}"
    return name, status, "; ".join(text for text, _ in verdicts)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, default=ROOT / "models")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--work", type=Path, default=ROOT / ".bench" / "variants")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["cnn", "resnet", "mobilenet", "transformer", "magika", "digits"],
    )
    parser.add_argument(
        "--trials",
        type=int,
        default=DEFAULT_TRIALS,
        help="MetaSchedule trials for tuned TVM where no committed records are used",
    )
    parser.add_argument(
        "--no-committed-records",
        action="store_true",
        help="tune here (twice: the second compile reuses the first's records) instead of "
        "applying the records committed in backends/compile/tvm/tuning_records/",
    )
    parser.add_argument("--runs", type=int, default=50)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
