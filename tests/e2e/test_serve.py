"""`switchyard serve` as users run it: real gateway and worker processes, the
reference client, perf_analyzer, and a worker killed under load."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, SWITCHYARD, RunningGateway

HERE = Path(__file__).resolve().parent


def run_client(address: str, repository: Path) -> dict:  # type: ignore[type-arg]
    proc = subprocess.run(
        [sys.executable, str(HERE / "triton_client_check.py"), address, str(repository)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=HERE,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def test_reference_client_sees_a_complete_server(served: RunningGateway, repository: Path) -> None:
    seen = run_client(served.address, repository)
    assert seen["live"] and seen["ready"] and seen["model_ready"]
    assert not seen["unknown_model_ready"]
    assert seen["server_metadata"]["name"] == "switchyard"
    assert seen["model_metadata"]["inputs"][0] == {
        "name": "input",
        "datatype": "FP32",
        "shape": ["-1", "64"],
    }
    assert seen["model_config"]["config"]["maxBatchSize"] == 64
    assert {m["name"] for m in seen["index"]["models"]} >= {"digits", "cnn", "echo"}
    for mode in ("raw", "typed"):
        result = seen[f"infer_{mode}"]
        assert result["id"] == f"req-{mode}"
        assert result["labels_match"], result
        assert result["outputs"] == ["label"]
        assert result["parameters"]["switchyard_backend"] in {"small", "big"}
        assert result["parameters"]["switchyard_variant"] == "ort-cpu-fp32"
    assert seen["bad"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "input 'input'" in seen["bad"]["message"]
    assert int(seen["statistics"]["modelStats"][0]["inferenceStats"]["success"]["count"]) >= 2


def test_launched_workers_run_with_their_cpus_and_threads(served: RunningGateway) -> None:
    status = Path(f"/proc/{served.info['pids']['small']}/status").read_text()
    allowed = next(line for line in status.splitlines() if line.startswith("Cpus_allowed_list"))
    assert allowed.split(":")[1].strip() == "0"
    environ = Path(f"/proc/{served.info['pids']['big']}/environ").read_bytes().split(b"\0")
    assert b"TVM_NUM_THREADS=2" in environ and b"TVM_USE_RUNTIME_LIB=1" in environ


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


def test_perf_analyzer_drives_the_gateway(served: RunningGateway, tmp_path: Path) -> None:
    binary = _perf_analyzer()
    if binary is None:
        pytest.skip("perf_analyzer is not available (needs ../shared/tools/perf_analyzer/build.sh)")
    csv = tmp_path / "pa.csv"
    proc = subprocess.run(
        [
            binary,
            "-i",
            "grpc",
            "-u",
            served.address,
            "-m",
            "digits",
            "--concurrency-range",
            "2",
            "--measurement-interval",
            "1000",
            "--max-trials",
            "3",
            "--stability-percentage",
            "100",
            "-f",
            str(csv),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header, row = csv.read_text().splitlines()[:2]
    throughput = float(
        dict(zip(header.split(","), row.split(","), strict=False))["Inferences/Second"]
    )
    assert throughput > 0


def test_a_killed_worker_is_restarted_and_costs_no_request(
    served: RunningGateway, repository: Path
) -> None:
    import grpc
    import numpy as np

    from protos import inference_pb2 as pb
    from protos import inference_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(served.address)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    req = pb.ModelInferRequest(model_name="digits")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    req.raw_input_contents.append(np.zeros((1, 64), np.float32).tobytes())
    failures: list[str] = []
    used: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                reply = stub.ModelInfer(req, timeout=10)
                used.append(reply.parameters["switchyard_backend"].string_param)
            except grpc.RpcError as exc:
                failures.append(f"{exc.code()}: {exc.details()}")

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    os.kill(served.info["pids"]["small"], signal.SIGKILL)
    time.sleep(2.0)
    deadline = time.monotonic() + 30
    restarted = False
    while time.monotonic() < deadline and not restarted:
        before = len(used)
        time.sleep(0.5)
        restarted = "small" in used[before:]
    stop.set()
    for t in threads:
        t.join()
    channel.close()
    assert failures == []
    assert restarted, served.log()[-3000:]
    assert "worker exited" in served.log()


def test_invalid_fleet_file_fails_with_a_clear_message(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("backends:\n  - name: a\n    address: 127.0.0.1:1\n    pricee: 3\n")
    proc = subprocess.run(
        [*SWITCHYARD, "serve", "--config", str(fleet)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "pricee" in proc.stderr and "Extra inputs are not permitted" in proc.stderr
