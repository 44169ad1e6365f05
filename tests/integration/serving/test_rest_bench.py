"""The REST bench (gateway.bench.rest), briefly and against real servers: its load
generator measures a live gateway's REST endpoint and counts refused requests as
errors; the trivial ASGI app serves under a stack in a process of its own; KServe's
REST peer starts on 127.0.0.1 and answers (chunked) the bench's binary request; the
section renders the ratios, the verdicts and the stack choice from a tiny run."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.bench import harness
from gateway.bench.harness import Child
from gateway.bench.rest import (
    HELLO_PATH,
    LG_GATEWAY,
    LG_KSERVE,
    PA_GRPC,
    PA_HTTP,
    STACKS,
    Results,
    Sample,
    closed_loop_http,
    http_request,
    infer_body,
    section,
    stack_choice,
    stack_key,
)
from gateway.config import FleetConfig
from gateway.server import Gateway, start_gateway
from tests.integration.conftest import Worker, launch_worker
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[3]
PEERS_PYTHON = ROOT / ".bench" / "peers-venv" / "bin" / "python"


@pytest.fixture
async def digits_worker(repository: Path) -> AsyncIterator[Worker]:
    w = await launch_worker(repository, threads=1, hardware_class="test-1c", models=["digits"])
    yield w
    await w.stop()


@pytest.fixture
async def gateway(digits_worker: Worker) -> AsyncIterator[Gateway]:
    config = FleetConfig.model_validate(
        {
            "gateway": {"listen": "127.0.0.1:0", "metrics": "127.0.0.1:0", "http": "127.0.0.1:0"},
            "backends": [
                {"name": "cpu", "address": digits_worker.address, "price_usd_per_hour": 0.04}
            ],
        }
    )
    gw = await start_gateway(config)
    await wait_until(lambda: gw.servicer.fleet.model_ready("digits"), what="digits ready")
    yield gw
    await gw.stop()


def _infer_request(repository: Path, address: str, model: str = "digits") -> bytes:
    body, json_length = infer_body(repository, "digits", "ort-cpu-fp32")
    headers = [
        ("Content-Type", "application/octet-stream"),
        ("Inference-Header-Content-Length", str(json_length)),
    ]
    return http_request(address, f"/v2/models/{model}/infer", body, headers)


async def test_the_load_generator_measures_the_gateway_rest_endpoint(
    gateway: Gateway, repository: Path
) -> None:
    assert gateway.rest is not None
    address = f"127.0.0.1:{gateway.rest.port}"
    load = await closed_loop_http(address, _infer_request(repository, address), 2, 0.2, 0.5)
    assert load.errors == 0, load.first_error
    assert load.requests > 0 and load.throughput_per_s > 0
    assert 0 < load.latency_p50_ms <= load.latency_p99_ms
    assert not math.isnan(load.cpu_us_per_request["client"])


async def test_refused_requests_are_errors_naming_the_status(
    gateway: Gateway, repository: Path
) -> None:
    assert gateway.rest is not None
    address = f"127.0.0.1:{gateway.rest.port}"
    request = _infer_request(repository, address, model="no-such-model")
    load = await closed_loop_http(address, request, 1, 0.0, 0.2)
    assert load.errors > 0 and load.throughput_per_s == 0
    assert load.first_error.startswith("HTTP 404: ")
    assert "no-such-model" in load.first_error


async def test_the_trivial_app_serves_under_a_stack_of_its_own(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "gateway.bench.rest",
        "stack",
        "--server",
        "uvicorn-h11",
        "--app",
        "hello",
    ]
    with Child("stack", command, tmp_path, ROOT) as child:
        address = child.wait_listening(60)
        load = await closed_loop_http(address, http_request(address, HELLO_PATH, None), 2, 0, 0.3)
    assert load.errors == 0, load.first_error
    assert load.requests > 0


async def test_the_kserve_rest_peer_answers_the_bench_request(
    tmp_path: Path, repository: Path
) -> None:
    if not PEERS_PYTHON.exists():
        pytest.skip(f"KServe's virtualenv is not made ({PEERS_PYTHON}); `make bench` makes it")
    model_file = harness.verified_variant_copy(repository, "digits", "ort-cpu-fp32", tmp_path / "m")
    command = [
        str(PEERS_PYTHON),
        "-I",
        str(ROOT / "gateway" / "bench" / "kserve_peer.py"),
        "--rest",
        "--threads",
        "1",
        "--model",
        f"digits={model_file}",
    ]
    with Child("kserve", command, tmp_path, tmp_path) as child:
        address = child.wait_listening(120)
        assert address.startswith("127.0.0.1:")
        load = await closed_loop_http(address, _infer_request(repository, address), 2, 0.2, 0.5)
    assert load.errors == 0, load.first_error
    assert load.requests > 0
    # Nagle off on its connections: a keep-alive answer does not wait ~40 ms for an ACK.
    assert load.latency_p50_ms < 30


def _args() -> argparse.Namespace:
    return argparse.Namespace(
        model="digits",
        variant="ort-cpu-fp32",
        concurrency=8,
        rounds=2,
        duration_s=1.0,
        warmup_s=0.5,
        pa_window_ms=500,
        kserve_logging="quiet",
    )


def _samples(*throughputs: float) -> list[Sample]:
    return [Sample(t, 4.0, 9.0, {"gateway": 400.0, "worker": 200.0}) for t in throughputs]


def test_the_section_renders_ratios_verdicts_and_the_stack_choice() -> None:
    results = Results()
    results.samples[PA_GRPC] = _samples(1000, 1200)
    results.samples[PA_HTTP] = _samples(1500, 1500)
    results.samples[LG_GATEWAY] = _samples(1800, 2000)
    results.samples[LG_KSERVE] = [Sample(t, 4.0, 9.0, {"kserve": 450.0}) for t in (1900, 1900)]
    for server, factor in zip(STACKS, (1.0, 0.8, 1.3), strict=True):
        for app, base in (("hello", 20000.0), ("infer", 1500.0)):
            results.samples[stack_key(app, server)] = _samples(base * factor, base * factor)
    text = section(_args(), results, 12.0, 1.5)
    assert (
        "| gateway REST / gateway gRPC throughput, c=8 (perf_analyzer) | 1.36 | 1.50, 1.25 |"
        in (text)
    )
    assert "| >= 0.7 | met |" in text
    assert "| 1.00 | 0.95, 1.05 | >= 1.2 | NOT met |" in text
    assert "| infer: granian | 1,950 |" in text
    assert "**Chosen: granian**" in text
    assert "load average over the last minute: 1.5 at the start" in text
    # Within the margin the gateway's own stack stays.
    results.samples[stack_key("infer", "granian")] = _samples(1600, 1600)
    assert stack_choice(results).chosen == "uvicorn-httptools"
