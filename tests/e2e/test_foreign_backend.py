"""The gateway routes to another project's v2 server: KServe 0.21's ModelServer,
in its own virtualenv and process, listed in the fleet file by address. KServe
lacks the RepositoryIndex and ModelConfig extensions; the fleet entry names its
models and the gateway answers ModelConfig from KServe's metadata, so even
perf_analyzer (which cannot drive KServe directly) runs through the gateway."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.bench.harness import ensure_peers_venv
from tests.e2e.conftest import (
    ROOT,
    RunningGateway,
    perf_analyzer_throughput,
    start_serve,
    stop,
    write_fleet,
)

CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as g
from google.protobuf.json_format import MessageToDict
client = g.InferenceServerClient(sys.argv[1])
x = np.load(sys.argv[2])["input"]
tensor = g.InferInput("input", list(x.shape), "FP32")
tensor.set_data_from_numpy(x)
result = client.infer("digits", [tensor], request_id="k1")
print(json.dumps({
    "ready": client.is_model_ready("digits"),
    "metadata": MessageToDict(client.get_model_metadata("digits")),
    "config": MessageToDict(client.get_model_config("digits")),
    "labels": result.as_numpy("label").tolist(),
    "id": result.get_response().id,
    "parameters": {k: v.string_param for k, v in result.get_response().parameters.items()},
}))
"""


@pytest.fixture(scope="module")
def kserve(repository: Path) -> Iterator[str]:
    python = ensure_peers_venv(ROOT / ".bench" / "peers-venv", log=print)
    model = repository / "digits" / "variants" / "ort-cpu-fp32" / "model.onnx"
    process = subprocess.Popen(
        [
            str(python),
            "-I",
            str(ROOT / "gateway" / "bench" / "kserve_peer.py"),
            "--threads",
            "1",
            "--model",
            f"digits={model}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 120
        address = None
        while address is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "listening":
                address = event["address"]
        assert address, "KServe did not start"
        yield address
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def fronted(
    kserve: str, repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    workdir = tmp_path_factory.mktemp("foreign")
    fleet = write_fleet(
        workdir / "fleet.yaml",
        repository,
        [
            {
                "name": "kserve",
                "address": kserve,
                "hardware_class": "cpu-peer",
                "price_usd_per_hour": 0.05,
                "models": ["digits"],
            }
        ],
    )
    gateway = start_serve(fleet, workdir)
    yield gateway
    stop(gateway)


def test_requests_reach_kserve_through_the_gateway(
    fronted: RunningGateway, repository: Path
) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CLIENT,
            fronted.address,
            str(repository / "digits" / "samples" / "inputs.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent,
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    reference = json.loads(
        json.dumps(
            __import__("numpy")
            .load(repository / "digits" / "samples" / "reference.npz")["label"]
            .tolist()
        )
    )
    assert seen["ready"]
    assert seen["labels"] == reference
    assert seen["id"] == "k1"
    assert seen["parameters"]["switchyard_backend"] == "kserve"
    assert seen["parameters"]["switchyard_variant"] == "remote"
    assert [t["name"] for t in seen["metadata"]["inputs"]] == ["input"]
    # KServe has no ModelConfig; the gateway derives one from its metadata.
    assert seen["config"]["config"]["input"][0]["name"] == "input"


def test_perf_analyzer_drives_kserve_through_the_gateway(
    fronted: RunningGateway, tmp_path: Path
) -> None:
    throughput = perf_analyzer_throughput(
        "grpc", fronted.address, "digits", tmp_path, "--shape", "input:1,64"
    )
    assert throughput > 0
