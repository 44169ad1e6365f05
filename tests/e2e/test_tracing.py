"""Tracing across real processes: `switchyard backend` and `switchyard serve`, each writing
its spans to a file of JSON lines; one request's spans from both share one trace id, the
caller's, and the worker's hang under the gateway's attempt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, SWITCHYARD, RunningGateway, start_serve, stop, write_fleet
from tests.waiting import wait_until_blocking

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01"

CLIENT = """
import sys
import numpy as np
import tritonclient.grpc as g

client = g.InferenceServerClient(sys.argv[1])
x = g.InferInput("input", [1, 64], "FP32")
x.set_data_from_numpy(np.zeros((1, 64), dtype=np.float32))
result = client.infer("digits", [x], headers={"traceparent": sys.argv[2]})
print(result.get_response().parameters["switchyard_backend"].string_param)
"""


def spans(path: Path) -> list[dict]:  # type: ignore[type-arg]
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def of_trace(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [s for s in spans(path) if s["context"]["trace_id"] == f"0x{TRACE_ID}"]


@pytest.fixture
def backend(repository: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`switchyard backend` on a free port, its spans to a file: (address, file)."""
    trace_file = tmp_path / "backend-spans.jsonl"
    process = subprocess.Popen(
        [
            *SWITCHYARD,
            "backend",
            "--repository",
            str(repository),
            "--listen",
            "127.0.0.1:0",
            "--models",
            "digits",
            "--no-measure-at-start",
            "--trace-file",
            str(trace_file),
        ],
        cwd=ROOT,
        env={**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "50"},
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "backend.log").open("wb"),
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise AssertionError(
                f"backend did not start:\n{(tmp_path / 'backend.log').read_text()}"
            )
        yield json.loads(line)["address"], trace_file
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_one_requests_spans_from_gateway_and_worker_share_one_trace(
    repository: Path,
    tmp_path: Path,
    backend: tuple[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    address, backend_spans = backend
    gateway_spans = tmp_path / "gateway-spans.jsonl"
    fleet = write_fleet(
        tmp_path / "fleet.yaml",
        repository,
        [{"name": "one", "address": address, "price_usd_per_hour": 0.04}],
        tracing={"exporter": "file", "file": str(gateway_spans)},
    )
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # the gateway's spans leave soon
    gateway: RunningGateway = start_serve(fleet, tmp_path)
    try:
        answer = subprocess.run(
            [sys.executable, "-c", CLIENT, gateway.address, TRACEPARENT],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert answer.returncode == 0, answer.stderr
        assert answer.stdout.strip() == "one"

        wait_until_blocking(
            lambda: (
                {"switchyard.request", "switchyard.route", "switchyard.attempt"}
                <= {s["name"] for s in of_trace(gateway_spans)}
            ),
            timeout_s=30.0,
            what="the gateway's spans of the request",
        )
        wait_until_blocking(
            lambda: (
                {
                    "switchyard.backend.request",
                    "switchyard.backend.queue",
                    "switchyard.backend.run",
                }
                <= {s["name"] for s in of_trace(backend_spans)}
            ),
            timeout_s=30.0,
            what="the worker's spans of the request",
        )
    finally:
        stop(gateway)
    ours = {s["name"]: s for s in of_trace(gateway_spans)}
    theirs = {s["name"]: s for s in of_trace(backend_spans)}
    assert ours["switchyard.request"]["parent_id"] == f"0x{CALLER_SPAN_ID}"
    assert ours["switchyard.request"]["resource"]["attributes"]["service.name"] == (
        "switchyard-gateway"
    )
    assert theirs["switchyard.backend.request"]["resource"]["attributes"]["service.name"] == (
        "switchyard-backend"
    )
    # Across the process boundary: the worker's request span is the attempt's child.
    attempt_id = ours["switchyard.attempt"]["context"]["span_id"]
    assert theirs["switchyard.backend.request"]["parent_id"] == attempt_id
    assert ours["switchyard.route"]["attributes"]["switchyard.backend"] == "one"


def test_a_launched_worker_follows_the_fleet_files_tracing(
    repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker the gateway launches gets `gateway.tracing` (here: the same file, which
    several processes may append to), and its spans join the caller's trace."""
    trace_file = tmp_path / "spans.jsonl"
    fleet = write_fleet(
        tmp_path / "fleet.yaml",
        repository,
        [
            {
                "name": "launched",
                "address": "127.0.0.1:0",
                "price_usd_per_hour": 0.04,
                "launch": {"threads": 1, "models": ["digits"]},
            }
        ],
        tracing={"exporter": "file", "file": str(trace_file)},
    )
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # both processes' spans leave soon
    gateway: RunningGateway = start_serve(fleet, tmp_path)
    try:
        answer = subprocess.run(
            [sys.executable, "-c", CLIENT, gateway.address, TRACEPARENT],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert answer.returncode == 0, answer.stderr
        assert answer.stdout.strip() == "launched"
        wait_until_blocking(
            lambda: (
                {"switchyard.attempt", "switchyard.backend.request"}
                <= {s["name"] for s in of_trace(trace_file)}
            ),
            timeout_s=30.0,
            what="the gateway's and the launched worker's spans in the one file",
        )
    finally:
        stop(gateway)
    named = {s["name"]: s for s in of_trace(trace_file)}
    worker = named["switchyard.backend.request"]
    assert worker["resource"]["attributes"]["service.name"] == "switchyard-backend"
    assert worker["parent_id"] == named["switchyard.attempt"]["context"]["span_id"]
