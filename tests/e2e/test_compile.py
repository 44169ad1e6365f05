"""`switchyard compile --fleet`: the CLI builds ONNX Runtime and the TVM targets the
fleet's hardware classes need, and nothing else (untuned, so no tuning runs)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from backends.compile.tvm.targets import host_cpu_flags
from backends.demo.convnets import build_cnn
from backends.repository import ModelRepository
from tests.e2e.conftest import ROOT, SWITCHYARD

ORT_VARIANTS = ["ort-cpu-fp16", "ort-cpu-fp32", "ort-cpu-int8-dyn", "ort-cpu-int8-qdq"]


def fleet_file(path: Path, hardware_classes: dict[str, str | None]) -> Path:
    """A fleet of remote backends, one per name, of the given classes (None: the default)."""
    backends = [
        {"name": name, "address": f"127.0.0.1:{9100 + i}"}
        | ({"hardware_class": cls} if cls else {})
        for i, (name, cls) in enumerate(hardware_classes.items())
    ]
    path.write_text(yaml.safe_dump({"backends": backends}))
    return path


def compile_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SWITCHYARD, "compile", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )


def test_fleet_of_v4_cpus_builds_ort_and_avx512_only(tmp_path: Path) -> None:
    build_cnn(tmp_path / "source")
    fleet = fleet_file(
        tmp_path / "fleet.yaml", {"small": "cpu-x86-64-v4-1c", "big": "cpu-x86-64-v4-2c"}
    )
    proc = compile_cli(
        str(tmp_path / "source" / "model.onnx"),
        "--name",
        "cnn",
        "--repository",
        str(tmp_path / "models"),
        "--fleet",
        str(fleet),
        "--targets",
        "ort-cuda",
    )
    avx512_here = {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= host_cpu_flags()
    assert proc.returncode == (0 if avx512_here else 1), proc.stdout + proc.stderr
    assert "cpu-x86-64-v4-1c -> tvm-llvm-avx512, cpu-x86-64-v4-2c -> tvm-llvm-avx512" in proc.stdout
    assert "targets: ort tvm-llvm-avx512 ort-cuda\n" in proc.stdout
    variants = {v.name: v.manifest for v in ModelRepository(tmp_path / "models").variants("cnn")}
    tvm = "tvm-llvm-avx512-fp32-untuned"
    assert "ort-cuda-fp32" in proc.stdout  # built, or skipped with the reason
    assert sorted(v for v in variants if v != "ort-cuda-fp32") == sorted([*ORT_VARIANTS, tvm])
    assert variants[tvm].target == "llvm-avx512"
    assert "avx512f" in variants[tvm].required_cpu_flags


def test_a_class_without_a_target_fails_before_building(tmp_path: Path) -> None:
    build_cnn(tmp_path / "source")
    fleet = fleet_file(tmp_path / "fleet.yaml", {"big": "cpu-x86-64-v4-2c", "plain": None})
    proc = compile_cli(
        str(tmp_path / "source" / "model.onnx"),
        "--name",
        "cnn",
        "--repository",
        str(tmp_path / "models"),
        "--fleet",
        str(fleet),
    )
    assert proc.returncode == 2
    assert "backend plain: no TVM target for hardware class 'cpu'" in proc.stdout
    assert not (tmp_path / "models").exists()


def test_help_documents_fleet() -> None:
    proc = subprocess.run(
        [*SWITCHYARD, "compile", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"COLUMNS": "100", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0
    assert "--fleet FILE" in proc.stdout and "tvm-llvm-avx512" in proc.stdout
