"""An int8 ONNX Runtime variant's accuracy holds where its products are computed as they
were when it was checked: VNNI and AMX sum uint8 x int8 products exactly, other x86-64
CPUs (AVX2's vpmaddubsw) in int16, which saturates. Compile builds 7-bit weights (never
saturating) on such a CPU, and records how the check's CPU multiplied; a worker without
VNNI refuses an 8-bit variant whose check ran with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.compile.compiler import default_int8_weight_bits
from backends.compile.cpu import int8_dot_products
from backends.repository import AccuracyEntry, ArtifactEntry, Manifest, TensorEntry, Variant
from backends.worker.served import WorkerSettings, refused_by_policy

ZEN3 = frozenset({"sse2", "avx", "avx2", "fma"})
SAPPHIRE_RAPIDS = ZEN3 | {"avx512f", "avx512bw", "avx512_vnni", "amx_int8"}
SKYLAKE_X = ZEN3 | {"avx512f", "avx512bw", "avx512dq", "avx512vl"}  # AVX-512, no VNNI
ALDER_LAKE = ZEN3 | {"avx_vnni"}
TENSOR = [TensorEntry(name="x", datatype="FP32", shape=[-1, 4])]


@pytest.mark.parametrize(
    ("flags", "dot", "bits"),
    [
        (ZEN3, "saturating", 7),
        (SKYLAKE_X, "saturating", 7),
        (SAPPHIRE_RAPIDS, "exact", 8),
        (ALDER_LAKE, "exact", 8),
        (frozenset(), None, 7),  # not x86-64's flags: nothing known, so 7 to be safe
    ],
)
def test_a_cpus_int8_products_and_the_weights_built_for_it(
    flags: frozenset[str], dot: str | None, bits: int
) -> None:
    assert int8_dot_products(flags) == dot
    assert default_int8_weight_bits(flags) == bits


def int8_variant(int8_dot: str | None, passed: bool = True) -> Variant:
    accuracy = AccuracyEntry(
        samples=64,
        source="samples",
        max_abs_diff=0.05,
        top1_agreement=1.0,
        tolerance_max_abs_diff=0.25,
        min_top1_agreement=0.99,
        passed=passed,
        int8_dot=int8_dot,
    )
    manifest = Manifest(
        model="m",
        variant="ort-cpu-int8-qdq",
        runtime="onnxruntime",
        runtime_version="1",
        target="cpu",
        precision="int8",
        max_batch_size=8,
        inputs=TENSOR,
        outputs=TENSOR,
        artifacts=[ArtifactEntry(path="model.onnx", sha256="0" * 64)],
        source_sha256="0" * 64,
        accuracy=accuracy,
        int8_weight_bits=7 if int8_dot == "never-saturates" else 8,
    )
    return Variant("m", "ort-cpu-int8-qdq", Path("/nonexistent"), manifest)


@pytest.mark.parametrize(
    ("checked", "worker", "refused"),
    [
        ("exact", ZEN3, True),  # checked with VNNI, served without: refused
        ("exact", SKYLAKE_X, True),
        ("exact", SAPPHIRE_RAPIDS, False),
        ("exact", ALDER_LAKE, False),
        ("saturating", SAPPHIRE_RAPIDS, False),  # VNNI computes it exactly: closer still
        ("saturating", ZEN3, False),
        ("never-saturates", ZEN3, False),
        ("never-saturates", SAPPHIRE_RAPIDS, False),
        (None, ZEN3, False),  # a manifest from before the record: served as it was
    ],
)
def test_a_worker_refuses_an_int8_check_its_cpu_cannot_repeat(
    checked: str | None, worker: frozenset[str], refused: bool
) -> None:
    why = refused_by_policy(int8_variant(checked), WorkerSettings(Path("/nonexistent")), worker)
    if refused:
        assert why is not None
        assert "int8 dot products are exact (VNNI)" in why
        assert "compile it on this hardware" in why
    else:
        assert why is None


def test_a_failed_check_is_refused_for_its_failure_first() -> None:
    why = refused_by_policy(
        int8_variant("exact", passed=False), WorkerSettings(Path("/nonexistent")), ZEN3
    )
    assert why is not None and why.startswith("failed its accuracy check")
