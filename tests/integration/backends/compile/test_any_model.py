"""`switchyard compile` takes any model: the accuracy gate runs on at least 64
samples (given, topped up, or seeded random to each input's datatype), non-float
models get variants named for what they compute in and no reduced-precision ones,
string (BYTES) models compile, checked on sample strings or stated unchecked, and
Triton's example models compile and a worker serves them as Triton does."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest

from backends.compile.compiler import MIN_SAMPLES, compile_model
from backends.compile.variants import (
    EXACT,
    SampleSet,
    check_accuracy,
    compute_type,
)
from backends.demo.triton import BUILDERS, WIDTH, string_samples
from backends.protocol.tensors import TensorSpec, decode_bytes_tensor
from backends.repository import ModelRepository
from backends.runtimes.base import Array
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import launch_worker, output, raw_request

FLOAT_SKIPS = {"ort-cpu-fp16", "ort-cpu-int8-dyn", "ort-cpu-int8-qdq"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("triton")
    for name, build in BUILDERS.items():
        build(root / name)
    return root


def compiled(sources: Path, tmp_path: Path, name: str, calibration: Path | None = None) -> dict:  # type: ignore[type-arg]
    outcomes = compile_model(
        sources / name / "model.onnx", name, ModelRepository(tmp_path), calibration=calibration
    )
    return {o.variant: o for o in outcomes}


@pytest.mark.parametrize(
    ("model", "compute"),
    [("simple", "int32"), ("simple_int8", "int8"), ("simple_string", "int32")],
)
def test_an_integer_model_gets_one_variant_named_for_its_type_checked_exactly(
    sources: Path, tmp_path: Path, model: str, compute: str
) -> None:
    calibration = None
    if model == "simple_string":
        calibration = tmp_path / "strings.npz"
        np.savez(calibration, **string_samples(MIN_SAMPLES))  # type: ignore[arg-type]
    outcomes = compiled(sources, tmp_path, model, calibration)
    name = f"ort-cpu-{compute}"
    assert set(outcomes) == {name} | FLOAT_SKIPS
    for skipped in FLOAT_SKIPS:
        assert outcomes[skipped].status == "skipped"
        assert outcomes[skipped].detail == f"no float tensors: the model computes in {compute}"
    assert outcomes[name].status == "built", outcomes[name].detail
    manifest = outcomes[name].manifest
    assert manifest is not None and manifest.precision == compute
    accuracy = manifest.accuracy
    assert accuracy is not None and accuracy.passed and accuracy.unchecked is None
    assert accuracy.samples == MIN_SAMPLES
    assert accuracy.source == ("calibration" if calibration else "random")
    assert accuracy.max_abs_diff == 0 and accuracy.tolerance_max_abs_diff == 0
    assert outcomes[name].detail == f"64 samples ({accuracy.source}): max |diff| 0"
    assert [v.name for v in ModelRepository(tmp_path).variants(model)] == [name]


def test_an_unbatched_model_gets_seeded_rows_one_whole_input_each(
    sources: Path, tmp_path: Path
) -> None:
    compiled(sources, tmp_path, "simple")
    with np.load(tmp_path / "simple" / "samples" / "inputs.npz") as stored:
        rows = {name: stored[name] for name in stored.files}
    assert set(rows) == {"INPUT0", "INPUT1"}
    for array in rows.values():
        assert array.shape == (MIN_SAMPLES, 1, WIDTH) and array.dtype == np.int32
        assert 0 <= array.min() and array.max() < 16 and len(np.unique(array)) > 1
    again = tmp_path / "again"
    compiled(sources, again, "simple")  # seeded: the same rows
    with np.load(again / "simple" / "samples" / "inputs.npz") as stored:
        assert all(np.array_equal(stored[name], rows[name]) for name in rows)


def test_strings_without_samples_leave_the_variant_unchecked_and_served(
    sources: Path, tmp_path: Path
) -> None:
    outcomes = compiled(sources, tmp_path, "simple_string")
    variant = outcomes["ort-cpu-int32"]
    assert variant.status == "built"
    assert variant.detail == "unchecked: no samples for BYTES input 'INPUT0'"
    assert variant.manifest is not None and variant.manifest.accuracy is not None
    accuracy = variant.manifest.accuracy
    assert accuracy.unchecked == "no samples for BYTES input 'INPUT0'"
    assert accuracy.samples == 0 and accuracy.passed
    # No sample file is written from strings the model does not take.
    assert not (tmp_path / "simple_string" / "samples" / "inputs.npz").exists()


def test_an_identity_over_strings_is_checked_on_seeded_words(sources: Path, tmp_path: Path) -> None:
    outcomes = compiled(sources, tmp_path, "simple_identity")
    assert compute_type(sources / "simple_identity" / "model.onnx") == "bytes"
    variant = outcomes["ort-cpu-bytes"]
    assert variant.status == "built" and variant.manifest is not None
    accuracy = variant.manifest.accuracy
    assert accuracy is not None and accuracy.samples == MIN_SAMPLES
    assert accuracy.source == "random" and accuracy.max_abs_diff == 0
    with np.load(tmp_path / "simple_identity" / "samples" / "inputs.npz") as stored:
        words = stored["INPUT0"]
    assert words.shape == (MIN_SAMPLES, 1) and words.dtype.kind == "S"
    assert len(np.unique(words)) > 10 and all(w.isalpha() for w in words.ravel())


def test_fewer_stored_rows_are_topped_up_to_64_in_their_range(
    repository: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "digits" / "samples"
    folder.mkdir(parents=True)
    with np.load(repository / "digits" / "samples" / "inputs.npz") as stored:
        few = stored["input"][:10]
    np.savez(folder / "inputs.npz", input=few)
    outcomes = {
        o.variant: o
        for o in compile_model(
            repository / "digits" / "model.onnx", "digits", ModelRepository(tmp_path)
        )
    }
    manifest = outcomes["ort-cpu-fp32"].manifest
    assert manifest is not None and manifest.accuracy is not None
    assert manifest.accuracy.samples == MIN_SAMPLES
    assert manifest.accuracy.source == "samples+random"
    assert manifest.accuracy.passed
    with np.load(folder / "inputs.npz") as stored:  # left as it was
        assert np.array_equal(stored["input"], few)


def test_the_demo_models_are_checked_on_their_own_64_rows(repository: Path) -> None:
    for model in ("cnn", "transformer", "magika"):
        for variant in ModelRepository(repository).variants(model):
            accuracy = variant.manifest.accuracy
            assert accuracy is not None, (model, variant.name)
            assert (accuracy.samples, accuracy.source) == (64, "samples"), (model, variant.name)


def test_calibration_that_lacks_an_input_is_refused_naming_it(
    sources: Path, tmp_path: Path
) -> None:
    calibration = tmp_path / "half.npz"
    np.savez(calibration, INPUT0=np.zeros((4, 1, WIDTH), np.int32))
    with pytest.raises(ValueError, match="no array for input 'INPUT1' \\(has: INPUT0\\)"):
        compiled(sources, tmp_path, "simple", calibration)
    np.savez(calibration, INPUT0=np.zeros((4, WIDTH), np.int32), INPUT1=np.zeros(4, np.int32))
    with pytest.raises(ValueError, match="input 'INPUT0' has shape \\[4, 16\\]"):
        compiled(sources, tmp_path, "simple", calibration)


class FixedAnswers:
    """A RuntimeAdapter whose outputs are given, for the comparison alone."""

    def __init__(self, answers: Mapping[str, Array]) -> None:
        self._answers = answers

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("x", "INT32", (-1, 2)),)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(n, "INT32", (-1, 2)) for n in self._answers)

    def run(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> list[Array]:
        return [self._answers[name] for name in outputs]


@pytest.mark.parametrize(
    ("got", "expected", "max_abs_diff"),
    [
        (np.array([[1, 2], [3, 4]], np.int32), np.array([[1, 2], [3, 5]], np.int32), 1.0),
        (np.array([["a", "b"]], object), np.array([["a", "c"]], object), float("inf")),
        (np.array([["a", "b"]], object), np.array([["a", "b"]], object), 0.0),
    ],
)
def test_integer_and_string_outputs_are_compared_exactly(
    got: Array, expected: Array, max_abs_diff: float
) -> None:
    samples = SampleSet({"x": np.zeros((len(got), 2), np.int32)}, len(got), True, "random")
    accuracy = check_accuracy(FixedAnswers({"y": got}), samples, {"y": expected}, EXACT)
    assert accuracy.max_abs_diff == max_abs_diff
    assert accuracy.passed is (max_abs_diff == 0)


def bytes_request(
    model: str, inputs: dict[str, list[bytes]], shape: list[int]
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    for name, items in inputs.items():
        request.inputs.add(
            name=name,
            datatype="BYTES",
            shape=shape,
            contents=pb.InferTensorContents(bytes_contents=items),
        )
    return request


def bytes_output(response: pb.ModelInferResponse, name: str) -> list[bytes]:
    index = [o.name for o in response.outputs].index(name)
    count = int(np.prod(response.outputs[index].shape))
    decoded = decode_bytes_tensor(response.raw_output_contents[index], count)
    assert not isinstance(decoded, str), decoded
    return list(decoded)


async def test_a_worker_serves_each_triton_example_as_triton_does(
    sources: Path, tmp_path: Path
) -> None:
    np.savez(tmp_path / "strings.npz", **string_samples(MIN_SAMPLES))  # type: ignore[arg-type]
    for name in BUILDERS:
        calibration = tmp_path / "strings.npz" if name == "simple_string" else None
        outcomes = compiled(sources, tmp_path / "models", name, calibration)
        assert sum(o.status == "built" for o in outcomes.values()) == 1, outcomes
    a = np.arange(WIDTH, dtype=np.int32).reshape(1, WIDTH)
    b = np.full((1, WIDTH), 3, np.int32)
    worker = await launch_worker(tmp_path / "models")
    try:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for model, dtype, datatype in (
                ("simple", np.int32, "INT32"),
                ("simple_int8", np.int8, "INT8"),
            ):
                reply = await stub.ModelInfer(
                    raw_request(
                        model,
                        {"INPUT0": a.astype(dtype), "INPUT1": b.astype(dtype)},
                        {"INPUT0": datatype, "INPUT1": datatype},
                    )
                )
                assert np.array_equal(output(reply, "OUTPUT0", dtype), (a + b).astype(dtype))
                assert np.array_equal(output(reply, "OUTPUT1", dtype), (a - b).astype(dtype))
            reply = await stub.ModelInfer(
                bytes_request(
                    "simple_string",
                    {
                        "INPUT0": [str(x).encode() for x in a.ravel()],
                        "INPUT1": [b"3"] * WIDTH,
                    },
                    [1, WIDTH],
                )
            )
            assert bytes_output(reply, "OUTPUT0") == [str(x + 3).encode() for x in a.ravel()]
            assert bytes_output(reply, "OUTPUT1") == [str(x - 3).encode() for x in a.ravel()]
            words = [b"switchyard", b"", "\u00e9t\u00e9".encode()]
            reply = await stub.ModelInfer(
                bytes_request("simple_identity", {"INPUT0": words}, [1, 3])
            )
            assert bytes_output(reply, "OUTPUT0") == words
            assert dict(reply.parameters)["switchyard_variant"].string_param == "ort-cpu-bytes"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ModelInfer(
                    bytes_request(
                        "simple_string",
                        {"INPUT0": [b"x"] * WIDTH, "INPUT1": [b"1"] * WIDTH},
                        [1, WIDTH],
                    )
                )
            assert refused.value.code() != grpc.StatusCode.OK
    finally:
        await worker.stop()
