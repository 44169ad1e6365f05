"""`switchyard compile --fleet`: the CLI builds ONNX Runtime and the TVM targets the
fleet's hardware classes need, and nothing else (untuned, so no tuning runs); then it
measures each variant this host can serve and writes its profile under the hardware
class this host stands for (or the fleet's classes of its level), named in its table."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import yaml

from backends.compile.cpu import int8_dot_products
from backends.compile.tvm.targets import host_cpu_flags
from backends.demo.convnets import build_cnn
from backends.profiles import profile_entry, read_profile
from backends.repository import ModelRepository
from tests.e2e.conftest import ROOT, SWITCHYARD

ORT_VARIANTS = ["ort-cpu-fp16", "ort-cpu-fp32", "ort-cpu-int8-dyn", "ort-cpu-int8-qdq"]
AVX512 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


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
        "--profile-runs",
        "3",
    )
    avx512_here = AVX512 <= host_cpu_flags()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cpu-x86-64-v4-1c -> tvm-llvm-avx512, cpu-x86-64-v4-2c -> tvm-llvm-avx512" in proc.stdout
    assert "targets: ort tvm-llvm-avx512 ort-cuda\n" in proc.stdout
    variants = {v.name: v.manifest for v in ModelRepository(tmp_path / "models").variants("cnn")}
    tvm = "tvm-llvm-avx512-fp32-untuned"
    assert "ort-cuda-fp32" in proc.stdout  # built, or skipped with the reason
    assert sorted(v for v in variants if v != "ort-cuda-fp32") == sorted([*ORT_VARIANTS, tvm])
    assert variants[tvm].target == "llvm-avx512"
    assert "avx512f" in variants[tvm].required_cpu_flags
    if not avx512_here:  # built for the fleet, never run here (it would die of SIGILL)
        row = next(line for line in proc.stdout.splitlines() if line.startswith(f"│ {tvm} "))
        assert "not checked: this CPU lacks avx512" in row, proc.stdout
        assert variants[tvm].accuracy is None
    # Measured as each class of the fleet this host stands for, at its cores; on a host
    # without AVX-512, as the host's own class (the fleet's are not its level).
    cores = len(os.sched_getaffinity(0))
    classes = (
        {c: t for c, t in (("cpu-x86-64-v4-1c", 1), ("cpu-x86-64-v4-2c", 2)) if t <= cores}
        if avx512_here
        else {host_class(): 1}
    )
    measured = measured_classes(tmp_path / "models", "cnn")
    assert measured["ort-cpu-fp32"] == {(c, t, b) for c, t in classes.items() for b in (1, 8)}
    if avx512_here:  # untuned TVM: measured at batch 1 only, and marked so in the table
        assert measured[tvm] == {(c, t, 1) for c, t in classes.items()}
        row = next(line for line in proc.stdout.splitlines() if line.startswith(f"│ {tvm} "))
        assert "(untuned)" in row
    assert "ort-cuda-fp32" not in measured


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


def test_tritons_example_models_compile_and_serve_through_the_gateway(tmp_path: Path) -> None:
    """simple, simple_int8, simple_string (checked on the sample strings written beside
    it) and simple_identity: compiled by the CLI, served by a launched worker, answered
    through the gateway as Triton answers them."""
    import grpc
    import numpy as np

    from backends.protocol.tensors import decode_bytes_tensor
    from protos import inference_pb2 as pb
    from protos import inference_pb2_grpc as pb_grpc
    from tests.e2e.conftest import start_serve, stop, write_fleet

    sources, repository = tmp_path / "triton", tmp_path / "models"
    made = subprocess.run(
        [SWITCHYARD[0], "-m", "backends.demo.triton", str(sources)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert made.returncode == 0, made.stderr
    expected = {
        "simple": ("ort-cpu-int32", "64 random"),
        "simple_int8": ("ort-cpu-int8", "64 random"),
        "simple_string": ("ort-cpu-int32", "64 calibration"),
        "simple_identity": ("ort-cpu-bytes", "64 random"),
    }
    for name, (variant, samples) in expected.items():
        calibration = ["--calibration", str(sources / name / "samples.npz")]
        proc = compile_cli(
            str(sources / name / "model.onnx"),
            "--name",
            name,
            "--repository",
            str(repository),
            *(calibration if name == "simple_string" else []),
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr
        row = next(line for line in proc.stdout.splitlines() if variant in line)
        assert "built" in row and samples in row and "max |diff| 0" in row, proc.stdout
        assert "ort-cpu-fp16" in proc.stdout and "no float tensors" in proc.stdout

    fleet = write_fleet(
        tmp_path / "fleet.yaml",
        repository,
        [
            {
                "name": "cpu",
                "address": "127.0.0.1:0",
                "hardware_class": "cpu-1c",
                "price_usd_per_hour": 0.04,
                "launch": {"threads": 1},
            }
        ],
    )
    gateway = start_serve(fleet, tmp_path)
    try:
        with grpc.insecure_channel(gateway.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            a = np.arange(16, dtype=np.int32).reshape(1, 16)
            for model, dtype, datatype in (
                ("simple", np.int32, "INT32"),
                ("simple_int8", np.int8, "INT8"),
            ):
                request = pb.ModelInferRequest(model_name=model)
                for name, array in (("INPUT0", a), ("INPUT1", np.ones_like(a))):
                    request.inputs.add(name=name, datatype=datatype, shape=[1, 16])
                    request.raw_input_contents.append(array.astype(dtype).tobytes())
                reply = stub.ModelInfer(request, timeout=30)
                sums = np.frombuffer(reply.raw_output_contents[0], dtype)
                differences = np.frombuffer(reply.raw_output_contents[1], dtype)
                assert [o.name for o in reply.outputs] == ["OUTPUT0", "OUTPUT1"]
                assert sums.tolist() == (a + 1).ravel().tolist()
                assert differences.tolist() == (a - 1).ravel().tolist()
            numbers = [str(x).encode() for x in a.ravel()]
            for model, inputs, outputs in (
                (
                    "simple_string",
                    {"INPUT0": numbers, "INPUT1": [b"1"] * 16},
                    {
                        "OUTPUT0": [str(x + 1).encode() for x in a.ravel()],
                        "OUTPUT1": [str(x - 1).encode() for x in a.ravel()],
                    },
                ),
                ("simple_identity", {"INPUT0": numbers}, {"OUTPUT0": numbers}),
            ):
                request = pb.ModelInferRequest(model_name=model)
                for name, items in inputs.items():
                    request.inputs.add(
                        name=name,
                        datatype="BYTES",
                        shape=[1, 16],
                        contents=pb.InferTensorContents(bytes_contents=items),
                    )
                reply = stub.ModelInfer(request, timeout=30)
                for index, out in enumerate(reply.outputs):
                    got = decode_bytes_tensor(reply.raw_output_contents[index], 16)
                    assert not isinstance(got, str), got
                    assert list(got) == outputs[out.name], model
                assert {o.name for o in reply.outputs} == set(outputs)
    finally:
        stop(gateway)


def host_class() -> str:
    """This host's one-core hardware class as the fleet names it: x86-64-v4 with
    AVX-512, v3 with AVX2, else v2 or v1."""
    flags = host_cpu_flags()
    if AVX512 <= flags:
        return "cpu-x86-64-v4-1c"
    if "avx2" in flags:
        return "cpu-x86-64-v3-1c"
    return "cpu-x86-64-v2-1c" if {"sse4_2", "popcnt"} <= flags else "cpu-x86-64-v1-1c"


def measured_classes(root: Path, model: str) -> dict[str, set[tuple[str, int, int]]]:
    """(hardware class, threads, batch size) of each profiled variant's entries."""
    found = {}
    for variant in ModelRepository(root).variants(model):
        profile = read_profile(variant)
        if profile is not None:
            found[variant.name] = {
                (e.hardware_class, e.threads, e.batch_size) for e in profile.entries
            }
    return found


def test_compile_profiles_what_it_built_as_this_hosts_class(tmp_path: Path) -> None:
    """No `switchyard profile`: compile writes each servable variant's profile at batch 1
    and 8 under this host's class, its table gives the p50s and names the class, and a
    variant that failed its accuracy check is not measured."""
    build_cnn(tmp_path / "source")
    root = tmp_path / "models"
    proc = compile_cli(
        str(tmp_path / "source" / "model.onnx"),
        "--name",
        "cnn",
        "--repository",
        str(root),
        # The model's own sample images: random noise sits on class boundaries, where
        # int8's top-1 agreement says little.
        "--calibration",
        str(tmp_path / "source" / "samples" / "inputs.npz"),
        "--profile-runs",
        "5",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cls = host_class()
    variants = ModelRepository(root).variants("cnn")
    passed = {v.name for v in variants if v.manifest.accuracy and v.manifest.accuracy.passed}
    assert passed >= {"ort-cpu-fp32", "ort-cpu-int8-qdq"}, proc.stdout
    # int8 built for this CPU: 8-bit weights where its int8 products are exact, else 7.
    qdq = next(v.manifest for v in variants if v.name == "ort-cpu-int8-qdq")
    exact = int8_dot_products(host_cpu_flags()) == "exact"
    assert qdq.int8_weight_bits == (8 if exact else 7)
    assert qdq.accuracy is not None
    assert qdq.accuracy.int8_dot == ("exact" if exact else "never-saturates")
    assert measured_classes(root, "cnn") == {v: {(cls, 1, 1), (cls, 1, 8)} for v in passed}
    assert re.search(rf"p50 ms\s*{cls}", proc.stdout), proc.stdout  # the column header
    text = " ".join(proc.stdout.split())
    assert f"p50 ms at batch 1, measured as {cls} (1 thread) on this host" in text, text
    for variant in variants:
        row = next(
            line for line in proc.stdout.splitlines() if line.startswith(f"│ {variant.name} ")
        )
        profile = read_profile(variant)
        if profile is None:
            continue
        entry = profile_entry(profile, cls, 1)
        assert entry is not None and entry.runs == 5
        assert f"│ {entry.p50_ms:.3g} " in row, row


def test_no_profile_builds_without_measuring(tmp_path: Path) -> None:
    build_cnn(tmp_path / "source")
    proc = compile_cli(
        str(tmp_path / "source" / "model.onnx"),
        "--name",
        "cnn",
        "--repository",
        str(tmp_path / "models"),
        "--no-profile",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert measured_classes(tmp_path / "models", "cnn") == {}
    assert "not measured (--no-profile)" in " ".join(proc.stdout.split())
    assert "p50 ms" not in proc.stdout  # no column of figures
