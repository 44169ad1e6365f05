"""`make bench`: the gateway against the backend worker it fronts and against KServe
0.21's ModelServer, in one run, on this machine.

    python -m gateway.bench --repository models --out BENCHMARKS.md

Three targets, one after the other, each alone on the machine while measured:
1. backend direct: one `backends.worker.server` (2 ONNX Runtime threads);
2. gateway: `switchyard serve` with a one-backend fleet of that same worker;
3. KServe 0.21: its ModelServer with a custom ONNX Runtime model (2 threads) on the
   same model file, in its own virtualenv (`.bench/peers-venv`, made when missing).
One closed-loop load client (`gateway.bench.loadgen`) drives all three at each
concurrency; Triton's perf_analyzer, which cannot drive KServe (no ModelConfig RPC),
cross-checks the first two. Prints rich tables and writes a Markdown report.

Imports neither the project's `protos` nor tritonclient (their protobuf packages share a
name): the load client and KServe run in processes of their own.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from rich.console import Console

from gateway.bench import harness, report
from gateway.bench.harness import BenchError, Child, serve_command
from gateway.bench.report import (
    BARE_PROXY,
    DIRECT,
    GATEWAY,
    GATEWAY_UNARY,
    KSERVE,
    Measurement,
    Results,
)
from gateway.config import BackendSettings, LaunchSettings
from gateway.control.supervisor import worker_command

ROOT = Path(__file__).resolve().parents[2]
TARGET_LABELS = {
    DIRECT: "backend direct",
    BARE_PROXY: "bare proxy -> backend",
    GATEWAY: "gateway -> backend",
    GATEWAY_UNARY: "gateway -> backend, unary calls",
    KSERVE: "KServe 0.21",
}
STARTUP_TIMEOUT_S = 90.0


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    model_file: Path
    inputs: list[str]
    """NAME:DATATYPE:SHAPE for the load client."""
    samples: Path


def model_spec(repository: Path, name: str, variant: str) -> ModelSpec:
    repository = repository.resolve()
    variant_dir = repository / name / "variants" / variant
    try:
        manifest = json.loads((variant_dir / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"no usable manifest for {name} variant {variant}: {exc}") from exc
    inputs = [
        f"{i['name']}:{i['datatype']}:{','.join(str(d) for d in i['shape'])}"
        for i in manifest["inputs"]
    ]
    return ModelSpec(
        name, variant_dir / "model.onnx", inputs, repository / name / "samples" / "inputs.npz"
    )


def fleet_yaml(repository: Path, threads: int, streams: bool = True) -> str:
    """A one-backend fleet; `streams` False: `backend_streams: 0` (unary calls)."""
    return (
        f"repository: {json.dumps(str(repository))}\n"
        "gateway: {listen: 127.0.0.1:0, metrics: 127.0.0.1:0, http: 127.0.0.1:0,\n"
        f"  admin: 127.0.0.1:0{'' if streams else ', backend_streams: 0'}}}\n"
        "backends:\n"
        "  - name: cpu\n"
        "    address: 127.0.0.1:0\n"
        "    hardware_class: cpu-x86-64-v4-2c\n"
        "    price_usd_per_hour: 0.08\n"
        f"    launch: {{threads: {threads}}}\n"
    )


@contextlib.contextmanager
def start_target(
    key: str,
    round_number: int,
    args: argparse.Namespace,
    specs: list[ModelSpec],
    work: Path,
    peers_python: Path | None,
) -> Iterator[tuple[str, dict[str, int]]]:
    """Starts one target; yields the address to send requests to and the pids of its
    server processes; stops it after."""
    repository = args.repository.resolve()
    work = work / f"round{round_number}"
    work.mkdir(exist_ok=True)
    if key in (DIRECT, BARE_PROXY):
        # The worker as the gateway launches it (its defaults: no emulated delay, the
        # variant's own batching), on a hardware class of no profile.
        backend = BackendSettings(
            name="cpu", address="127.0.0.1:0", launch=LaunchSettings(threads=args.threads)
        )
        command = worker_command(backend, repository, "127.0.0.1:0")
        with Child("backend", command, work, ROOT) as worker:
            backend_address = worker.wait_listening(STARTUP_TIMEOUT_S)
            if key == DIRECT:
                yield backend_address, {"worker": worker.process.pid}
                return
            # The same worker behind the floor of a Python hop; its CPU goes in the
            # gateway's column, as the process on the way.
            proxy = [sys.executable, "-m", "gateway.bench.bare_proxy", "--backend", backend_address]
            with Child("bare-proxy", proxy, work, ROOT) as proxy_child:
                yield (
                    proxy_child.wait_listening(STARTUP_TIMEOUT_S),
                    {"gateway": proxy_child.process.pid, "worker": worker.process.pid},
                )
    elif key in (GATEWAY, GATEWAY_UNARY):
        fleet = work / f"fleet-{key}.yaml"
        fleet.write_text(fleet_yaml(repository, args.threads, streams=key == GATEWAY))
        ready = work / "ready.json"
        ready.unlink(missing_ok=True)
        with Child("gateway", serve_command(fleet, ready), work, ROOT) as child:
            description = child.wait_ready_file(ready, STARTUP_TIMEOUT_S)
            pids = {"gateway": child.process.pid}
            worker_pid = description.get("pids", {}).get("cpu")  # the fleet's one backend
            if worker_pid is not None:
                pids["worker"] = int(worker_pid)
            yield str(description["address"]), pids
    elif key == KSERVE:
        assert peers_python is not None
        command = [
            str(peers_python),
            "-I",
            str(Path(__file__).with_name("kserve_peer.py")),
            "--threads",
            str(args.threads),
            "--kserve-logging",
            args.kserve_logging,
        ]
        for spec in specs:
            # KServe loads by path: it gets a copy of the bytes checked against the manifest.
            model_file = harness.verified_variant_copy(
                repository, spec.name, args.variant, work / "kserve-models"
            )
            command += ["--model", f"{spec.name}={model_file}"]
        with Child("kserve", command, work, work) as child:
            yield child.wait_listening(STARTUP_TIMEOUT_S), {"kserve": child.process.pid}
    else:
        raise BenchError(f"unknown target {key}")


def run_loadgen(
    args: argparse.Namespace,
    address: str,
    pids: dict[str, int],
    spec: ModelSpec,
    log_dir: Path,
    name: str,
) -> list[Measurement]:
    """The load client (its own process, `name`'s files in `log_dir`) on one target."""
    command = [
        sys.executable,
        "-m",
        "gateway.bench.loadgen",
        "--target",
        address,
        "--model",
        spec.name,
        "--samples",
        str(spec.samples),
        "--warmup-s",
        str(args.warmup_s),
        "--window-s",
        str(args.window_s),
        "--concurrency",
        *map(str, args.concurrency),
    ]
    for text in spec.inputs:
        command += ["--input", text]
    for process, pid in pids.items():
        command += ["--cpu-pid", f"{process}={pid}"]
    timeout_s = 60 + len(args.concurrency) * (args.warmup_s + args.window_s + 10)
    with Child(name, command, log_dir, ROOT) as child:
        status, _ = child.wait(timeout_s)
    if status != 0:
        raise BenchError(f"load client failed on {spec.name} at {address}: {child.stderr_tail()}")
    lines = child.stdout_path.read_text(errors="replace").splitlines()
    levels = [json.loads(line) for line in lines if line.startswith("{")]
    out = []
    for level in levels:
        if level["errors"]:
            raise BenchError(
                f"{level['errors']} errors on {spec.name} at {address} "
                f"(c={level['concurrency']}): {level['first_error']}"
            )
        out.append(
            Measurement(
                level["throughput_per_s"],
                level["latency_p50_ms"],
                level["latency_p99_ms"],
                level["requests"],
                level["errors"],
                cpu_us_per_infer=level["cpu_us_per_infer"],
            )
        )
    return out


def machine_note() -> str:
    cores = len(os.sched_getaffinity(0))
    model, avx512 = "unknown CPU", False
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            if key.strip() == "flags":
                avx512 = "avx512f" in value.split()
    isa = "x86-64 with AVX-512" if avx512 else platform.machine()
    return (
        f"{cores} CPU cores ({model}, {isa}), Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def section_markdown(
    results: Results,
    args: argparse.Namespace,
    started: dt.datetime,
    elapsed_s: float,
    notes: list[str],
    argv: str,
) -> str:
    """The run as one section of BENCHMARKS.md (`--section`), beside the main one whose
    setup it shares: the same targets, load client and rounds, on other models."""
    lines = [
        f"## The gateway's hop: {', '.join(args.models)}",
        "",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')} (run took {elapsed_s:.0f} s)",
        f"- Command: `{argv}`",
        f'- The same targets, load client and rounds as "Results" above, each server '
        f"with {args.threads} ONNX Runtime thread(s), on models of `{args.repository}` "
        "(`python -m backends.demo --repository "
        f"{args.repository} {' '.join(args.models)}` builds them): `tinyconv`, a conv net of "
        "fixed batch 1 (about 6 MFLOP, nothing for the gateway to merge), and `midconv`, "
        "about 0.37 GFLOP a row with any batch. KServe serves "
        f"`{args.variant}`; the worker serves the variant it measured fastest at start, "
        "and at one thread runs a variant that merges no rows (`tinyconv`) on its event "
        "loop, as KServe runs its model (`--inline-below-us`, on by default there).",
        "",
    ]
    for model in results.models:
        lines += [report.model_markdown(results, model).replace("### ", "#### ", 1), ""]
    pa_sections = report.perf_analyzer_sections(results)
    if pa_sections:
        lines += ["Cross-check with Triton perf_analyzer (round 1):", ""]
        for section in pa_sections:
            lines += [section.replace("#### ", "##### ", 1), ""]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines).rstrip() + "\n"


def write_markdown(
    path: Path,
    results: Results,
    args: argparse.Namespace,
    started: dt.datetime,
    elapsed_s: float,
    notes: list[str],
    kserve_versions: str,
) -> None:
    argv = shlex.join(["python", "-m", "gateway.bench", *sys.argv[1:]])
    low, high = min(args.concurrency), max(args.concurrency)
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench`, which runs each section's command in turn; each section "
        "names its command and when it ran, and the figures within a section come from that "
        "one run, side by side on the same machine. Run `make bench` again to refresh all of "
        "it, or a section's command to refresh that section.",
        "",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')} (run took {elapsed_s:.0f} s)",
        f"- Machine: {machine_note()}. The load client, the gateway, the backend worker and "
        "KServe all share these cores: the client's own CPU time is taken from the servers, "
        "and through the gateway two server processes (gateway and worker) share them per "
        "request.",
        (
            f"- Command: `make bench` (runs `{argv}`)"
            if os.environ.get("MAKELEVEL")
            else f"- Command: `{argv}` (`make bench` runs it with `--repository models "
            "--out BENCHMARKS.md`)"
        ),
        f"- Software: ONNX Runtime {version('onnxruntime')} and grpcio {version('grpcio')} "
        f"(Switchyard); {kserve_versions} (KServe's own virtualenv, `.bench/peers-venv`).",
        "",
        "## What is measured",
        "",
        f"Each model is served by the targets below, each with {args.threads} ONNX Runtime "
        f"intra-op thread(s). KServe serves `{args.repository}/MODEL/variants/"
        f"{args.variant}/model.onnx`; the Switchyard worker serves its model as users get "
        "it: the variant it measured fastest when it started, among those that passed their "
        "accuracy gate (the `switchyard_variant` of its answers says which):",
        "",
        "1. **backend direct**: one Switchyard backend worker (`python -m backends.worker "
        f"--threads {args.threads}`), requests sent straight to it;",
        "2. **bare proxy -> backend**: the same worker behind `gateway/bench/bare_proxy.py`, "
        "a grpc.aio proxy that forwards each call's bytes over two long-lived streams as the "
        "gateway does, and does nothing else (no routing, deadlines, retries, load reports, "
        "metrics): what a Python hop costs at all, so that the gateway against it is what "
        "the gateway's own work costs (its CPU is in the gateway column; plain TCP to the "
        "worker, where the gateway's launched worker is over mTLS);",
        "3. **gateway -> backend**: `switchyard serve` with a one-backend fleet "
        "(the same worker, launched by the gateway, over mTLS as launched workers are); "
        "requests go through the gateway, which forwards them over its long-lived "
        "streams to the worker (`backend_streams`, default 2);",
        "4. **gateway -> backend, unary calls**: the same with `backend_streams: 0`, one "
        "unary call to the worker per request, side by side;",
        "5. **KServe 0.21**: KServe's `ModelServer` with a custom `kserve.Model` whose "
        "`predict` runs ONNX Runtime on the v2 `InferRequest` (`gateway/bench/kserve_peer.py`), "
        f"gRPC only, bound to 127.0.0.1; KServe logging: {args.kserve_logging}.",
        "",
        f"The run makes {results.rounds_run} round(s); in each, the targets are started one "
        "after the other, each alone on the machine (with the load client) while measured, "
        "and stopped before the next starts. Each cell is the median over the rounds of that "
        "figure; the range shows how much throughput moved between rounds.",
        "",
        "Load: `gateway/bench/loadgen.py`, a closed-loop client in its own process (Python, "
        "grpc.aio, one channel): at concurrency N it keeps N `ModelInfer` calls in flight, "
        "sending the next as soon as one answers, batch 1 (the first row of the model's "
        "sample inputs, as `raw_input_contents`), the request serialized once, answers not "
        f"decoded. {args.warmup_s:g} s of warm-up, then a {args.window_s:g} s window, at each "
        "concurrency: throughput is the calls answered in the window over its length, "
        "latencies are send-to-answer times of those calls (nearest-rank percentiles). The "
        "same client drives all the targets, because Triton's perf_analyzer cannot drive "
        "KServe (see notes); perf_analyzer cross-checks the others below.",
        "",
        "## Results",
        "",
    ]
    for model in results.models:
        lines += [report.model_markdown(results, model), ""]
    pa_sections = report.perf_analyzer_sections(results)
    if pa_sections:
        lines += [
            "## Cross-check with Triton perf_analyzer",
            "",
            "perf_analyzer 2.60 (C++, `-i grpc --concurrency-range N:N --measurement-interval "
            f"{args.pa_interval_ms} --stability-percentage 50 --max-trials 10`), in round 1, "
            "on the same targets right after the load client (one measurement, no rounds). It "
            "spends less CPU per call than the Python client; where the two disagree, the "
            "client's own share of the 2 cores is part of the difference.",
            "",
        ]
        for section in pa_sections:
            lines += [section, ""]
    lines += ["## Notes", ""]
    lines += [f"- {note}" for note in notes]
    lines += [
        f"- Tracked figures: gateway throughput at c={high} over KServe's (target >= "
        f"{report.GATEWAY_VS_KSERVE_TARGET}); gateway throughput at c={high} over backend "
        f"direct; gateway p50 minus backend-direct p50 at c={low} (target <= "
        f"{report.OVERHEAD_P50_TARGET_MS:g} ms).",
        "",
    ]
    # The variants section comes from another run: keep it.
    kept = report.marked_sections(path.read_text()) if path.exists() else ""
    path.write_text("\n".join(lines) + (f"\n{kept}\n" if kept else ""))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path("models"),
        help="model repository (make models builds the demo one)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("BENCHMARKS.md"), help="the Markdown report to write"
    )
    parser.add_argument("--models", nargs="+", default=["digits", "cnn"])
    parser.add_argument(
        "--variant", default="ort-cpu-fp32", help="the variant whose model.onnx KServe serves"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per server")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds over all targets; each cell reports the median",
    )
    parser.add_argument(
        "--warmup-s", type=float, default=1.0, help="load before each measurement window"
    )
    parser.add_argument("--window-s", type=float, default=3.5, help="measurement window")
    parser.add_argument(
        "--targets", nargs="+", choices=list(TARGET_LABELS), default=list(TARGET_LABELS)
    )
    parser.add_argument(
        "--kserve-logging",
        choices=("quiet", "default"),
        default="quiet",
        help="quiet: KServe warnings only; default: its INFO line per gRPC "
        "call and per-request latency log, as shipped",
    )
    parser.add_argument(
        "--peers-venv",
        type=Path,
        default=ROOT / ".bench" / "peers-venv",
        help="KServe's virtualenv (made when missing)",
    )
    parser.add_argument(
        "--perf-analyzer",
        choices=("auto", "off"),
        default="auto",
        help="auto: build perf_analyzer when missing and cross-check with it",
    )
    harness.add_perf_analyzer_arguments(parser, ROOT)
    parser.add_argument(
        "--perf-analyzer-models",
        nargs="*",
        default=None,
        help="models perf_analyzer cross-checks (default: the first of --models)",
    )
    parser.add_argument(
        "--section",
        default=None,
        metavar="NAME",
        help="write the results as one marked section NAME of --out (kept in place when "
        "the main run rewrites the file) rather than the whole file",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="keep the servers' logs, fleet file and CSVs here "
        "(default: a temporary folder, removed)",
    )
    parser.add_argument(
        "--pa-interval-ms", type=int, default=3000, help="perf_analyzer --measurement-interval"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if any(c < 1 for c in args.concurrency):
        parser.error("--concurrency values must be at least 1")
    args.concurrency = sorted(set(args.concurrency))
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(log_path=False)
    signal.signal(signal.SIGTERM, _terminate)
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    try:
        specs = [model_spec(args.repository, name, args.variant) for name in args.models]
    except BenchError as exc:
        console.print(f"[red]bench:[/] {exc}")
        return 2
    results = Results(
        models=args.models,
        concurrency=args.concurrency,
        targets={k: TARGET_LABELS[k] for k in TARGET_LABELS if k in args.targets},
    )
    notes: list[str] = []
    kserve_versions = "KServe not run"

    peers_python: Path | None = None
    if KSERVE in results.targets:
        try:
            peers_python = harness.ensure_peers_venv(args.peers_venv, console.log)
            kserve_versions = ", ".join(
                f"{p} {harness.installed_version(peers_python, p)}"
                for p in ("kserve", "onnxruntime", "grpcio")
            )
        except BenchError as exc:
            results.skipped[KSERVE] = "KServe virtualenv could not be made"
            notes.append(f"KServe not measured: {exc}")
    pa_binary: Path | None = None
    if args.perf_analyzer == "auto":
        try:
            pa_binary = harness.ensure_perf_analyzer(
                args.perf_analyzer_dir, args.perf_analyzer_build, console.log
            )
        except (BenchError, subprocess.TimeoutExpired) as exc:
            notes.append(f"perf_analyzer cross-check skipped: {exc}")

    pa_models = set(args.perf_analyzer_models or args.models[:1])
    with contextlib.ExitStack() as stack:
        if args.log_dir is not None:
            work = args.log_dir.resolve()
            work.mkdir(parents=True, exist_ok=True)
        else:
            temporary = tempfile.TemporaryDirectory(prefix="switchyard-bench-")
            work = Path(stack.enter_context(temporary))
        for round_number in range(1, args.rounds + 1):
            for key in results.targets:
                if key in results.skipped:
                    continue
                try:
                    measure_target(
                        key,
                        round_number,
                        args,
                        specs,
                        work,
                        peers_python,
                        pa_binary if round_number == 1 else None,
                        pa_models,
                        results,
                        notes,
                        console,
                    )
                except BenchError as exc:
                    label = TARGET_LABELS[key]
                    console.print(f"[red]{label} failed:[/] {exc}")
                    results.skipped[key] = "failed, see notes"
                    notes.append(f"{label} failed: {exc}")
            results.rounds_run = round_number
    for cell, rounds in results.rounds.items():
        results.loadgen[cell] = report.combine(rounds)

    elapsed_s = time.monotonic() - t0
    report.print_tables(results, console)
    notes = _dedupe(notes)
    if args.section:
        argv = shlex.join(["python", "-m", "gateway.bench", *sys.argv[1:]])
        body = section_markdown(results, args, started, elapsed_s, notes, argv)
        report.publish(
            body,
            args.out,
            f"<!-- {args.section}: written by `{argv}` -->",
            f"<!-- /{args.section} -->",
        )
        console.log(f"wrote section {args.section} of {args.out} ({elapsed_s:.0f} s)")
        return 1 if any(k in results.skipped for k in results.targets) else 0
    notes += static_notes(args)
    write_markdown(args.out, results, args, started, elapsed_s, notes, kserve_versions)
    console.log(f"wrote {args.out} ({elapsed_s:.0f} s)")
    return 1 if any(k in results.skipped for k in results.targets) else 0


def measure_target(
    key: str,
    round_number: int,
    args: argparse.Namespace,
    specs: list[ModelSpec],
    work: Path,
    peers_python: Path | None,
    pa_binary: Path | None,
    pa_models: set[str],
    results: Results,
    notes: list[str],
    console: Console,
) -> None:
    """Starts one target, runs the load client (and perf_analyzer) on it, stops it."""
    label = TARGET_LABELS[key]
    with start_target(
        key, round_number, args, specs, work, peers_python if key == KSERVE else None
    ) as (address, pids):
        console.log(f"round {round_number}/{args.rounds}: {label} serving at {address}")
        for spec in specs:
            levels = run_loadgen(
                args,
                address,
                pids,
                spec,
                work / f"round{round_number}",
                f"loadgen-{key}-{spec.name}",
            )
            for c, m in zip(args.concurrency, levels, strict=True):
                results.rounds.setdefault((key, spec.name, c), []).append(m)
                console.log(
                    f"  {spec.name} c={c}: {m.throughput_per_s:,.1f} infer/s"
                    f"  p50 {m.latency_p50_ms:.3f} ms  p99 {m.latency_p99_ms:.3f} ms"
                )
            if pa_binary is None or spec.name not in pa_models:
                continue
            if key == KSERVE:
                error = harness.probe_perf_analyzer(pa_binary, address, spec.name, work)
                if error:
                    notes.append(
                        f"perf_analyzer against KServe 0.21 ({spec.name}) stops before sending "
                        f"load: `{error}` (it calls Triton's ModelConfig RPC first, which "
                        "KServe does not implement); hence the common load client."
                    )
                continue
            try:
                for level in harness.run_perf_analyzer(
                    pa_binary,
                    address,
                    spec.name,
                    args.concurrency,
                    args.pa_interval_ms,
                    work,
                    timeout_s=180,
                ):
                    results.perf_analyzer[(key, spec.name, level.concurrency)] = Measurement(
                        level.throughput_per_s, level.latency_p50_ms, level.latency_p99_ms
                    )
                    console.log(
                        f"  {spec.name} c={level.concurrency} (perf_analyzer): "
                        f"{level.throughput_per_s:,.1f} infer/s"
                        f"  p50 {level.latency_p50_ms:.3f} ms"
                    )
            except BenchError as exc:
                notes.append(f"perf_analyzer on {label}: {exc}")


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def static_notes(args: argparse.Namespace) -> list[str]:
    return [
        "KServe 0.21 hard-codes its gRPC listen address as `[::]:PORT` (all interfaces; "
        "`ModelServer` takes `grpc_port` but no host) and always starts its REST server on "
        "0.0.0.0:8080. The peer therefore runs `ModelServer` with a `start()` that skips "
        "the REST server and a `GRPCServer.start()` copy whose only change is listening on "
        "127.0.0.1 port 0 (read back and printed); servicer, interceptors, thread pool, "
        "message limits and data plane are KServe's own. No fixed port is used anywhere.",
        "KServe parses `sys.argv` when `kserve` is imported; the peer clears argv first. "
        "KServe's own SIGTERM handler (`signal.signal` plus `asyncio.create_task`) did not "
        "stop the server here (the process lived on after SIGTERM), so the peer leaves "
        "SIGTERM at its default action.",
        "CPU time per inference: the load client reads user + system time of each server "
        "process (all threads, `/proc/PID/stat`) and of itself at the start and end of each "
        "measurement window, and divides by the calls answered in the window. Through the "
        "gateway, `worker` is the backend the gateway launched.",
        "KServe's predict is a plain (synchronous) `def`, as in KServe's own examples: it runs "
        "on the event loop, one inference at a time; ONNX Runtime uses 2 intra-op threads. "
        "The Switchyard worker runs inference in an executor with dynamic batching "
        "(max_queue_delay 0: it batches what is already queued).",
        "The gateway runs with its defaults: it forwards each request's bytes untouched and, "
        "once a call to the backend is in flight for a model (`coalesce_in_flight: 1`), "
        "merges the requests that arrive meanwhile into one batched call and splits the "
        "answer back by rows. That is why, at c=16, both the gateway's and the worker's CPU "
        "per inference fall below the worker's alone (`switchyard_coalesced_requests_per_call` "
        "in the gateway's metrics shows the merge sizes); at c=1 nothing waits or merges.",
        "By default KServe logs an INFO line per gRPC call (`LoggingInterceptor`) and a "
        "latency line per request; the bench runs it with `--kserve-logging "
        f"{args.kserve_logging}`"
        + (
            " (warnings only), the stronger baseline; `python -m gateway.bench --targets kserve "
            "--kserve-logging default` measures it as shipped (in separate runs of "
            "that on this machine, 2 rounds each, digits at c=16 gave about 2,150-2,200 infer/s "
            "with the default logging against 2,950-3,050 quiet, about 27% less)."
            if args.kserve_logging == "quiet"
            else " (as shipped)."
        ),
        "The protobuf packages of Switchyard (`protos`) and of tritonclient/KServe are all "
        "named `inference`, so they never share a process: the bench driver imports neither, "
        "the load client imports only tritonclient's, KServe runs in its own virtualenv.",
        "perf_analyzer (PyPI perf-analyzer 2.60.0, built for glibc 2.38) runs here through "
        "the shared build script's symbol shim (`shared/tools/perf_analyzer/build.sh`).",
    ]


if __name__ == "__main__":
    sys.exit(main())
