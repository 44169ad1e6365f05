"""Apache TVM variants end to end: real ONNX models compiled with TVM 0.27 (untuned, and
tuned with a tiny MetaSchedule budget for this host's best CPU target), then loaded with
TVM's runtime only in a separate process and checked against the reference outputs.

The compiles run in this process (which therefore holds TVM's compiler); every library is
run in a fresh subprocess that sets up runtime-only TVM, as a worker does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from backends.compile.tvm.build import LIBRARY, TvmBuild, compile_onnx
from backends.compile.tvm.importer import TvmImportError
from backends.compile.tvm.search import TuningUnavailable
from backends.compile.tvm.targets import CUDA_TARGETS, TvmTarget, best_cpu_target, host_cpu_flags
from backends.compile.tvm.toolchain import ToolchainMissing
from backends.compile.tvm.tuning import DEMO_MODELS, check, read_info, records_for
from backends.protocol.tensors import TensorSpec
from backends.runtimes.install import make_runtime_only, runtime_only, tvm_package
from tests import ROOT

TOLERANCE = 1e-4
CNN_SHAPES = {"image": [1, 3, 32, 32]}
CNN_INPUTS = (TensorSpec("image", "FP32", (-1, 3, 32, 32)),)
CNN_OUTPUTS = (TensorSpec("probabilities", "FP32", (-1, 10)),)

# Runs in a fresh interpreter: loads one library with TvmAdapter, runtime-only, runs it on
# the first N sample rows for each N asked, saves the outputs, and reports what it loaded.
RUNNER = """
import json, sys
from pathlib import Path
import numpy as np
from backends.runtimes.tvm import TvmAdapter, use_runtime_only
from backends.protocol.tensors import TensorSpec
from backends.compile.tvm.tuning import read_info, records_for
from backends.protocol.errors import InvalidInput

use_runtime_only()
args = json.loads(sys.argv[1])
specs = lambda items: tuple(TensorSpec(n, d, tuple(s)) for n, d, s in items)
adapter = TvmAdapter(
    Path(args["library"]), specs(args["inputs"]), specs(args["outputs"]),
    args["compiled_batch"], args["threads"], device=args["device"],
)
samples = dict(np.load(args["samples"]))
names = [s.name for s in adapter.outputs]
saved = {}
for rows in args["batches"]:
    results = adapter.run({k: v[:rows] for k, v in samples.items()}, names)
    for name, result in zip(names, results):
        saved[f"{name}@{rows}"] = result
np.savez(args["results"], **saved)
rejected = []
first = adapter.inputs[0]
for bad in ({first.name: samples[first.name][:1].astype(np.float64)}, {}):
    try:
        adapter.run(bad, names)
    except InvalidInput as exc:
        rejected.append(str(exc))
import tvm_ffi
maps = Path("/proc/self/maps").read_text()
print(json.dumps({
    "compiler_mapped": "libtvm_compiler" in maps,
    "runtime_mapped": "libtvm_runtime.so" in maps,
    "runtime_only": adapter.runtime_only,
    "pool_threads": tvm_ffi.get_global_func("runtime.NumThreads")(),
    "rejected": rejected,
}))
"""


@dataclass(frozen=True)
class Run:
    """What the runtime-only subprocess reported."""

    outputs: dict[str, np.ndarray]
    compiler_mapped: bool
    runtime_mapped: bool
    runtime_only: bool
    pool_threads: int
    rejected: list[str]


def spawn_runner(
    library: Path,
    samples: Path,
    scratch: Path,
    *,
    batches: Sequence[int],
    threads: int = 1,
    inputs: tuple[TensorSpec, ...] = CNN_INPUTS,
    outputs: tuple[TensorSpec, ...] = CNN_OUTPUTS,
    device: str = "cpu",
    env: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    results = scratch / f"results-{library.parent.name}-{threads}-{device}.npz"
    args = {
        "library": str(library),
        "inputs": [[s.name, s.datatype, list(s.shape)] for s in inputs],
        "outputs": [[s.name, s.datatype, list(s.shape)] for s in outputs],
        "compiled_batch": 1,
        "threads": threads,
        "device": device,
        "samples": str(samples),
        "batches": list(batches),
        "results": str(results),
    }
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done, results


def run_runtime_only(
    library: Path,
    samples: Path,
    scratch: Path,
    *,
    batches: Sequence[int],
    threads: int = 1,
    inputs: tuple[TensorSpec, ...] = CNN_INPUTS,
    outputs: tuple[TensorSpec, ...] = CNN_OUTPUTS,
    device: str = "cpu",
    env: dict[str, str] | None = None,
) -> Run:
    done, results = spawn_runner(
        library,
        samples,
        scratch,
        batches=batches,
        threads=threads,
        inputs=inputs,
        outputs=outputs,
        device=device,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    with np.load(results) as saved:
        arrays = {k: saved[k] for k in saved.files}
    return Run(outputs=arrays, **report)


def assert_matches_reference(run: Run, reference: Path, batches: Sequence[int]) -> None:
    with np.load(reference) as ref:
        for rows in batches:
            for name in ref.files:
                got = run.outputs[f"{name}@{rows}"]
                assert got.shape == ref[name][:rows].shape
                np.testing.assert_allclose(got, ref[name][:rows], rtol=0, atol=TOLERANCE)


@pytest.fixture(scope="module")
def host_target() -> TvmTarget:
    return best_cpu_target(host_cpu_flags())


@pytest.fixture(scope="module")
def cnn(repository: Path) -> Path:
    return repository / "cnn" / "model.onnx"


@pytest.fixture(scope="module")
def untuned(
    cnn: Path, host_target: TvmTarget, tmp_path_factory: pytest.TempPathFactory
) -> TvmBuild:
    out = tmp_path_factory.mktemp("untuned")
    return compile_onnx(cnn, out, host_target, CNN_SHAPES, tuning_dir=None, trials=0)


@pytest.fixture(scope="module")
def tuning_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tuning")


@pytest.fixture(scope="module")
def tuned(
    cnn: Path, host_target: TvmTarget, tuning_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> TvmBuild:
    out = tmp_path_factory.mktemp("tuned")
    # One trial asked for: raised to one per task.
    return compile_onnx(cnn, out, host_target, CNN_SHAPES, tuning_dir=tuning_dir, trials=1, seed=0)


def tuning_records(tuning_dir: Path, target: TvmTarget) -> list[str]:
    path = tuning_dir / target.name / "database_tuning_record.json"
    return [line for line in path.read_text().splitlines() if line.strip()]


def test_importing_the_compiler_module_does_not_import_tvm() -> None:
    code = (
        "import sys, backends.compile.tvm.build, backends.runtimes.tvm; print('tvm' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "False"


def test_tuning_loads_only_the_x86_tensor_intrinsics() -> None:
    """MetaSchedule's tune contexts import every tensor intrinsic TVM has (CUDA's alone
    takes about 19 s on a 2-core Zen 3); tuning, for x86 targets only, loads x86's, and
    the real package is importable whole afterwards."""
    code = (
        "import sys\n"
        "from backends.compile.tvm.search import TENSOR_INTRINSICS, _x86_tensor_intrinsics_only\n"
        "with _x86_tensor_intrinsics_only():\n"
        "    import tvm.s_tir.tensor_intrin as ti\n"
        "    loaded = sorted(m.rsplit('.', 1)[1] for m in sys.modules\n"
        "                    if m.startswith(TENSOR_INTRINSICS + '.'))\n"
        "    print(loaded, hasattr(ti, 'x86'))\n"
        "print(TENSOR_INTRINSICS in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.split("\n")[:2] == ["['x86'] True", "False"]


def test_untuned_library_runs_runtime_only(
    untuned: TvmBuild, host_target: TvmTarget, repository: Path, tmp_path: Path
) -> None:
    assert untuned.library.name == LIBRARY and untuned.library.is_file()
    assert (untuned.tuned, untuned.trials, untuned.tasks) == (False, 0, 0)
    assert untuned.target == host_target
    assert untuned.input_shapes == CNN_SHAPES
    assert untuned.output_shapes == {"probabilities": [1, 10]}
    assert untuned.tvm_version.startswith("0.27")
    samples = repository / "cnn" / "samples"
    run = run_runtime_only(untuned.library, samples / "inputs.npz", tmp_path, batches=[1, 5])
    assert run.runtime_only and run.runtime_mapped and not run.compiler_mapped
    assert run.pool_threads == 1
    assert_matches_reference(run, samples / "reference.npz", [1, 5])
    assert len(run.rejected) == 2
    assert "float64" in run.rejected[0] and "missing input 'image'" in run.rejected[1]


def test_tuned_library_covers_every_task(
    tuned: TvmBuild, tuning_dir: Path, host_target: TvmTarget, repository: Path, tmp_path: Path
) -> None:
    assert tuned.tuned and not tuned.tuning_reused
    assert tuned.tasks >= 2
    assert tuned.trial_budget == tuned.tasks  # raised from 1: one trial per task
    assert 1 <= tuned.trials <= tuned.trial_budget
    assert len(tuning_records(tuning_dir, host_target)) == tuned.trials
    samples = repository / "cnn" / "samples"
    run = run_runtime_only(
        tuned.library, samples / "inputs.npz", tmp_path, batches=[1, 5, 32], threads=2
    )
    assert run.runtime_only and not run.compiler_mapped
    assert run.pool_threads == 2
    assert_matches_reference(run, samples / "reference.npz", [1, 5, 32])


def test_second_compile_reuses_tuning_records(
    tuned: TvmBuild,
    cnn: Path,
    host_target: TvmTarget,
    tuning_dir: Path,
    repository: Path,
    tmp_path: Path,
) -> None:
    records = tuning_records(tuning_dir, host_target)
    again = compile_onnx(
        cnn, tmp_path / "again", host_target, CNN_SHAPES, tuning_dir=tuning_dir, trials=1
    )
    assert again.tuned and again.tuning_reused
    assert again.trials == 0
    assert again.tasks == tuned.tasks
    assert tuning_records(tuning_dir, host_target) == records  # nothing measured
    samples = repository / "cnn" / "samples"
    run = run_runtime_only(again.library, samples / "inputs.npz", tmp_path, batches=[5])
    assert_matches_reference(run, samples / "reference.npz", [5])


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_committed_demo_records_apply_without_tuning(
    cnn: Path, host_target: TvmTarget, repository: Path, tmp_path: Path
) -> None:
    """The records committed for the demo cnn are copied into a fresh tuning folder and
    applied: no trial runs, and the committed folder is only read. (One trial per task is
    asked for, so records that no longer match the model cost seconds, not a tuning run.)"""
    records = records_for("cnn")
    info = read_info(records / host_target.name) if records else None
    if records is None or info is None:
        pytest.skip(f"no committed cnn records for {host_target.name}")
    committed = folder_bytes(records / host_target.name)
    build = compile_onnx(
        cnn,
        tmp_path / "out",
        host_target,
        CNN_SHAPES,
        tuning_dir=tmp_path / "tuning",
        trials=info.tasks,
        records_from=records,
    )
    assert build.tuned and build.tuning_reused and build.trials == 0
    assert build.tasks == info.tasks
    assert folder_bytes(records / host_target.name) == committed
    samples = repository / "cnn" / "samples"
    run = run_runtime_only(build.library, samples / "inputs.npz", tmp_path, batches=[1])
    assert_matches_reference(run, samples / "reference.npz", [1])


def test_ai_onnx_ml_model_is_refused_by_name(
    repository: Path, host_target: TvmTarget, tmp_path: Path
) -> None:
    with pytest.raises(TvmImportError, match=r"ai\.onnx\.ml operators \(LinearClassifier"):
        compile_onnx(
            repository / "digits" / "model.onnx",
            tmp_path,
            host_target,
            {"input": [1, 64]},
            tuning_dir=None,
            trials=0,
        )
    assert not (tmp_path / LIBRARY).exists()


def test_dynamic_input_needs_a_shape(cnn: Path, host_target: TvmTarget, tmp_path: Path) -> None:
    with pytest.raises(TvmImportError, match="'image' has dynamic dimensions"):
        compile_onnx(cnn, tmp_path, host_target, {}, tuning_dir=None, trials=0)
    with pytest.raises(TvmImportError, match="does not fit the model at dimension 1"):
        compile_onnx(
            cnn, tmp_path, host_target, {"image": [1, 4, 32, 32]}, tuning_dir=None, trials=0
        )


def test_onnx_runtime_folds_what_tvm_cannot_import(host_target: TvmTarget, tmp_path: Path) -> None:
    """HannWindow (no TVM converter) of a constant size folds into a constant under ONNX
    Runtime's basic optimisation, which TVM then imports."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("HannWindow", ["size"], ["window"], output_datatype=TensorProto.FLOAT),
            helper.make_node("Mul", ["x", "window"], ["y"]),
        ],
        "windowed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        initializer=[helper.make_tensor("size", TensorProto.INT64, [], [16])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    source = tmp_path / "windowed.onnx"
    onnx.save(model, source)
    build = compile_onnx(
        source, tmp_path / "out", host_target, {"x": [1, 16]}, tuning_dir=None, trials=0
    )
    assert build.imported_via_ort
    x = np.random.default_rng(3).random((3, 16), dtype=np.float32)
    n = np.arange(16)
    expected = x * (0.5 - 0.5 * np.cos(2 * np.pi * n / 16)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    spec = (TensorSpec("x", "FP32", (-1, 16)),)
    out_spec = (TensorSpec("y", "FP32", (-1, 16)),)
    run = run_runtime_only(
        build.library, tmp_path / "x.npz", tmp_path, batches=[3], inputs=spec, outputs=out_spec
    )
    np.testing.assert_allclose(run.outputs["y@3"], expected, rtol=0, atol=1e-6)


def test_cuda_cross_compile(cnn: Path, repository: Path, tmp_path: Path) -> None:
    target = CUDA_TARGETS["cuda-sm_90"]
    try:
        build = compile_onnx(cnn, tmp_path, target, CNN_SHAPES, tuning_dir=None, trials=0)
    except ToolchainMissing as exc:
        pytest.skip(f"no CUDA toolchain here: {exc}")
    assert build.library.is_file() and build.target == target
    assert b"__global__" in build.library.read_bytes()  # the kernels travel in the library
    with pytest.raises(TuningUnavailable, match="cuda-sm_90"):
        compile_onnx(cnn, tmp_path / "tuned", target, CNN_SHAPES, tuning_dir=tmp_path, trials=4)
    # Loaded runtime-only on CUDA: runs where there is a GPU, says why not elsewhere.
    samples = repository / "cnn" / "samples"
    done, results = spawn_runner(
        build.library, samples / "inputs.npz", tmp_path, batches=[1, 5], device="cuda"
    )
    if done.returncode != 0:
        if "No module named 'cuda'" in done.stderr:
            pytest.skip("a CUDA device is here, but not cuda-bindings (NVRTC) to load kernels")
        assert "libtvm_runtime_cuda" in done.stderr or "no CUDA device 0" in done.stderr
        return
    with np.load(results) as saved, np.load(samples / "reference.npz") as ref:
        for rows in (1, 5):
            np.testing.assert_allclose(
                saved[f"probabilities@{rows}"], ref["probabilities"][:rows], rtol=0, atol=TOLERANCE
            )


def test_runtime_only_cannot_follow_the_compiler() -> None:
    import tvm  # type: ignore[import-untyped, unused-ignore]  # as a compile process does

    from backends.runtimes.tvm import use_runtime_only

    assert tvm.__version__ and "libtvm_compiler" in Path("/proc/self/maps").read_text()
    with pytest.raises(RuntimeError, match="already imported with its compiler"):
        use_runtime_only()


@pytest.mark.parametrize("model", DEMO_MODELS)
def test_committed_records_fit_every_task_of_the_demo_model(
    model: str, host_target: TvmTarget, repository: Path
) -> None:
    """Every task of the demo model as the compiler sees it now (graph rewrites and all)
    has a budget in the committed records, so `make models-tvm` never tunes, and every
    committed schedule replays on its task (`python -m backends.compile.tvm.tuning check`)."""
    records = records_for(model)
    if records is None or not (records / host_target.name).is_dir():
        pytest.skip(f"no committed {model} records for {host_target.name}")
    (line,), ok = check(repository, [model])
    assert ok, line
    assert line.startswith(f"{model}: the records fit all ")


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)  # the 260 MB compiler library is not copied
    except OSError:
        shutil.copy2(source, destination)


def test_runtime_only_install_runs_tuned_libraries_and_refuses_to_compile(
    tuned: TvmBuild, host_target: TvmTarget, repository: Path, tmp_path: Path
) -> None:
    """A backend's install made runtime-only (`python -m backends.runtimes.install runtime-only`
    on a copy of this install's tvm package): the compiler library is gone, a worker's
    adapter still runs a tuned library from it, and compiling says TVM is runtime-only."""
    package = tvm_package()
    assert package is not None
    site = tmp_path / "site"
    shutil.copytree(package, site / "tvm", copy_function=_link_or_copy)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "backends.runtimes.install",
            "runtime-only",
            "--site-packages",
            str(site),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "TVM's compiler removed" in done.stdout
    assert not (site / "tvm" / "lib" / "libtvm_compiler.so").exists()
    assert (package / "lib" / "libtvm_compiler.so").is_file()  # this install untouched
    assert runtime_only(site / "tvm") and make_runtime_only(site / "tvm") == 0

    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}
    samples = repository / "cnn" / "samples"
    run = run_runtime_only(tuned.library, samples / "inputs.npz", tmp_path, batches=[1, 3], env=env)
    assert run.runtime_only and run.runtime_mapped and not run.compiler_mapped
    assert_matches_reference(run, samples / "reference.npz", [1, 3])

    code = (
        "import tvm_ffi, sys; from pathlib import Path\n"
        "from backends.compile.tvm.build import compile_onnx\n"
        "from backends.compile.tvm.targets import best_cpu_target, host_cpu_flags\n"
        "from backends.compile.tvm.toolchain import ToolchainMissing\n"
        "try:\n"
        f"    compile_onnx(Path({str(repository / 'cnn' / 'model.onnx')!r}), "
        f"Path({str(tmp_path / 'out')!r}), best_cpu_target(host_cpu_flags()), "
        f"{CNN_SHAPES!r}, tuning_dir=None, trials=0)\n"
        "except ToolchainMissing as exc:\n"
        "    print('refused:', exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert "refused:" in done.stdout and "runtime-only" in done.stdout, done.stderr


def _exp_sum_model(path: Path, *, first: bool) -> Path:
    """y = sum(exp(x)); with `first`, an unrelated Relu+Sigmoid output computed before
    it, which renames the reduction's block (`lv_red` -> `lv1_red`) while the fused
    exp-sum task keeps its structure, and so its tuning-record key."""
    nodes = []
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]
    if first:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [1, 64]))
        outputs.append(helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 64]))
        nodes += [helper.make_node("Relu", ["w"], ["r"]), helper.make_node("Sigmoid", ["r"], ["v"])]
    nodes += [
        helper.make_node("Exp", ["x"], ["e"]),
        helper.make_node("ReduceSum", ["e", "axes"], ["y"], keepdims=0),
    ]
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph(nodes, "exp_sum", inputs, outputs, [axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_records_of_an_older_graph_are_moved_aside_not_applied(
    host_target: TvmTarget, tmp_path: Path
) -> None:
    """A tuning folder made for one graph, then the model changes so a tuned task keeps
    its key but its reduction is renamed, and a compile asks for more trials: the folder
    is moved aside and tuning starts afresh. (Tuning on top of it wrote schedules naming
    `lv1_red` under the workload stored with `lv_red`, and the database then failed to
    load: the compile died.)"""
    tuning = tmp_path / "tuning"
    old = _exp_sum_model(tmp_path / "old.onnx", first=False)
    built = compile_onnx(
        old, tmp_path / "a", host_target, {"x": [1, 256]}, tuning_dir=tuning, trials=1, seed=0
    )
    assert built.tuned and built.trials >= 1
    new = _exp_sum_model(tmp_path / "new.onnx", first=True)
    messages: list[str] = []
    again = compile_onnx(
        new,
        tmp_path / "b",
        host_target,
        {"x": [1, 256], "w": [1, 64]},
        tuning_dir=tuning,
        trials=4,  # two per task: the exp-sum task is searched again
        seed=0,
        progress=messages.append,
    )
    assert again.tuned and not again.tuning_reused and again.trials >= 1
    assert any("tuned on an older graph" in m for m in messages), messages
    assert [p.name for p in tuning.iterdir() if ".stale-" in p.name]
