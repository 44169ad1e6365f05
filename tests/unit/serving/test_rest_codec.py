"""The REST binding's body codec (gateway/serving/rest_codec.py): bodies that
tritonclient.http itself makes decode to the tensors it was given, as the worker's own
decoder reads them; response bodies parse with tritonclient.http into the arrays the
backend sent; every malformed body is InvalidInput naming what was wrong.

tritonclient.http imports no tritonclient.grpc (whose `inference` protobuf package
clashes with ours), so it runs in this process; the first test checks that it stays so.
Run as a script, the module prints the codec's micro-benchmark.
"""

from __future__ import annotations

import math
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.protocol.codec import Signature, decode_request
from backends.protocol.errors import Internal, InvalidInput
from backends.protocol.parameters import MAX_PARAMETERS
from backends.protocol.tensors import (
    ELEMENT_BYTES,
    MAX_RANK,
    MAX_TENSORS,
    TensorSpec,
    encode_bytes_tensor,
)
from gateway.serving.rest_codec import (
    RestRequest,
    decode_infer_request,
    encode_infer_response,
    error_body,
)
from protos import inference_pb2 as pb

# One array per datatype, with each type's extremes where it has them.
SAMPLES: dict[str, np.ndarray[Any, Any]] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([0, 1, 255], dtype=np.uint8),
    "UINT16": np.array([0, 65535, 7], dtype=np.uint16),
    "UINT32": np.array([0, 2**32 - 1, 9], dtype=np.uint32),
    "UINT64": np.array([0, 2**64 - 1, 2**63], dtype=np.uint64),
    "INT8": np.array([[-128, 127], [0, -1]], dtype=np.int8),
    "INT16": np.array([-32768, 32767, 3], dtype=np.int16),
    "INT32": np.array([-(2**31), 2**31 - 1, 0], dtype=np.int32),
    "INT64": np.array([-(2**63), 2**63 - 1, 5], dtype=np.int64),
    "FP16": np.array([0.1, -65504.0, 6e-8, 1.5], dtype=np.float16),
    "FP32": np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7,
    "FP64": np.array([math.pi, -1e300, 5e-324, 0.0], dtype=np.float64),
    "BF16": np.array([1.0, -2.5, 3.140625, 1e38, 0.0078125], dtype=ml_dtypes.bfloat16),
    "BYTES": np.array([[b"abc", "h\u00e9llo".encode()], [b"", b"x" * 300]], dtype=np.object_),
}
DATATYPES = sorted(SAMPLES)
JSON_INPUT_DATATYPES = [dt for dt in DATATYPES if dt != "BF16"]  # tritonclient sends BF16 binary


def raw_of(datatype: str, array: np.ndarray[Any, Any]) -> bytes:
    """The raw contents the gRPC path carries for `array`."""
    if datatype == "BYTES":
        return encode_bytes_tensor(array)
    return np.ascontiguousarray(array).tobytes()


def client_body(
    datatype: str,
    array: np.ndarray[Any, Any],
    *,
    binary: bool,
    outputs: list[httpclient.InferRequestedOutput] | None = None,
    **kwargs: Any,
) -> tuple[bytes, int | None]:
    tensor = httpclient.InferInput("x", list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [tensor], outputs=outputs, **kwargs
    )
    return body, json_size


def response_with(
    datatype: str, array: np.ndarray[Any, Any], *, typed: bool = False, name: str = "y"
) -> pb.ModelInferResponse:
    """A backend's response holding `array` as output `name`: raw contents as a
    Switchyard worker sends them, or typed contents as a foreign v2 server does."""
    response = pb.ModelInferResponse(model_name="m", model_version="1")
    out = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
    if not typed:
        response.raw_output_contents.append(raw_of(datatype, array))
    elif datatype == "BYTES":
        out.contents.bytes_contents.extend(array.reshape(-1).tolist())
    else:
        field = {
            "BOOL": "bool_contents",
            "UINT64": "uint64_contents",
            "INT64": "int64_contents",
            "FP32": "fp32_contents",
            "FP64": "fp64_contents",
        }.get(datatype, "uint_contents" if datatype.startswith("UINT") else "int_contents")
        getattr(out.contents, field).extend(array.reshape(-1).tolist())
    return response


def parse(body: bytes, header_length: int | None) -> httpclient.InferResult:
    return httpclient.InferResult.from_response_body(body, header_length=header_length)


def assert_same(datatype: str, got: np.ndarray[Any, Any], want: np.ndarray[Any, Any]) -> None:
    assert got.shape == want.shape
    if datatype == "BYTES":
        # tritonclient gives bytes for binary BYTES and str for JSON BYTES.
        items = [i if isinstance(i, bytes) else str(i).encode() for i in got.reshape(-1)]
        assert items == list(want.reshape(-1))
    else:
        assert got.dtype == want.dtype
        assert got.tobytes() == want.tobytes()


def invalid(body: bytes | dict[str, Any], header_length: int | None = None) -> str:
    """The message of the InvalidInput that decoding `body` raises."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    with pytest.raises(InvalidInput) as caught:
        decode_infer_request(data, header_length, "m", "1")
    return str(caught.value)


def tensor_json(**fields: Any) -> dict[str, Any]:
    base = {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}
    base.update(fields)
    return {"inputs": [{k: v for k, v in base.items() if v is not None}]}


# ---------------------------------------------------------------------------------------
# Requests


def test_tritonclient_http_runs_here_without_its_grpc_client() -> None:
    assert "tritonclient.grpc" not in sys.modules


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", DATATYPES)
def test_tritonclient_request_decodes_to_the_tensor_the_worker_reads(
    datatype: str, binary: bool
) -> None:
    array = SAMPLES[datatype]
    if datatype == "BF16" and not binary:
        # tritonclient sends BF16 only as binary data; JSON numbers carry it too.
        body = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "BF16",
                        "shape": list(array.shape),
                        "data": array.astype(np.float64).tolist(),
                    }
                ]
            }
        )
        header_length = None
    else:
        body, header_length = client_body(datatype, array, binary=binary)
        assert (header_length is not None) == binary
    decoded = decode_infer_request(body, header_length, "m", "1")
    message = decoded.message
    assert (message.model_name, message.model_version) == ("m", "1")
    [tensor] = message.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("x", datatype, list(array.shape))
    assert not tensor.HasField("contents")
    assert "binary_data_size" not in tensor.parameters
    assert list(message.raw_input_contents) == [raw_of(datatype, array)]
    if datatype != "BF16":  # the worker has no BF16 arrays
        spec = TensorSpec("x", datatype, tuple(array.shape))
        worker = decode_request(message, Signature((spec,), (spec,), 0))
        assert_same(datatype, np.asarray(worker.inputs["x"]), array)


def test_nested_json_data_is_read_row_major_like_flat_data() -> None:
    array = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    flat = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "INT32",
                    "shape": [2, 3, 4],
                    "data": array.reshape(-1).tolist(),
                }
            ]
        }
    )
    nested = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "INT32", "shape": [2, 3, 4], "data": array.tolist()}]}
    )
    want = [array.tobytes()]
    assert list(decode_infer_request(flat, None, "m", "1").message.raw_input_contents) == want
    assert list(decode_infer_request(nested, None, "m", "1").message.raw_input_contents) == want


def test_json_floats_round_to_the_nearest_value_of_the_datatype() -> None:
    # Ties (1 + 2**-8, 1 + 3 * 2**-8 in BF16; 1 + 2**-11 in FP16) round to even.
    wide = [0.1, 1 / 3, 1 + 2**-8, 1 + 3 * 2**-8, 3.0e38, 2]
    half = [0.1, 1 / 3, 1 + 2**-11, 65519.0, 6e-8, 2]
    cases: list[tuple[str, list[float], np.ndarray]] = [
        ("FP16", half, np.array(half, dtype=np.float16)),
        ("FP32", wide, np.array(wide, dtype=np.float32)),
        ("BF16", wide, np.array(wide, dtype=ml_dtypes.bfloat16)),
    ]
    for datatype, values, want in cases:
        body = orjson.dumps(tensor_json(datatype=datatype, shape=[6], data=values))
        [raw] = decode_infer_request(body, None, "m", "1").message.raw_input_contents
        assert raw == want.tobytes(), datatype


def test_json_bf16_is_rounded_once_from_the_double_given() -> None:
    # Just past a BF16 tie, by less than float32 can hold: rounding through float32
    # first would land on the tie and round to even (down); once, it rounds up.
    values = [1 + 2**-8 + 2**-40, -(1 + 2**-8 + 2**-40), 1 + 2**-8 - 2**-40, 2.0**-140]
    body = orjson.dumps(tensor_json(datatype="BF16", shape=[4], data=values))
    [raw] = decode_infer_request(body, None, "m", "1").message.raw_input_contents
    assert np.frombuffer(raw, dtype="<u2").tolist() == [0x3F81, 0xBF81, 0x3F80, 0x0000]


def test_request_parameters_become_infer_parameters_of_their_kind() -> None:
    body, header_length = client_body(
        "FP32",
        SAMPLES["FP32"],
        binary=True,
        request_id="req-7",
        priority=2,
        timeout=5000,
        parameters={
            "sla_ms": 20.5,
            "sla_class": "gold",
            "switchyard_variant": "ort-cpu-fp32",
            "flag": True,
            "huge": 2**63 + 5,
            "negative": -3,
        },
    )
    message = decode_infer_request(body, header_length, "resnet", "").message
    assert message.id == "req-7"
    kinds = {
        key: (
            param.WhichOneof("parameter_choice"),
            getattr(param, str(param.WhichOneof("parameter_choice"))),
        )
        for key, param in message.parameters.items()
    }
    assert kinds == {
        "priority": ("int64_param", 2),
        "timeout": ("int64_param", 5000),
        "sla_ms": ("double_param", 20.5),
        "sla_class": ("string_param", "gold"),
        "switchyard_variant": ("string_param", "ort-cpu-fp32"),
        "flag": ("bool_param", True),
        "huge": ("uint64_param", 2**63 + 5),
        "negative": ("int64_param", -3),
    }
    # No outputs named: tritonclient asks for binary_data_output, which stays here.
    assert "binary_data_output" not in message.parameters


def test_output_binary_choice_follows_the_request_and_each_output() -> None:
    array = SAMPLES["FP32"]
    # tritonclient with no outputs named: every output binary.
    body, length = client_body("FP32", array, binary=True)
    decoded = decode_infer_request(body, length, "m", "1")
    assert (decoded.binary_outputs, decoded.output_names) == (True, ())
    assert len(decoded.message.outputs) == 0
    # Named outputs: each says; the forwarded outputs carry none of it.
    outputs = [
        httpclient.InferRequestedOutput("a", binary_data=True),
        httpclient.InferRequestedOutput("b", binary_data=False),
        httpclient.InferRequestedOutput("c"),
    ]
    body, length = client_body("FP32", array, binary=True, outputs=outputs)
    decoded = decode_infer_request(body, length, "m", "1")
    assert decoded.binary_outputs == frozenset({"a", "c"})
    assert decoded.output_names == ("a", "b", "c")
    assert [o.name for o in decoded.message.outputs] == ["a", "b", "c"]
    assert all(len(o.parameters) == 0 for o in decoded.message.outputs)
    # binary_data_output is each output's default; an output's own word wins.
    base = tensor_json()
    both = {
        **base,
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "a"}, {"name": "b", "parameters": {"binary_data": False, "k": 1}}],
    }
    decoded = decode_infer_request(orjson.dumps(both), None, "m", "1")
    assert decoded.binary_outputs == frozenset({"a"})
    assert decoded.message.outputs[1].parameters["k"].int64_param == 1
    # Nothing asked: JSON.
    decoded = decode_infer_request(orjson.dumps(base), None, "m", "1")
    assert decoded.binary_outputs == frozenset()
    assert not decoded.binary("y")


def test_several_binary_inputs_are_cut_in_input_order_between_json_ones() -> None:
    a = np.arange(6, dtype=np.int16).reshape(2, 3)
    b = np.array([b"one", b"two"], dtype=np.object_)
    c = np.array([1.5, 2.5], dtype=np.float64)
    tensors = []
    for name, dt, arr, binary in (
        ("a", "INT16", a, True),
        ("c", "FP64", c, False),
        ("b", "BYTES", b, True),
    ):
        t = httpclient.InferInput(name, list(arr.shape), dt)
        t.set_data_from_numpy(arr, binary_data=binary)
        tensors.append(t)
    body, length = httpclient.InferenceServerClient.generate_request_body(tensors)
    message = decode_infer_request(body, length, "m", "1").message
    assert [t.name for t in message.inputs] == ["a", "c", "b"]
    assert list(message.raw_input_contents) == [a.tobytes(), c.tobytes(), encode_bytes_tensor(b)]


# Each malformed request and a piece of the message that must name the problem.
BAD_REQUESTS: list[tuple[str, bytes | dict[str, Any], int | None, str]] = [
    ("not json", b"{nope", None, "JSON is malformed"),
    ("not an object", b"[1, 2]", None, "must be an object, got a list"),
    (
        "NaN literal",
        b'{"inputs": [{"name":"x","datatype":"FP32","shape":[1],"data":[NaN]}]}',
        None,
        "malformed",
    ),
    ("unknown field", {"inputs": [], "input": []}, None, "unknown field 'input'"),
    ("no inputs", {"id": "a"}, None, "no 'inputs'"),
    ("inputs not a list", {"inputs": {"x": 1}}, None, "'inputs' must be a list, got an object"),
    ("input not an object", {"inputs": [3]}, None, "'inputs'[0] must be an object"),
    ("id not a string", {"id": 5, "inputs": []}, None, "'id' must be a string, got an integer 5"),
    ("name missing", tensor_json(name=None), None, "input 0: 'name' must be a non-empty string"),
    (
        "unknown input field",
        tensor_json(contents=[1]),
        None,
        "input 'x' has unknown field 'contents'",
    ),
    (
        "datatype missing",
        tensor_json(datatype=None),
        None,
        "input 'x': 'datatype' must be a string",
    ),
    ("unknown datatype", tensor_json(datatype="FP8"), None, "input 'x': unknown datatype 'FP8'"),
    (
        "shape not a list",
        tensor_json(shape=2),
        None,
        "input 'x': 'shape' must be a list of integers",
    ),
    ("negative dim", tensor_json(shape=[-2]), None, "non-negative integers, got -2"),
    ("float dim", tensor_json(shape=[2.0]), None, "non-negative integers, got 2.0"),
    ("bool dim", tensor_json(shape=[True]), None, "non-negative integers, got True"),
    ("rank too high", tensor_json(shape=[1] * (MAX_RANK + 1)), None, f"at most {MAX_RANK}"),
    ("too many elements", tensor_json(shape=[2**20, 2**20]), None, "more than 2147483648 elements"),
    (
        "count short",
        tensor_json(shape=[3]),
        None,
        "input 'x': 'data' holds 2 values; shape [3] needs 3",
    ),
    (
        "count long nested",
        tensor_json(shape=[1, 2], data=[[1.0, 2.0], [3.0, 4.0]]),
        None,
        "holds 4 values; shape [1, 2] needs 2",
    ),
    (
        "ragged",
        tensor_json(shape=[2, 2], data=[[1.0, 2.0], 3.0, 4.0]),
        None,
        "mixes lists and values",
    ),
    ("data not a list", tensor_json(data="1,2"), None, "'data' must be a list, got a string"),
    ("no data", tensor_json(data=None), None, "neither 'data' nor binary_data_size"),
    (
        "uint8 overflow",
        tensor_json(datatype="UINT8", data=[300, 1]),
        None,
        "value 300 does not fit UINT8 (range 0..255)",
    ),
    (
        "int8 underflow",
        tensor_json(datatype="INT8", data=[-129, 1]),
        None,
        "value -129 does not fit INT8",
    ),
    (
        "uint64 negative",
        tensor_json(datatype="UINT64", data=[-1, 1]),
        None,
        "value -1 does not fit UINT64",
    ),
    (
        "int past 64 bits",
        b'{"inputs": [{"name": "x", "datatype": "UINT64", "shape": [2], "data": [18446744073709551616, 1]}]}',
        None,
        "UINT64 'data' must hold integers, got a number",
    ),
    (
        "float for int",
        tensor_json(datatype="INT32", data=[1.5, 1]),
        None,
        "INT32 'data' must hold integers, got a number",
    ),
    ("bool for int", tensor_json(datatype="INT64", data=[True, 1]), None, "got a boolean"),
    (
        "string for fp32",
        tensor_json(data=["1.0", 2.0]),
        None,
        "FP32 'data' must hold numbers, got a string",
    ),
    ("null for fp32", tensor_json(data=[None, 2.0]), None, "got null"),
    ("fp32 overflow", tensor_json(data=[1e39, 2.0]), None, "value 1e+39 does not fit FP32"),
    (
        "fp16 overflow",
        tensor_json(datatype="FP16", data=[70000, 2.0]),
        None,
        "value 70000 does not fit FP16",
    ),
    ("bf16 overflow", tensor_json(datatype="BF16", data=[3.4e38, 2.0]), None, "does not fit BF16"),
    (
        "int for bool",
        tensor_json(datatype="BOOL", data=[1, 0]),
        None,
        "BOOL 'data' must hold true or false, got an integer",
    ),
    (
        "number for bytes",
        tensor_json(datatype="BYTES", data=["a", 1]),
        None,
        "BYTES 'data' must hold strings, got an integer",
    ),
    (
        "parameters not an object",
        {**tensor_json(), "parameters": [1]},
        None,
        "'parameters' must be an object, got a list",
    ),
    (
        "nested parameter",
        {**tensor_json(), "parameters": {"sla": {"ms": 5}}},
        None,
        "parameter 'sla' must be a boolean, number or string, got an object",
    ),
    (
        "null parameter",
        {**tensor_json(), "parameters": {"sla_ms": None}},
        None,
        "parameter 'sla_ms' must be a boolean, number or string, got null",
    ),
    (
        "too many parameters",
        {**tensor_json(), "parameters": {f"p{i}": i for i in range(MAX_PARAMETERS + 1)}},
        None,
        f"at most {MAX_PARAMETERS} are allowed",
    ),
    (
        "long parameter",
        {**tensor_json(), "parameters": {"k": "v" * 5000}},
        None,
        "string of 5000 bytes",
    ),
    (
        "input parameter list",
        tensor_json(parameters={"a": [1]}),
        None,
        "input 'x': parameter 'a' must be a boolean",
    ),
    (
        "binary_data_output not bool",
        {**tensor_json(), "parameters": {"binary_data_output": 1}},
        None,
        "'binary_data_output' must be true or false, got 1",
    ),
    (
        "too many inputs",
        {"inputs": [tensor_json()["inputs"][0]] * (MAX_TENSORS + 1)},
        None,
        f"names {MAX_TENSORS + 1} tensors; at most {MAX_TENSORS}",
    ),
    (
        "too many outputs",
        {**tensor_json(), "outputs": [{"name": "y"}] * (MAX_TENSORS + 1)},
        None,
        f"at most {MAX_TENSORS}",
    ),
    (
        "outputs not a list",
        {**tensor_json(), "outputs": "y"},
        None,
        "'outputs' must be a list, got a string",
    ),
    (
        "output without name",
        {**tensor_json(), "outputs": [{}]},
        None,
        "output 0: 'name' must be a non-empty string, got null",
    ),
    (
        "unknown output field",
        {**tensor_json(), "outputs": [{"name": "y", "binary_data": True}]},
        None,
        "output 'y' has unknown field 'binary_data'",
    ),
    (
        "binary_data not bool",
        {**tensor_json(), "outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]},
        None,
        "output 'y': parameter 'binary_data' must be true or false, got 'yes'",
    ),
    (
        "classification",
        {**tensor_json(), "outputs": [{"name": "y", "parameters": {"classification": 3}}]},
        None,
        "output 'y': parameter 'classification': classification outputs are not supported",
    ),
    (
        "shared memory",
        tensor_json(
            data=None, parameters={"shared_memory_region": "r", "shared_memory_byte_size": 8}
        ),
        None,
        "input 'x': parameter 'shared_memory_region': shared memory is not supported",
    ),
    (
        "binary size not int",
        tensor_json(data=None, parameters={"binary_data_size": "8"}),
        None,
        "'binary_data_size' must be a non-negative integer, got '8'",
    ),
    (
        "binary size negative",
        tensor_json(data=None, parameters={"binary_data_size": -8}),
        None,
        "non-negative integer, got -8",
    ),
    (
        "binary and data",
        tensor_json(parameters={"binary_data_size": 8}),
        None,
        "has both 'data' and binary data",
    ),
    (
        "binary without header length",
        tensor_json(data=None, parameters={"binary_data_size": 8}),
        None,
        "binary_data_size 8 goes past the end of the body (0 bytes of binary data left)",
    ),
]


def with_tail(document: dict[str, Any], tail: bytes) -> tuple[bytes, int]:
    header = orjson.dumps(document)
    return header + tail, len(header)


BINARY_FP32 = tensor_json(data=None, parameters={"binary_data_size": 8})


def bad_binary_requests() -> list[tuple[str, bytes, int | None, str]]:
    cases: list[tuple[str, bytes, int | None, str]] = []
    body, length = with_tail(BINARY_FP32, bytes(4))
    cases.append(
        (
            "binary past the end",
            body,
            length,
            "binary_data_size 8 goes past the end of the body (4 bytes",
        )
    )
    body, length = with_tail(BINARY_FP32, bytes(12))
    cases.append(
        (
            "leftover bytes",
            body,
            length,
            "4 bytes after the binary data of the inputs (8 bytes declared",
        )
    )
    body, length = with_tail(
        tensor_json(shape=[3], data=None, parameters={"binary_data_size": 8}), bytes(8)
    )
    cases.append(
        (
            "size not shape",
            body,
            length,
            "input 'x': binary data holds 8 bytes; shape [3] of FP32 needs 12",
        )
    )
    body, length = with_tail(
        tensor_json(datatype="BOOL", shape=[2], data=None, parameters={"binary_data_size": 2}),
        b"\x01\x02",
    )
    cases.append(("bool not 0 or 1", body, length, "BOOL binary data must be bytes 0 or 1"))
    body, length = with_tail(tensor_json(), b"xyz")
    cases.append(("tail with no binary input", body, length, "3 bytes after the binary data"))
    short = struct.pack("<I", 5) + b"abc"
    body, length = with_tail(
        tensor_json(
            datatype="BYTES", shape=[1], data=None, parameters={"binary_data_size": len(short)}
        ),
        short,
    )
    cases.append(
        (
            "bytes element past its end",
            body,
            length,
            "input 'x': binary data of shape [1]: raw BYTES element 0 declares 5 bytes past the end",
        )
    )
    two = struct.pack("<I", 1) + b"a"
    body, length = with_tail(
        tensor_json(
            datatype="BYTES", shape=[2], data=None, parameters={"binary_data_size": len(two)}
        ),
        two,
    )
    cases.append(("bytes count short", body, length, "too few for 2 elements"))
    body, length = with_tail(tensor_json(), b"")
    cases.append(
        (
            "header length past body",
            body,
            length + 1,
            f"Inference-Header-Content-Length is {length + 1}; the body holds {length} bytes",
        )
    )
    cases.append(("header length negative", body, -1, "Inference-Header-Content-Length is -1"))
    cases.append(("header length cuts json", body, length - 2, "JSON is malformed"))
    body, length = with_tail(BINARY_FP32, bytes(8))
    cases.append(
        ("binary without the header", body, None, "needs the Inference-Header-Content-Length")
    )
    return cases


@pytest.mark.parametrize(
    ("body", "header_length", "expected"),
    [pytest.param(b, h, e, id=i) for i, b, h, e in BAD_REQUESTS + bad_binary_requests()],
)
def test_malformed_request_is_invalid_input_naming_the_problem(
    body: bytes | dict[str, Any], header_length: int | None, expected: str
) -> None:
    assert expected in invalid(body, header_length)


def test_nesting_deeper_than_max_rank_is_invalid_input() -> None:
    data: Any = [1.0]
    for _ in range(MAX_RANK + 1):
        data = [data]
    assert f"nested more than {MAX_RANK} levels deep" in invalid(tensor_json(shape=[1], data=data))


def test_empty_tensors_decode() -> None:
    body = orjson.dumps(tensor_json(shape=[0, 3], data=[]))
    assert list(decode_infer_request(body, None, "m", "1").message.raw_input_contents) == [b""]
    body, length = with_tail(
        tensor_json(shape=[0], data=None, parameters={"binary_data_size": 0}), b""
    )
    assert list(decode_infer_request(body, length, "m", "1").message.raw_input_contents) == [b""]


# ---------------------------------------------------------------------------------------
# Responses


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize(
    ("datatype", "typed"),
    [(dt, False) for dt in DATATYPES]
    # FP16 and BF16 have no typed contents field: they travel raw only.
    + [(dt, True) for dt in DATATYPES if dt not in ("FP16", "BF16")],
    ids=lambda value: {False: "raw", True: "typed"}.get(value, value),
)
def test_response_parses_with_tritonclient_into_the_backend_array(
    datatype: str, binary: bool, typed: bool
) -> None:
    array = SAMPLES[datatype]
    response = response_with(datatype, array, typed=typed)
    request = RestRequest(pb.ModelInferRequest(), binary, ())
    body, header_length = encode_infer_response(response, request)
    assert (header_length is not None) == binary
    result = parse(body, header_length)
    output = result.get_output("y")
    assert output["datatype"] == datatype and output["shape"] == list(array.shape)
    assert ("data" in output) != binary
    if datatype == "BOOL" and not binary:
        assert output["data"] == array.reshape(-1).tolist()
        assert {type(v) for v in output["data"]} == {bool}  # true/false, not 1/0
    assert_same(datatype, result.as_numpy("y"), array)


def test_response_json_names_the_model_and_shows_switchyard_parameters_as_numbers() -> None:
    response = response_with("INT32", np.array([1, 2], dtype=np.int32))
    response.id = "req-1"
    response.parameters["switchyard_backend"].string_param = "small-cpu"
    response.parameters["switchyard_variant"].string_param = "ort-cpu-fp32"
    response.parameters["switchyard_attempts"].string_param = "2"
    response.parameters["switchyard_cost_usd"].string_param = "1.23e-07"
    response.parameters["batched"].bool_param = True
    body, header_length = encode_infer_response(
        response, RestRequest(pb.ModelInferRequest(), frozenset(), ())
    )
    assert header_length is None
    assert orjson.loads(body) == {
        "model_name": "m",
        "model_version": "1",
        "id": "req-1",
        "parameters": {
            "switchyard_backend": "small-cpu",
            "switchyard_variant": "ort-cpu-fp32",
            "switchyard_attempts": 2,
            "switchyard_cost_usd": 1.23e-07,
            "batched": True,
        },
        "outputs": [{"name": "y", "datatype": "INT32", "shape": [2], "data": [1, 2]}],
    }
    response.id = ""
    response.ClearField("parameters")
    document = orjson.loads(
        encode_infer_response(response, RestRequest(pb.ModelInferRequest(), frozenset(), ()))[0]
    )
    assert "id" not in document and "parameters" not in document


def test_response_mixes_binary_and_json_outputs_as_the_request_named_them() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([b"p", b"q"], dtype=np.object_)
    c = np.array([7, 8], dtype=np.uint16)
    response = pb.ModelInferResponse(model_name="m", model_version="1")
    for name, dt, arr in (("a", "FP32", a), ("b", "BYTES", b), ("c", "UINT16", c)):
        response.outputs.add(name=name, datatype=dt, shape=arr.shape)
        response.raw_output_contents.append(raw_of(dt, arr))
    outputs = [
        httpclient.InferRequestedOutput("a", binary_data=True),
        httpclient.InferRequestedOutput("b", binary_data=False),
        httpclient.InferRequestedOutput("c", binary_data=True),
    ]
    body, length = client_body("FP32", a, binary=True, outputs=outputs)
    request = decode_infer_request(body, length, "m", "1")
    out_body, header_length = encode_infer_response(response, request)
    assert header_length is not None
    assert len(out_body) == header_length + a.nbytes + c.nbytes
    result = parse(out_body, header_length)
    assert_same("FP32", result.as_numpy("a"), a)
    assert_same("BYTES", result.as_numpy("b"), b)
    assert_same("UINT16", result.as_numpy("c"), c)
    assert result.get_output("b")["data"] == ["p", "q"]


def test_nan_and_infinite_outputs_are_null_in_json_and_read_back_as_nan() -> None:
    array = np.array([np.nan, np.inf, 1.0], dtype=np.float32)
    body, _ = encode_infer_response(
        response_with("FP32", array), RestRequest(pb.ModelInferRequest(), False, ())
    )
    assert orjson.loads(body)["outputs"][0]["data"] == [None, None, 1.0]
    got = parse(body, None).as_numpy("y")
    assert np.isnan(got[:2]).all() and got[2] == 1.0


def test_bytes_output_that_is_not_utf8_fails_in_json_and_passes_as_binary() -> None:
    array = np.array([b"ok", b"\xff\xfe"], dtype=np.object_)
    for typed in (False, True):
        response = response_with("BYTES", array, typed=typed)
        with pytest.raises(
            InvalidInput, match=r"output 'y': BYTES element 1 is not UTF-8.*binary_data: true"
        ):
            encode_infer_response(response, RestRequest(pb.ModelInferRequest(), frozenset(), ()))
        body, length = encode_infer_response(
            response, RestRequest(pb.ModelInferRequest(), frozenset({"y"}), ("y",))
        )
        assert_same("BYTES", parse(body, length).as_numpy("y"), array)


def malformed_responses() -> list[tuple[str, pb.ModelInferResponse, str]]:
    cases = []
    r = response_with("FP32", np.zeros(3, dtype=np.float32))
    r.raw_output_contents.append(b"")
    cases.append(("raw count", r, "2 raw_output_contents for 1 outputs"))
    r = response_with("FP32", np.zeros(3, dtype=np.float32))
    r.raw_output_contents[0] = bytes(8)
    cases.append(("raw size", r, "raw contents hold 8 bytes; shape [3] of FP32 needs 12"))
    r = response_with("INT32", np.zeros(3, dtype=np.int32), typed=True)
    r.outputs[0].contents.int_contents.append(1)
    cases.append(("typed count", r, "int_contents holds 4 values; 3 expected"))
    r = response_with("UINT8", np.zeros(2, dtype=np.uint8), typed=True)
    r.outputs[0].contents.uint_contents[0] = 300
    cases.append(("typed range", r, "uint_contents holds 300, out of range for UINT8"))
    r = pb.ModelInferResponse()
    r.outputs.add(name="y", datatype="FP16", shape=[1])
    cases.append(("fp16 typed", r, "FP16 has no typed contents"))
    r = pb.ModelInferResponse()
    r.outputs.add(name="y", datatype="COMPLEX", shape=[1])
    cases.append(("unknown datatype", r, "unknown datatype 'COMPLEX'"))
    r = pb.ModelInferResponse()
    r.outputs.add(name="y", datatype="BYTES", shape=[2])
    r.raw_output_contents.append(struct.pack("<I", 1) + b"a")
    cases.append(("bytes raw", r, "too few for 2 elements"))
    return cases


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize(
    ("response", "expected"), [pytest.param(r, e, id=i) for i, r, e in malformed_responses()]
)
def test_backend_response_that_does_not_match_its_shapes_is_internal(
    response: pb.ModelInferResponse, expected: str, binary: bool
) -> None:
    with pytest.raises(Internal) as caught:
        encode_infer_response(response, RestRequest(pb.ModelInferRequest(), binary, ()))
    assert "output 'y'" in str(caught.value) or "outputs" in str(caught.value)
    assert expected in str(caught.value)


def test_error_body_is_json_with_the_message() -> None:
    assert orjson.loads(error_body('input "x": bad \u00e9')) == {"error": 'input "x": bad \u00e9'}


# ---------------------------------------------------------------------------------------
# Properties: whatever JSON comes, InvalidInput or a request, never another exception


JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.sampled_from(["FP32", "BYTES", "BF16", "UINT8", "BOOL", "binary_data_size", "x"])
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=30,
)


# Values that fit each datatype in JSON, and a few that do not.
FITTING_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "BOOL": st.booleans(),
    "BYTES": st.text(max_size=4),
    **{
        dt: st.integers(int(np.iinfo(dt.lower()).min), int(np.iinfo(dt.lower()).max))
        for dt in ("UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64")
    },
    **{
        dt: st.floats(-1e4, 1e4) | st.integers(-100, 100) for dt in ("FP16", "FP32", "FP64", "BF16")
    },
}
ASTRAY_VALUES = JSON_LEAVES | st.integers(-(2**63), 2**64 - 1) | st.floats(-1e300, 1e300)


@st.composite
def near_requests(draw: st.DrawFn) -> tuple[bytes, int | None]:
    """Bodies shaped like requests, mostly well formed, each input's data as JSON or
    binary, with now and then a value, a size, a field or the header length astray."""

    def astray() -> bool:
        return draw(st.sampled_from([False] * 9 + [True]))

    inputs = []
    tail = b""
    for i in range(draw(st.integers(0, 3))):
        datatype = draw(st.sampled_from(DATATYPES))
        shape: Any = draw(st.lists(st.integers(0, 3), max_size=3))
        count = int(np.prod(shape))
        tensor: dict[str, Any] = {"name": f"i{i}", "datatype": datatype, "shape": shape}
        if draw(st.booleans()):
            values = [
                draw(ASTRAY_VALUES) if astray() else draw(FITTING_VALUES[datatype])
                for _ in range(count + (draw(st.integers(-1, 1)) if astray() else 0))
            ]
            tensor["data"] = (
                np.array(values, dtype=object).reshape(shape).tolist()
                if len(values) == count and draw(st.booleans())
                else values
            )
        else:
            size = count * ELEMENT_BYTES.get(datatype, 4) + (
                draw(st.integers(-2, 2)) if astray() else 0
            )
            data = draw(st.binary(min_size=max(0, size), max_size=max(0, size)))
            if datatype == "BYTES" and not astray():
                data = struct.pack("<I", 0) * count
                size = len(data)
            tensor["parameters"] = {"binary_data_size": size}
            tail += data
        if astray():
            tensor["datatype"] = draw(st.sampled_from(["FP8", "", "fp32"]))
        if astray():
            tensor["shape"] = draw(JSON_VALUES)
        if astray():
            tensor[draw(st.sampled_from(["contents", "name", "parameters"]))] = draw(JSON_VALUES)
        inputs.append(tensor)
    document: dict[str, Any] = {"inputs": inputs}
    if draw(st.booleans()):
        document["outputs"] = [
            {"name": f"o{i}", "parameters": {"binary_data": draw(st.booleans())}}
            for i in range(draw(st.integers(0, 2)))
        ]
        if astray():
            document["outputs"].append(draw(JSON_VALUES))
    if draw(st.booleans()):
        document["parameters"] = {
            **draw(
                st.dictionaries(
                    st.sampled_from(["sla_ms", "priority", "sla_class", "k"]),
                    ASTRAY_VALUES,
                    max_size=3,
                )
            ),
            "binary_data_output": draw(st.booleans()),
        }
    if astray():
        document[draw(st.sampled_from(["id", "inputs", "outputs", "parameters", "other"]))] = draw(
            JSON_VALUES
        )
    header = orjson.dumps(document)
    tail += draw(st.binary(max_size=4)) if astray() else b""
    length: int | None = len(header) if tail or draw(st.booleans()) else None
    if astray():
        length = draw(st.integers(-2, len(header) + len(tail) + 2))
    return header + tail, length


def decodes_or_is_invalid(body: bytes, header_length: int | None) -> None:
    try:
        decoded = decode_infer_request(body, header_length, "m", "1")
    except InvalidInput as exc:
        assert str(exc)
        return
    message = decoded.message
    assert len(message.raw_input_contents) == len(message.inputs)
    for tensor, raw in zip(message.inputs, message.raw_input_contents, strict=True):
        assert not tensor.HasField("contents")
        count = int(np.prod(tensor.shape))
        if tensor.datatype == "BYTES":
            assert len(raw) >= 4 * count
        else:
            assert len(raw) == count * ELEMENT_BYTES[tensor.datatype]
    pb.ModelInferRequest.FromString(message.SerializeToString())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(JSON_VALUES)
def test_any_json_decodes_or_is_invalid_input(value: Any) -> None:
    decodes_or_is_invalid(orjson.dumps(value), None)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_requests())
def test_near_requests_decode_or_are_invalid_input(
    body_and_length: tuple[bytes, int | None],
) -> None:
    decodes_or_is_invalid(*body_and_length)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.none() | st.integers(-1, 70))
def test_any_bytes_decode_or_are_invalid_input(body: bytes, header_length: int | None) -> None:
    decodes_or_is_invalid(body, header_length)


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(JSON_INPUT_DATATYPES),
    st.lists(st.integers(0, 3), min_size=1, max_size=3),
    st.booleans(),
    st.randoms(use_true_random=False),
)
def test_random_tensors_round_trip_through_request_and_response(
    datatype: str, shape: list[int], binary: bool, rng: Any
) -> None:
    """A tensor tritonclient sends comes back from the response as tritonclient reads it."""
    seeded = np.random.default_rng(rng.getrandbits(32))
    count = int(np.prod(shape))
    array: np.ndarray
    if datatype == "BYTES":
        array = np.array(
            [
                bytes(seeded.integers(32, 127, seeded.integers(0, 5), dtype=np.uint8))
                for _ in range(count)
            ],
            dtype=np.object_,
        ).reshape(shape)
    elif datatype == "BOOL":
        array = seeded.integers(0, 2, count).astype(np.bool_).reshape(shape)
    else:
        dtype = np.dtype(
            {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}.get(
                datatype, datatype.lower()
            )
        )
        array = (
            seeded.integers(0, 256, count * dtype.itemsize, dtype=np.uint8)
            .view(dtype)
            .reshape(shape)
        )
        if dtype.kind == "f":
            array = np.where(np.isfinite(array), array, 0).astype(dtype)
    body, length = client_body(datatype, array, binary=binary)
    request = decode_infer_request(body, length, "m", "1")
    response = pb.ModelInferResponse(model_name="m", model_version="1")
    response.outputs.add(name="y", datatype=datatype, shape=shape)
    response.raw_output_contents.append(request.message.raw_input_contents[0])
    out_body, header_length = encode_infer_response(response, request)
    assert_same(datatype, parse(out_body, header_length).as_numpy("y"), array)


# ---------------------------------------------------------------------------------------
# Micro-benchmark (no speed is asserted: the test checks that it runs and decodes right)


def bench_codec(
    iterations: int = 200, clock: Callable[[], float] = time.perf_counter
) -> dict[str, float]:
    """Microseconds per decode + encode of a 1x3x224x224 FP32 binary request and its
    1x1000 FP32 binary response, and of a 64-element FP32 JSON request and response."""
    image = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    logits = np.random.default_rng(1).random((1, 1000), dtype=np.float32)
    small = np.random.default_rng(2).random((1, 64), dtype=np.float32)
    cases = {
        "binary_1x3x224x224_fp32_us": (
            client_body(
                "FP32",
                image,
                binary=True,
                outputs=[httpclient.InferRequestedOutput("y", binary_data=True)],
            ),
            logits,
        ),
        "json_64_fp32_us": (
            client_body(
                "FP32",
                small,
                binary=False,
                outputs=[httpclient.InferRequestedOutput("y", binary_data=False)],
            ),
            small,
        ),
    }
    timings: dict[str, float] = {}
    for label, ((body, length), output) in cases.items():
        response = response_with("FP32", output)
        start = clock()
        for _ in range(iterations):
            request = decode_infer_request(body, length, "resnet18", "1")
            out_body, header_length = encode_infer_response(response, request)
        timings[label] = (clock() - start) / iterations * 1e6
        assert_same("FP32", parse(out_body, header_length).as_numpy("y"), output)
    return timings


def test_bench_codec_runs_and_round_trips() -> None:
    timings = bench_codec(iterations=3)
    assert set(timings) == {"binary_1x3x224x224_fp32_us", "json_64_fp32_us"}
    print(timings)


if __name__ == "__main__":
    for name, micros in bench_codec().items():
        print(f"{name}: {micros:.1f}")
