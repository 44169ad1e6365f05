"""`switchyard profile` and `switchyard report` as users run them, and the worker's
default variant following the profile."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml

from backends.compile.compiler import compile_model
from backends.profiles import Profile, ProfileEntry, write_profile
from backends.repository import ModelRepository
from gateway.serving.converters import parse_profile
from tests.e2e.conftest import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def shop(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shop")
    repo = root / "models"
    shutil.copytree(repository / "cnn" / "samples", repo / "cnn" / "samples")
    compile_model(repository / "cnn" / "model.onnx", "cnn", ModelRepository(repo))
    fleet = root / "fleet.yaml"
    fleet.write_text(
        yaml.safe_dump(
            {
                "repository": str(repo),
                "backends": [
                    {
                        "name": "small",
                        "address": "127.0.0.1:0",
                        "hardware_class": "cpu-1c",
                        "price_usd_per_hour": 0.04,
                        "power_w": 20,
                        "carbon_g_per_kwh": 350,
                        "launch": {"threads": 1},
                    },
                    {
                        "name": "slow",
                        "address": "127.0.0.1:0",
                        "hardware_class": "cpu-slow",
                        "price_usd_per_hour": 0.00001,
                        "launch": {"threads": 1, "emulate_latency_ms": 60},
                    },
                ],
            }
        )
    )
    return fleet, repo


def switchyard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )


def test_profile_then_report(shop: tuple[Path, Path], tmp_path: Path) -> None:
    fleet, repo = shop
    proc = switchyard("profile", "--config", str(fleet), "--runs", "10", "--batch-sizes", "1", "8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    profile = json.loads(
        (repo / "cnn" / "variants" / "ort-cpu-int8-qdq" / "profile.json").read_text()
    )
    by_class = {(e["hardware_class"], e["batch_size"]): e for e in profile["entries"]}
    assert set(by_class) == {("cpu-1c", 1), ("cpu-1c", 8), ("cpu-slow", 1), ("cpu-slow", 8)}
    # The slow class stands for slower hardware: its emulated 60 ms is in every figure.
    assert by_class[("cpu-slow", 1)]["p50_ms"] >= 60
    assert by_class[("cpu-1c", 1)]["p50_ms"] < 30
    assert by_class[("cpu-1c", 8)]["throughput_per_s"] > 0

    out = tmp_path / "report"
    proc = switchyard("report", "--config", str(fleet), "--out", str(out), "--sla-ms", "30", "1000")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (out / "report.md").read_text()
    assert "| ort-cpu-int8-qdq | cpu-1c |" in text and "| ort-cpu-fp32 | cpu-slow |" in text
    # Under 30 ms only the fast class qualifies; under 1 s the cheaper slow class wins.
    rows = {
        line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| <= ")
    }
    assert "cpu-1c" in rows["<= 30 ms"]
    assert "cpu-slow" in rows["<= 1000 ms"]
    assert (out / "cnn.png").read_bytes().startswith(PNG_MAGIC)
    # gCO2 only where the fleet gives power and carbon intensity.
    line = next(row for row in text.splitlines() if row.startswith("| ort-cpu-fp32 | cpu-1c |"))
    assert line.rstrip(" |").split("|")[-1].strip() != "-"


async def test_worker_defaults_to_the_fastest_profiled_variant(
    shop: tuple[Path, Path], tmp_path: Path
) -> None:
    from protos import inference_pb2 as pb
    from protos import inference_pb2_grpc as pb_grpc
    from tests.integration.conftest import launch_worker

    _, repo = shop
    copy = tmp_path / "models"
    shutil.copytree(repo, copy)
    for variant, p50 in [
        ("ort-cpu-fp32", 0.5),
        ("ort-cpu-int8-qdq", 0.1),
        ("ort-cpu-fp16", 0.3),
        ("ort-cpu-int8-dyn", 0.4),
    ]:
        entry = ProfileEntry(
            hardware_class="measured",
            threads=1,
            batch_size=1,
            p50_ms=p50,
            p99_ms=p50 * 2,
            throughput_per_s=1000 / p50,
            runs=10,
        )
        # Eight rows take 2.75 one-row calls: each extra row adds a quarter of a row.
        batch = entry.model_copy(update={"batch_size": 8, "throughput_per_s": 8000 / (p50 * 2.75)})
        write_profile(
            copy / "cnn" / "variants" / variant,
            Profile(model="cnn", variant=variant, entries=[entry, batch]),
        )
    for hardware, expected in [("measured", "ort-cpu-int8-qdq"), ("unmeasured", "ort-cpu-fp32")]:
        worker = await launch_worker(copy, hardware_class=hardware)
        try:
            async with grpc.aio.insecure_channel(worker.address) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                config = (await stub.ModelConfig(pb.ModelConfigRequest(name="cnn"))).config
                assert config.parameters["switchyard_variant"].string_value == expected
                # The gateway's prior: p50, p99 and the row fraction, per profiled variant.
                advertised = parse_profile(
                    config.parameters["switchyard_profile"].string_value
                    if "switchyard_profile" in config.parameters
                    else ""
                )
                if hardware == "measured":
                    assert ("ort-cpu-int8-qdq", 0.1, 0.2, 0.25) in advertised
                    assert len(advertised) == 4
                else:
                    assert advertised == ()
        finally:
            await worker.stop()
