"""Real processes: `switchyard serve` launching real backend workers, driven by
the reference client and perf_analyzer in their own processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.waiting import wait_until_blocking

ROOT = Path(__file__).resolve().parents[2]
SWITCHYARD = [sys.executable, "-m", "gateway.cli"]
ADMIN_TOKEN = "e2e-admin-token"


@dataclass
class RunningGateway:
    process: subprocess.Popen[bytes]
    info: dict  # type: ignore[type-arg]
    log_path: Path

    @property
    def address(self) -> str:
        return str(self.info["address"])

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Runs `switchyard admin --target ... ARGS` against this gateway."""
        return subprocess.run(
            [*SWITCHYARD, "admin", "--target", str(self.info["admin"]), *args],
            cwd=ROOT,
            env={**os.environ, "SWITCHYARD_ADMIN_TOKEN": ADMIN_TOKEN},
            capture_output=True,
            text=True,
            timeout=30,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def write_fleet(
    path: Path,
    repository: Path,
    backends: list[dict],  # type: ignore[type-arg]
    **gateway: object,
) -> Path:
    """A fleet file on ports 0 with these backends; `gateway` adds or overrides settings."""
    path.write_text(
        yaml.safe_dump(
            {
                "repository": str(repository),
                "gateway": {
                    "listen": "127.0.0.1:0",
                    "metrics": "127.0.0.1:0",
                    "http": "127.0.0.1:0",
                    "admin": "127.0.0.1:0",
                    "probe_interval_s": 0.2,
                    **gateway,
                },
                "backends": backends,
            }
        )
    )
    return path


def start_serve(
    fleet: Path,
    workdir: Path,
    timeout_s: float = 60,
    name: str = "gateway",
    prefix: Sequence[str] = (),
) -> RunningGateway:
    """`switchyard serve` on `fleet`, once its ready file is written; `name` names its
    ready file and log in `workdir`, `prefix` goes before the command (`ip netns exec
    HOST`, to run it on a test host)."""
    ready = workdir / ("ready.json" if name == "gateway" else f"{name}-ready.json")
    log_path = workdir / f"{name}.log"
    process = subprocess.Popen(
        [*prefix, *SWITCHYARD, "serve", "--config", str(fleet), "--ready-file", str(ready)],
        cwd=ROOT,
        env={**os.environ, "SWITCHYARD_ADMIN_TOKEN": ADMIN_TOKEN},
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until_blocking(
            lambda: ready.exists() or process.poll() is not None,
            timeout_s,
            f"{name} writing its ready file",
            interval_s=0.1,
        )
        if not ready.exists():
            raise AssertionError(f"{name} exited")
    except AssertionError as exc:
        process.kill()
        raise AssertionError(f"{name} did not start ({exc}):\n{log_path.read_text()}") from None
    return RunningGateway(process, json.loads(ready.read_text()), log_path)


def stop(gateway: RunningGateway) -> None:
    if gateway.process.poll() is None:
        gateway.process.send_signal(signal.SIGTERM)
        try:
            gateway.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            gateway.process.kill()
            gateway.process.wait()
    # Workers must not outlive the gateway.
    for pid in gateway.info.get("pids", {}).values():
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), f"worker {pid} outlived the gateway"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def served(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    workdir = tmp_path_factory.mktemp("serve")
    fleet = write_fleet(
        workdir / "fleet.yaml",
        repository,
        [
            {
                "name": "small",
                "address": "127.0.0.1:0",
                "hardware_class": "cpu-1c",
                "price_usd_per_hour": 0.04,
                "launch": {"threads": 1, "cpus": [0]},
            },
            {
                "name": "big",
                "address": "127.0.0.1:0",
                "hardware_class": "cpu-2c",
                "price_usd_per_hour": 0.08,
                "launch": {"threads": 2},
            },
        ],
    )
    gateway = start_serve(fleet, workdir)
    yield gateway
    stop(gateway)


def perf_analyzer_throughput(
    protocol: str, address: str, model: str, tmp_path: Path, *options: str
) -> float:
    """Runs Triton's perf_analyzer (`-i grpc` or `-i http`) against `address` at
    concurrency 2 for up to three 1 s windows and returns its inferences a second; skips
    (with the reason printed) where perf_analyzer cannot be built."""
    binary = _perf_analyzer()
    if binary is None:
        pytest.skip("perf_analyzer is not available (needs ../shared/tools/perf_analyzer/build.sh)")
    csv = tmp_path / f"pa-{protocol}.csv"
    command = [binary, "-i", protocol, "-u", address, "-m", model, *options]
    command += ["--concurrency-range", "2", "--measurement-interval", "1000"]
    command += ["--max-trials", "3", "--stability-percentage", "100", "-f", str(csv)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header, row = csv.read_text().splitlines()[:2]
    return float(dict(zip(header.split(","), row.split(","), strict=False))["Inferences/Second"])


def _perf_analyzer() -> str | None:
    """perf_analyzer, built once into .bench/ by the shared build script when present."""
    binary = ROOT / ".bench" / "perf_analyzer" / "bin" / "perf_analyzer"
    if binary.exists():
        return str(binary)
    script = ROOT.parent / "shared" / "tools" / "perf_analyzer" / "build.sh"
    if not script.exists() or shutil.which("g++") is None:
        return None
    proc = subprocess.run(
        ["bash", str(script), str(binary.parents[1])], capture_output=True, timeout=600
    )
    return str(binary) if proc.returncode == 0 and binary.exists() else None
