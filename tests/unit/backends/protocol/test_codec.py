"""Request validation and tensor encoding against a model signature (no server)."""

from __future__ import annotations

import math
import random
import struct

import numpy as np
import pytest

from backends.protocol.codec import Signature, decode_request, encode_response, zeros_request
from backends.protocol.errors import InvalidInput
from backends.protocol.tensors import (
    MAX_ELEMENTS,
    MAX_RANK,
    TensorSpec,
    decode_bytes_tensor,
    encode_bytes_tensor,
    shape_problem,
)
from protos import inference_pb2 as pb

SIG = Signature(
    inputs=(TensorSpec("x", "FP32", (-1, 4)), TensorSpec("n", "INT8", (-1, 2))),
    outputs=(TensorSpec("y", "FP32", (-1, 4)),),
    max_batch_size=8,
)


def raw_request(
    shapes: dict[str, list[int]] | None = None, **overrides: bytes
) -> pb.ModelInferRequest:
    shapes = shapes or {"x": [2, 4], "n": [2, 2]}
    req = pb.ModelInferRequest(model_name="m")
    data = {
        "x": np.zeros(shapes["x"], np.float32).tobytes() if "x" in shapes else b"",
        "n": np.zeros(shapes["n"], np.int8).tobytes() if "n" in shapes else b"",
    }
    data.update(overrides)
    for name, shape in shapes.items():
        req.inputs.add(name=name, datatype="FP32" if name == "x" else "INT8", shape=shape)
        req.raw_input_contents.append(data[name])
    return req


def test_valid_raw_request_decodes_without_copy() -> None:
    req = raw_request()
    decoded = decode_request(req, SIG)
    assert decoded.inputs["x"].shape == (2, 4)
    assert decoded.inputs["x"].dtype == np.float32
    assert decoded.batch_size == 2
    assert decoded.outputs == ["y"]
    assert decoded.raw_output


def test_typed_request_decodes() -> None:
    req = pb.ModelInferRequest(model_name="m")
    x = req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    x.contents.fp32_contents.extend([1, 2, 3, 4])
    n = req.inputs.add(name="n", datatype="INT8", shape=[1, 2])
    n.contents.int_contents.extend([-128, 127])
    decoded = decode_request(req, SIG)
    assert decoded.inputs["n"].tolist() == [[-128, 127]]
    assert decoded.raw_output  # raw outputs by default, as Triton answers
    req.parameters["binary_data_output"].bool_param = False
    assert not decode_request(req, SIG).raw_output
    del req.parameters["binary_data_output"]
    req.outputs.add(name="y").parameters["binary_data"].bool_param = False
    assert not decode_request(req, SIG).raw_output


def _err(req: pb.ModelInferRequest) -> str:
    with pytest.raises(InvalidInput) as info:
        decode_request(req, SIG)
    return str(info.value)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: setattr(r.inputs[0], "name", "z"), "unexpected input 'z'"),
        (lambda r: setattr(r.inputs[0], "datatype", "FP64"), "input 'x': datatype FP64"),
        (lambda r: r.inputs[0].shape.__setitem__(1, 5), "input 'x': shape [2, 5]"),
        (lambda r: r.inputs[0].shape.append(1), "input 'x': shape [2, 4, 1] has rank 3"),
        (lambda r: r.inputs[0].shape.__setitem__(0, -2), "input 'x': shape [-2, 4] has a negative"),
        (lambda r: r.inputs[0].shape.__setitem__(0, 2**62), "more than"),
        (
            lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 7),
            "input 'x': raw contents hold 7 bytes",
        ),
        (
            lambda r: r.raw_input_contents.append(b""),
            "raw_input_contents has 3 entries for 2 inputs",
        ),
        (
            lambda r: r.inputs[1].shape.__setitem__(0, 3),
            "input 'n': raw contents hold 4 bytes; shape [3, 2]",
        ),
    ],
)
def test_bad_raw_inputs_name_the_input(mutate, expected) -> None:  # type: ignore[no-untyped-def]
    req = raw_request()
    mutate(req)
    assert expected in _err(req)


def test_missing_input() -> None:
    assert "missing input 'n'" in _err(raw_request({"x": [2, 4]}))


def test_batch_over_max() -> None:
    assert "exceeds the model's max_batch_size 8" in _err(raw_request({"x": [9, 4], "n": [9, 2]}))


def test_batch_sizes_must_agree() -> None:
    assert "disagree on the batch size" in _err(raw_request({"x": [2, 4], "n": [1, 2]}))


def test_duplicate_input() -> None:
    req = raw_request()
    req.inputs[1].name = "x"
    req.inputs[1].datatype = "FP32"
    assert "given more than once" in _err(req)


def test_unknown_output() -> None:
    req = raw_request()
    req.outputs.add(name="nope")
    assert "unknown output 'nope'" in _err(req)


def test_typed_count_mismatch_and_wrong_field_and_range() -> None:
    req = pb.ModelInferRequest(model_name="m")
    x = req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    x.contents.fp32_contents.extend([1, 2, 3])
    n = req.inputs.add(name="n", datatype="INT8", shape=[1, 2])
    n.contents.int_contents.extend([1, 2])
    assert "input 'x': fp32_contents holds 3 elements" in _err(req)
    x.contents.fp32_contents.append(4)
    x.contents.fp64_contents.append(1.0)
    assert "input 'x': FP32 contents belong in fp32_contents, not fp64_contents" in _err(req)
    x.contents.ClearField("fp64_contents")
    n.contents.int_contents[0] = 300
    assert "input 'n': value out of range for INT8 (got 300" in _err(req)


def test_bytes_tensor_round_trip_and_malformed() -> None:
    array = np.array([b"a", b"", "é".encode()], dtype=np.object_)
    raw = encode_bytes_tensor(array)
    decoded = decode_bytes_tensor(raw, 3)
    assert not isinstance(decoded, str)
    assert decoded.tolist() == array.tolist()
    assert "end after 2 of 3" in str(decode_bytes_tensor(raw[:-3], 3))
    assert "past the end" in str(decode_bytes_tensor(struct.pack("<I", 99) + b"x", 1))
    assert "after 1 elements" in str(decode_bytes_tensor(raw, 1))


def test_encode_response_raw_and_typed() -> None:
    specs = {"y": TensorSpec("y", "FP32", (-1, 4)), "h": TensorSpec("h", "FP16", (-1,))}
    y = np.arange(8, dtype=np.float32).reshape(2, 4)
    raw = pb.ModelInferResponse()
    encode_response(raw, specs, ["y"], [y], raw=True)
    assert np.frombuffer(raw.raw_output_contents[0], np.float32).tolist() == y.ravel().tolist()
    typed = pb.ModelInferResponse()
    encode_response(typed, specs, ["y"], [y], raw=False)
    assert list(typed.outputs[0].contents.fp32_contents) == y.ravel().tolist()
    assert list(typed.outputs[0].shape) == [2, 4]
    # FP16 has no typed field: the whole response goes raw.
    mixed = pb.ModelInferResponse()
    encode_response(mixed, specs, ["y", "h"], [y, np.ones(2, np.float16)], raw=False)
    assert len(mixed.raw_output_contents) == 2


def test_shapes_are_bounded_before_anything_is_allocated() -> None:
    assert shape_problem([2, 4]) is None
    assert "has rank 40; at most 32" in str(shape_problem([1] * 40))
    assert "[1, 1, 1, 1, 1, 1, 1, 1, ... (40 dimensions)]" in str(shape_problem([1] * 40))
    assert "more than" in str(shape_problem([2**62, 0]))  # each dimension bounded
    assert "more than" in str(shape_problem([2**20] * 30))  # the product, stopped early
    assert shape_problem([0, 2**31]) is None  # empty, and no dimension over the bound
    assert shape_problem([2**31, 2**31, 0]) is None  # a zero after the product ran over
    assert "negative dimension -3" in str(shape_problem([2**40, -3]))  # before the size


def test_shape_problem_agrees_with_its_definition() -> None:
    """The one-pass check says what its definition does, on shapes of every kind: rank
    first, then a negative dimension, then a dimension or the product over the bound."""
    rng = random.Random(7)
    dims = [0, 1, 2, 3, 7, 1000, -1, -5, 2**15, 2**16, 2**31, 2**31 + 1, 2**40, 2**62]
    for _ in range(20_000):
        shape = [rng.choice(dims) for _ in range(rng.randint(0, 34))]
        if len(shape) > MAX_RANK:
            expected = "has rank"
        elif any(d < 0 for d in shape):
            expected = f"negative dimension {next(d for d in shape if d < 0)}"
        elif any(d > MAX_ELEMENTS for d in shape) or math.prod(shape) > MAX_ELEMENTS:
            expected = "more than"
        else:
            assert shape_problem(shape) is None, shape
            continue
        assert expected in str(shape_problem(shape)), shape


def test_bytes_contents_are_checked_against_the_count_before_the_array() -> None:
    """A BYTES input of [1, 2**31 - 1] (a -1 dimension of the model) in 8 bytes of data:
    refused from the length, without allocating 16 GiB of element slots."""
    problem = decode_bytes_tensor(b"\0" * 8, 2**31 - 1)
    assert isinstance(problem, str)
    assert "hold 8 bytes, too few for 2147483647 elements" in problem
    sig = Signature((TensorSpec("s", "BYTES", (-1, -1)),), (TensorSpec("y", "BYTES", (-1,)),), 8)
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="s", datatype="BYTES", shape=[1, 2**31 - 1])
    req.raw_input_contents.append(b"\0" * 8)
    with pytest.raises(InvalidInput, match="input 's': raw BYTES contents hold 8 bytes"):
        decode_request(req, sig)


def test_counts_and_parameter_maps_of_a_request_are_bounded() -> None:
    req = raw_request()
    for index in range(65):
        req.parameters[f"p{index}"].int64_param = index
    assert "request has 65 parameters; at most 64" in _err(req)
    req = raw_request()
    req.inputs[0].parameters["k"].string_param = "v" * 5000
    assert "input 'x' parameter 'k' is a string of 5000 bytes" in _err(req)
    req = raw_request()
    for _ in range(257):
        req.outputs.add(name="y")
    assert "the request names 257 outputs; at most 256" in _err(req)
    req = raw_request()
    req.outputs.add(name="y")
    req.outputs.add(name="y")
    assert "output 'y' is requested more than once" in _err(req)
    req = raw_request()
    req.inputs[0].name = "n" * 10_000
    message = _err(req)
    assert "unexpected input 'nnnn" in message and len(message) < 200


def test_zeros_of_a_backend_shape_are_bounded() -> None:
    specs = [TensorSpec("x", "FP32", (-1, 1 << 40))]
    with pytest.raises(InvalidInput, match="more than 2147483648 elements"):
        zeros_request("m", specs, 8)
    specs = [TensorSpec("x", "FP32", (-1, 1 << 20))]
    with pytest.raises(InvalidInput, match="take 4194304 bytes, over the limit of 1000000"):
        zeros_request("m", specs, 8, max_bytes=1_000_000)
    assert len(zeros_request("m", specs, 8)) > 4 << 20
    with pytest.raises(InvalidInput, match="has a dimension of any size"):
        zeros_request("m", [TensorSpec("x", "FP32", (-1, 0, -7))], 0)
