"""The processes `make bench` starts, and the tools it sets up: the backend worker,
the gateway, KServe's ModelServer (in its own virtualenv), the load clients and
Triton's perf_analyzer.

Every child runs in its own session (process group) and is asked to die with the
bench (backends.process); `Child.stop` ends the whole group, so the gateway's
launched workers go too. Children write to files, never to pipes that nobody reads.
Ports are always 0 and read back. This module must not import the project's `protos`
package nor tritonclient: the load clients and KServe run in their own processes
for that reason.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.process import dies_with_this_process
from backends.repository import ManifestError, ModelRepository

PEER_PACKAGES = ("kserve==0.21.0", "onnxruntime==1.32.0", "numpy==2.4.6")


class BenchError(Exception):
    """A part of the benchmark cannot be set up or run."""


def verified_variant_copy(repository: Path, model: str, variant: str, folder: Path) -> Path:
    """For a server that loads a model by path and cannot check it (KServe, in its own
    virtualenv): the variant's artifacts read once and checked against its manifest
    (`Variant.read_artifacts`), written under `folder/MODEL/VARIANT` (`folder` made
    private to this user); returns the copy of the file the runtime loads. Only the
    files the manifest lists are there, so external data it does not list is not found.
    BenchError naming the variant and why when it is refused."""
    try:
        found = ModelRepository(repository).read_variant(
            model, repository / model / "variants" / variant
        )
        artifacts = found.read_artifacts()
    except ManifestError as exc:
        raise BenchError(f"{model} variant {variant} refused: {exc}") from exc
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    target = folder / model / variant
    if target.exists():
        shutil.rmtree(target)
    for artifact in artifacts:
        path = target / artifact.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(artifact.data)
    return target / artifacts[0].path


def switchyard_command() -> list[str]:
    """How to run `switchyard`: this environment's entry point, else its module."""
    entry = Path(sys.executable).parent / "switchyard"
    return [str(entry)] if entry.exists() else [sys.executable, "-m", "gateway.cli"]


def serve_command(fleet: Path, ready: Path, *options: str) -> list[str]:
    """`switchyard serve` on the fleet file `fleet`, its ready file at `ready`, and
    `options` after them."""
    return [
        *switchyard_command(),
        "serve",
        "--config",
        str(fleet),
        "--ready-file",
        str(ready),
        *options,
    ]


class Child:
    """One process the bench started, with its output in `log_dir`; as a context
    manager, stopped on the way out."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log_dir: Path,
        cwd: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.stdout_path = log_dir / f"{name}.out"
        self.stderr_path = log_dir / f"{name}.err"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=cwd,
                env=env,
                start_new_session=True,
                preexec_fn=dies_with_this_process(),
            )

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def wait(self, timeout_s: float) -> tuple[int, float]:
        """Waits for the child to exit and reaps it with os.wait4; returns its exit
        status and its CPU seconds (user + system, all its threads). Past `timeout_s`
        it is killed: BenchError."""
        deadline = time.monotonic() + timeout_s
        while True:
            pid, status, usage = os.wait4(self.process.pid, os.WNOHANG)
            if pid != 0:
                break
            if time.monotonic() > deadline:
                self.process.kill()
                _, status, _ = os.wait4(self.process.pid, 0)
                self.process.returncode = os.waitstatus_to_exitcode(status)
                raise BenchError(f"{self.name} ran past {timeout_s:.0f} s")
            time.sleep(0.05)
        self.process.returncode = os.waitstatus_to_exitcode(status)  # reaped here
        return self.process.returncode, usage.ru_utime + usage.ru_stime

    def exited(self) -> int | None:
        return self.process.poll()

    def stderr_tail(self, lines: int = 15) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def failure(self, what: str) -> BenchError:
        return BenchError(
            f"{self.name}: {what} (exit status {self.exited()}); "
            f"last lines of {self.stderr_path}:\n{self.stderr_tail()}"
        )

    def wait_listening(self, timeout_s: float) -> str:
        """Waits for the `{"event": "listening", "address": ...}` line on stdout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                for line in self.stdout_path.read_text(errors="replace").splitlines():
                    with contextlib.suppress(ValueError):
                        event = json.loads(line)
                        if isinstance(event, dict) and event.get("event") == "listening":
                            return str(event["address"])
            if self.exited() is not None:
                raise self.failure("exited before listening")
            time.sleep(0.1)
        raise self.failure(f"not listening after {timeout_s:.0f}s")

    def wait_ready_file(self, path: Path, timeout_s: float) -> dict[str, Any]:
        """Waits for `switchyard serve --ready-file` to write its JSON description."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                ready = json.loads(path.read_text())
                if isinstance(ready, dict) and "address" in ready:
                    return ready
            if self.exited() is not None:
                raise self.failure("exited before serving")
            time.sleep(0.1)
        raise self.failure(f"no ready file after {timeout_s:.0f}s")

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM to the child's process group, SIGKILL after `grace_s`."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; its group (a gateway's workers) may linger briefly.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            return


# -- the peers' virtualenv (KServe) ------------------------------------------------


def ensure_peers_venv(venv: Path, log: Any) -> Path:
    """Creates `venv` with KServe 0.21 and ONNX Runtime when it is missing; returns its
    python. A stamp file records a finished install, so a half-made venv is redone."""
    python = venv / "bin" / "python"
    stamp = venv / ".bench-installed"
    wanted = " ".join(PEER_PACKAGES)
    if python.exists() and stamp.is_file() and stamp.read_text().strip() == wanted:
        return python
    base = shutil.which("python3.11") or sys.executable
    log(f"creating the KServe virtualenv {venv} ({wanted}); once only, takes a minute or two")
    try:
        if not python.exists():
            subprocess.run([base, "-m", "venv", str(venv)], check=True, capture_output=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                *PEER_PACKAGES,
            ],
            check=True,
            capture_output=True,
            timeout=900,
        )
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or b"").decode(errors="replace")[-2000:]
        raise BenchError(f"cannot set up {venv}: {exc}\n{detail}") from exc
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"cannot set up {venv}: pip timed out") from exc
    stamp.write_text(wanted + "\n")
    return python


def installed_version(python: Path, package: str) -> str:
    result = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or "?"


# -- perf_analyzer -----------------------------------------------------------------


def ensure_perf_analyzer(out_dir: Path, build_script: Path, log: Any) -> Path:
    """Builds Triton's perf_analyzer into `out_dir` with the shared build script."""
    binary = out_dir / "bin" / "perf_analyzer"
    if os.access(binary, os.X_OK):
        return binary
    if not build_script.is_file():
        raise BenchError(f"no perf_analyzer build script at {build_script}")
    log(f"building perf_analyzer into {out_dir} (once only)")
    result = subprocess.run(
        ["bash", str(build_script), str(out_dir)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if result.returncode != 0 or not os.access(binary, os.X_OK):
        raise BenchError(f"perf_analyzer build failed: {result.stderr[-2000:]}")
    return binary


def add_perf_analyzer_arguments(parser: argparse.ArgumentParser, root: Path) -> None:
    """Where perf_analyzer is built (`--perf-analyzer-dir`) and its build script."""
    parser.add_argument("--perf-analyzer-dir", type=Path, default=root / ".bench" / "perf_analyzer")
    parser.add_argument(
        "--perf-analyzer-build",
        type=Path,
        default=root.parent / "shared" / "tools" / "perf_analyzer" / "build.sh",
    )


PERF_ANALYZER_PROTOCOLS = ("grpc", "http")
"""perf_analyzer's `-i`: the Open Inference Protocol's gRPC or HTTP/REST binding (over
HTTP it sends and asks for tensors in Triton's binary data extension by default)."""


def perf_analyzer_command(
    binary: Path, address: str, model: str, *options: str, protocol: str = "grpc"
) -> list[str]:
    """perf_analyzer over `protocol` (gRPC or HTTP) against `model` at `address`, with
    `options`."""
    if protocol not in PERF_ANALYZER_PROTOCOLS:
        raise BenchError(
            f"perf_analyzer speaks {' or '.join(PERF_ANALYZER_PROTOCOLS)}, not {protocol}"
        )
    return [str(binary), "-i", protocol, "-u", address, "-m", model, *options]


@dataclass(frozen=True, slots=True)
class PerfAnalyzerLevel:
    concurrency: int
    throughput_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float


@dataclass(frozen=True, slots=True)
class PerfAnalyzerRow:
    """One row of perf_analyzer's CSV: the load level (its first column: concurrency or
    request rate) and what the client measured (latencies converted from us to ms)."""

    level: float
    throughput_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float


def perf_analyzer_rows(
    binary: Path,
    address: str,
    model: str,
    load_args: Sequence[str],
    measurement_interval_ms: int,
    csv_path: Path,
    timeout_s: float,
    max_trials: int = 10,
    protocol: str = "grpc",
    stability_percentage: int = 50,
) -> list[PerfAnalyzerRow]:
    """perf_analyzer over `protocol` with `load_args` (`--concurrency-range C:C`,
    `--request-rate-range R:R`, ...); parses the CSV it writes to `csv_path`."""
    command = perf_analyzer_command(
        binary,
        address,
        model,
        *load_args,
        "--measurement-interval",
        str(measurement_interval_ms),
        "--stability-percentage",
        str(stability_percentage),
        "--max-trials",
        str(max_trials),
        "-f",
        str(csv_path),
        protocol=protocol,
    )
    csv_path.unlink(missing_ok=True)
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=csv_path.parent,
            timeout=timeout_s,
            check=False,
            preexec_fn=dies_with_this_process(),
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"perf_analyzer timed out on {model} at {address}") from exc
    if result.returncode != 0 or not csv_path.is_file():
        tail = (result.stdout + result.stderr).strip().splitlines()[-3:]
        raise BenchError(f"perf_analyzer failed on {model} at {address}: {' | '.join(tail)}")
    rows = []
    with csv_path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        for values in reader:
            if len(values) != len(header):
                continue
            row = dict(zip(header, values, strict=True))
            rows.append(
                PerfAnalyzerRow(
                    level=float(values[0]),
                    throughput_per_s=float(row["Inferences/Second"]),
                    latency_p50_ms=float(row["p50 latency"]) / 1000.0,
                    latency_p99_ms=float(row["p99 latency"]) / 1000.0,
                )
            )
    return rows


def run_perf_analyzer(
    binary: Path,
    address: str,
    model: str,
    concurrency: Sequence[int],
    measurement_interval_ms: int,
    work_dir: Path,
    timeout_s: float,
    protocol: str = "grpc",
) -> list[PerfAnalyzerLevel]:
    """perf_analyzer over `protocol` at each concurrency; parses its CSV (latencies in us)."""
    levels = []
    for c in concurrency:
        csv_path = work_dir / f"pa-{model}-{protocol}-{address.replace(':', '_')}-c{c}.csv"
        for row in perf_analyzer_rows(
            binary,
            address,
            model,
            ["--concurrency-range", f"{c}:{c}"],
            measurement_interval_ms,
            csv_path,
            timeout_s,
            protocol=protocol,
        ):
            levels.append(
                PerfAnalyzerLevel(
                    concurrency=int(row.level),
                    throughput_per_s=row.throughput_per_s,
                    latency_p50_ms=row.latency_p50_ms,
                    latency_p99_ms=row.latency_p99_ms,
                )
            )
    return levels


def probe_perf_analyzer(
    binary: Path, address: str, model: str, work_dir: Path, protocol: str = "grpc"
) -> str:
    """Whether perf_analyzer can drive a server over `protocol` at all; returns its
    error, or ''."""
    result = subprocess.run(
        perf_analyzer_command(
            binary,
            address,
            model,
            "--concurrency-range",
            "1:1",
            "--measurement-interval",
            "500",
            "--max-trials",
            "1",
            "--stability-percentage",
            "100",
            protocol=protocol,
        ),
        capture_output=True,
        text=True,
        cwd=work_dir,
        timeout=60,
        check=False,
    )
    if result.returncode == 0:
        return ""
    lines = (result.stdout + result.stderr).strip().splitlines()
    errors = [line for line in lines if "rror" in line]
    return (errors or lines or [f"exit status {result.returncode}"])[0].strip()
