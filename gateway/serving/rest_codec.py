"""The REST binding's bodies: Open Inference Protocol JSON, with Triton's binary tensor
data extension, to and from the protocol messages the gRPC path forwards.

A request body (already decompressed) becomes the same `inference.ModelInferRequest`
a gRPC caller sends, every input as `raw_input_contents` (never typed contents), so the
gateway routes and forwards it unchanged; a backend's `ModelInferResponse` (raw output
contents from Switchyard workers, typed contents from other v2 servers) becomes the
REST body, each output as JSON `data` or as binary data after the JSON header, as the
request asked.

The JSON is read strictly: an unknown field, an integer datatype given a non-integer,
a value out of its datatype's range (a float too large for FP16, FP32 or BF16
included) or a `data` count other than the shape's is InvalidInput naming the input.
`data` may be flat or nested lists (row-major).

Triton's binary extension, as tritonclient.http sends and reads it: the body is a JSON
header of `header_length` bytes (the `Inference-Header-Content-Length` header), then
each binary input's bytes in input order. An input is binary when its `parameters`
hold `binary_data_size`; request parameter `binary_data_output: true` makes every
output binary, an output's own `binary_data: true/false` decides for it. These three
are transport details: they are taken off the forwarded message (the backend answers
with raw contents either way). Shared memory and `classification` are not supported
(InvalidInput says so).

JSON carries what it can: FP16 and BF16 as numbers (rounded to the nearest value of
the datatype on the way in), BOOL as true/false, BYTES as strings (UTF-8). A BYTES
output holding bytes that are not UTF-8 cannot be JSON: the request fails with
InvalidInput naming the output and asking for it as binary data, as Triton fails it.
JSON has no NaN or infinity: a float input cannot carry them (send binary data), and
a NaN or infinite output value is written as null (tritonclient reads null back as
NaN).

Pure: no I/O, no asyncio, no grpc. Numeric tensors go through numpy and orjson, with
no Python loop per element (BYTES elements are each a Python object anyway). Imports
the generated protobuf (protos.inference_pb2), as the serving edge may.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import orjson

from backends.protocol.codec import parameter_value
from backends.protocol.errors import Internal, InvalidInput, shown
from backends.protocol.parameters import check_parameter_map
from backends.protocol.tensors import (
    CONTENTS_FIELDS,
    ELEMENT_BYTES,
    MAX_RANK,
    MAX_TENSORS,
    NUMPY_DTYPES,
    decode_bytes_tensor,
    element_count,
    encode_bytes_tensor,
    shape_problem,
)
from protos import inference_pb2 as pb

JsonValue = Any
"""What orjson.loads returns: dict, list, str, int, float, bool or None."""

DATATYPES = frozenset(ELEMENT_BYTES) | {"BYTES"}
"""Every datatype the REST binding carries (BF16 included: it has no numpy dtype, and is
converted by hand)."""

BINARY_DATA_SIZE = "binary_data_size"
"""Input (and response output) parameter: the tensor's bytes follow the JSON header."""

BINARY_DATA_OUTPUT = "binary_data_output"
"""Request parameter: every output as binary data (unless an output says otherwise)."""

BINARY_DATA = "binary_data"
"""Output parameter: this output as binary data (true) or as JSON `data` (false)."""

COST_PARAMETER = "switchyard_cost_usd"
ATTEMPTS_PARAMETER = "switchyard_attempts"
# Response parameters the gateway appends as strings; REST shows them as numbers.
_NUMBER_PARAMETERS = {COST_PARAMETER: float, ATTEMPTS_PARAMETER: int}

_REQUEST_KEYS = frozenset({"id", "parameters", "inputs", "outputs"})
_INPUT_KEYS = frozenset({"name", "shape", "datatype", "parameters", "data"})
_OUTPUT_KEYS = frozenset({"name", "parameters"})
_UNSUPPORTED_PARAMETERS = {
    "shared_memory_region": "shared memory is not supported over REST here",
    "shared_memory_byte_size": "shared memory is not supported over REST here",
    "shared_memory_offset": "shared memory is not supported over REST here",
    "classification": "classification outputs are not supported",
}

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_UINT64_MAX = 2**64 - 1

_INT_DATATYPES = frozenset(
    {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}
)
_FLOAT_DATATYPES = frozenset({"FP16", "FP32", "FP64", "BF16"})

# The numpy dtype of each typed-contents field, as a foreign server fills it.
_FIELD_DTYPES: dict[str, np.dtype[np.generic]] = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}


def _int_bounds(datatype: str) -> tuple[int, int]:
    info = np.iinfo(cast("np.dtype[np.integer[Any]]", NUMPY_DTYPES[datatype]))
    return int(info.min), int(info.max)


_INT_BOUNDS = {dt: _int_bounds(dt) for dt in _INT_DATATYPES}

ParamValue = bool | int | float | str


@dataclass(frozen=True, slots=True)
class RestRequest:
    """A decoded REST inference request."""

    message: pb.ModelInferRequest
    """What the gRPC path forwards: model name and version from the URL, id, parameters,
    inputs with raw_input_contents for every input (never typed contents), the outputs
    requested. The binary extension's own parameters are not in it."""
    binary_outputs: frozenset[str] | bool
    """True: every output as binary data; a set: these outputs as binary data. An
    output not named goes as JSON `data`."""
    output_names: tuple[str, ...]
    """The outputs requested, in order (empty: every output of the model)."""

    def binary(self, name: str) -> bool:
        """Whether output `name` goes as binary data."""
        return self.binary_outputs is True or (
            not isinstance(self.binary_outputs, bool) and name in self.binary_outputs
        )


def error_body(message: str) -> bytes:
    """The body of a failed request: `{"error": message}`."""
    return orjson.dumps({"error": message})


# ---------------------------------------------------------------------------------------
# Requests


def decode_infer_request(
    body: bytes, header_length: int | None, model: str, version: str
) -> RestRequest:
    """The request in a REST body (already decompressed): `header_length` is the
    `Inference-Header-Content-Length` header (None: the whole body is JSON), `model`
    and `version` come from the URL. InvalidInput naming what was wrong (the input,
    the field, what was expected and what came) for anything malformed; counts,
    shapes and sizes are checked before anything is allocated for them."""
    whole = header_length is None
    if header_length is None:
        header_length = len(body)
    elif header_length < 0 or header_length > len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length is {header_length}; the body holds {len(body)} bytes"
        )
    view = memoryview(body)
    try:
        document = orjson.loads(view[:header_length])
    except orjson.JSONDecodeError as exc:
        hint = ""
        if whole and BINARY_DATA_SIZE.encode() in body:
            hint = " (binary data after the JSON needs the Inference-Header-Content-Length header)"
        raise InvalidInput(f"the request's JSON is malformed: {exc}{hint}") from exc
    if not isinstance(document, dict):
        raise InvalidInput(f"the request's JSON must be an object, got {_kind(document)}")
    _check_keys("the request", document, _REQUEST_KEYS)

    message = pb.ModelInferRequest(model_name=model, model_version=version)
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput(f"the request's 'id' must be a string, got {_kind(request_id)}")
    message.id = request_id

    params = _parameter_object("the request", document.get("parameters"))
    binary_all = params.pop(BINARY_DATA_OUTPUT, False)
    if not isinstance(binary_all, bool):
        raise InvalidInput(
            f"request parameter {BINARY_DATA_OUTPUT!r} must be true or false, "
            f"got {shown(binary_all)}"
        )
    _fill_parameters("request", message.parameters, params)

    if "inputs" not in document:
        raise InvalidInput("the request has no 'inputs'")
    inputs = _list_of_objects("the request's 'inputs'", document["inputs"])
    binary = view[header_length:]
    offset = 0
    for index, tensor in enumerate(inputs):
        offset = _decode_input(message, index, tensor, binary, offset)
    if offset != len(binary):
        raise InvalidInput(
            f"the body holds {len(binary) - offset} bytes after the binary data of the "
            f"inputs ({offset} bytes declared by their {BINARY_DATA_SIZE})"
        )

    outputs = _list_of_objects("the request's 'outputs'", document.get("outputs", []))
    names: list[str] = []
    binary_names: set[str] = set()
    for index, out in enumerate(outputs):
        name = _tensor_name("output", index, out)
        where = f"output {shown(name)}"
        _check_keys(where, out, _OUTPUT_KEYS)
        out_params = _parameter_object(where, out.get("parameters"))
        wanted = out_params.pop(BINARY_DATA, binary_all)
        if not isinstance(wanted, bool):
            raise InvalidInput(
                f"{where}: parameter {BINARY_DATA!r} must be true or false, got {shown(wanted)}"
            )
        requested = message.outputs.add(name=name)
        _fill_parameters(where, requested.parameters, out_params)
        names.append(name)
        if wanted:
            binary_names.add(name)
    binary_outputs: frozenset[str] | bool = frozenset(binary_names) if names else binary_all
    if binary_outputs is False:
        binary_outputs = frozenset()
    return RestRequest(message, binary_outputs, tuple(names))


def _decode_input(
    message: pb.ModelInferRequest,
    index: int,
    tensor: dict[str, JsonValue],
    binary: memoryview,
    offset: int,
) -> int:
    """Adds input `index` to `message` (its raw contents too); returns the offset in
    the binary data past this input's bytes."""
    name = _tensor_name("input", index, tensor)
    where = f"input {shown(name)}"
    _check_keys(where, tensor, _INPUT_KEYS)
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str):
        raise InvalidInput(f"{where}: 'datatype' must be a string, got {_kind(datatype)}")
    if datatype not in DATATYPES:
        raise InvalidInput(
            f"{where}: unknown datatype {shown(datatype)}; one of " + ", ".join(sorted(DATATYPES))
        )
    shape = _shape(where, tensor.get("shape"))
    params = _parameter_object(where, tensor.get("parameters"))
    size = params.pop(BINARY_DATA_SIZE, None)
    count = element_count(shape)
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidInput(
                f"{where}: parameter {BINARY_DATA_SIZE!r} must be a non-negative integer, "
                f"got {shown(size)}"
            )
        if "data" in tensor:
            raise InvalidInput(
                f"{where}: has both 'data' and binary data ({BINARY_DATA_SIZE}); give one"
            )
        if offset + size > len(binary):
            raise InvalidInput(
                f"{where}: {BINARY_DATA_SIZE} {size} goes past the end of the body "
                f"({len(binary) - offset} bytes of binary data left)"
            )
        raw = bytes(binary[offset : offset + size])
        _check_raw(where, datatype, shape, count, raw)
        offset += size
    else:
        if "data" not in tensor:
            raise InvalidInput(f"{where}: has neither 'data' nor {BINARY_DATA_SIZE}")
        raw = _json_to_raw(where, datatype, shape, count, tensor["data"])
    proto = message.inputs.add(name=name, datatype=datatype, shape=shape)
    _fill_parameters(where, proto.parameters, params)
    message.raw_input_contents.append(raw)
    return offset


def _check_raw(where: str, datatype: str, shape: list[int], count: int, raw: bytes) -> None:
    """InvalidInput unless `raw` holds exactly `count` elements of `datatype`."""
    if datatype == "BYTES":
        decoded = decode_bytes_tensor(raw, count)
        if isinstance(decoded, str):
            raise InvalidInput(f"{where}: binary data of shape {shape}: {decoded}")
        return
    expected = count * ELEMENT_BYTES[datatype]
    if len(raw) != expected:
        raise InvalidInput(
            f"{where}: binary data holds {len(raw)} bytes; shape {shape} of {datatype} "
            f"needs {expected}"
        )
    if datatype == "BOOL" and raw and np.frombuffer(raw, dtype=np.uint8).max() > 1:
        raise InvalidInput(f"{where}: BOOL binary data must be bytes 0 or 1")


def _json_to_raw(where: str, datatype: str, shape: list[int], count: int, data: JsonValue) -> bytes:
    """The raw contents of an input given as JSON `data` (nested lists, row-major, or
    flat), each value checked against `datatype`."""
    flat, kinds = _flatten(where, data)
    if len(flat) != count:
        raise InvalidInput(f"{where}: 'data' holds {len(flat)} values; shape {shape} needs {count}")
    if datatype == "BOOL":
        _only(where, datatype, kinds, {bool}, "true or false")
        return np.array(flat, dtype=np.bool_).tobytes()
    if datatype == "BYTES":
        _only(where, datatype, kinds, {str}, "strings")
        strings = np.empty(len(flat), dtype=np.object_)
        strings[:] = flat
        return encode_bytes_tensor(strings)
    if datatype in _INT_DATATYPES:
        _only(where, datatype, kinds, {int}, "integers")
        if not flat:
            return b""
        low, high = _INT_BOUNDS[datatype]
        smallest, largest = min(flat), max(flat)
        if smallest < low or largest > high:
            bad = smallest if smallest < low else largest
            raise InvalidInput(
                f"{where}: value {bad} does not fit {datatype} (range {low}..{high})"
            )
        return np.array(flat, dtype=NUMPY_DTYPES[datatype].newbyteorder("<")).tobytes()
    _only(where, datatype, kinds, {int, float}, "numbers")
    wide = np.array(flat, dtype=np.float64)
    if datatype == "FP64":
        return wide.astype("<f8").tobytes()
    if datatype == "BF16":
        bits = _bf16_bits(wide)
        overflow = (bits & 0x7F80) == 0x7F80
    else:
        with np.errstate(over="ignore"):
            narrow = wide.astype(NUMPY_DTYPES[datatype].newbyteorder("<"))
        overflow = ~np.isfinite(narrow)
    if overflow.any():
        bad = flat[int(np.flatnonzero(overflow)[0])]
        raise InvalidInput(f"{where}: value {bad!r} does not fit {datatype} (too large)")
    return bits.tobytes() if datatype == "BF16" else narrow.tobytes()


def _flatten(where: str, data: JsonValue) -> tuple[list[JsonValue], set[type]]:
    """JSON `data` as one flat row-major list, and the kinds of its values. Nested lists
    are flattened a level at a time (in C: no loop per element here); a level mixing
    lists and values is InvalidInput."""
    if not isinstance(data, list):
        raise InvalidInput(f"{where}: 'data' must be a list, got {_kind(data)}")
    flat: list[JsonValue] = data
    for _ in range(MAX_RANK + 1):
        kinds = set(map(type, flat))
        if list not in kinds:
            return flat, kinds
        if len(kinds) > 1:
            raise InvalidInput(f"{where}: 'data' mixes lists and values at one level of nesting")
        flat = list(chain.from_iterable(flat))
    raise InvalidInput(f"{where}: 'data' is nested more than {MAX_RANK} levels deep")


def _only(where: str, datatype: str, kinds: set[type], allowed: set[type], what: str) -> None:
    extra = kinds - allowed
    if extra:
        got = ", ".join(sorted(_kind_name(k) for k in extra))
        raise InvalidInput(f"{where}: {datatype} 'data' must hold {what}, got {got}")


def _bf16_bits(values: npt.NDArray[np.float64]) -> npt.NDArray[np.uint16]:
    """BF16 bit patterns of `values`, rounded to nearest even in one rounding (NaN stays
    NaN): to float32 by rounding to odd (toward zero, the last bit set when inexact),
    which the rounding to BF16's fewer bits then cannot round twice."""
    with np.errstate(over="ignore"):
        nearest = values.astype(np.float32)
    back = nearest.astype(np.float64)
    inexact = back != values
    bits = nearest.view(np.uint32)
    bits = np.where(inexact & (np.abs(back) > np.abs(values)), bits - np.uint32(1), bits)
    bits = np.where(inexact, bits | np.uint32(1), bits).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded).astype("<u2")


def _bf16_values(raw: bytes) -> npt.NDArray[np.float32]:
    """The float32 values of BF16 raw contents (exact: BF16 is float32's top half)."""
    halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32)
    return cast("npt.NDArray[np.float32]", (halves << 16).view(np.float32))


def _shape(where: str, shape: JsonValue) -> list[int]:
    if not isinstance(shape, list):
        raise InvalidInput(f"{where}: 'shape' must be a list of integers, got {_kind(shape)}")
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"{where}: shape has rank {len(shape)}; at most {MAX_RANK} is allowed")
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise InvalidInput(
                f"{where}: 'shape' must be a list of non-negative integers, got {shown(dim)} in it"
            )
    problem = shape_problem(shape)
    if problem:
        raise InvalidInput(f"{where}: {problem}")
    return shape


def _tensor_name(what: str, index: int, tensor: Mapping[str, JsonValue]) -> str:
    name = tensor.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{what} {index}: 'name' must be a non-empty string, got {_kind(name)}")
    return name


def _list_of_objects(where: str, value: JsonValue) -> list[dict[str, JsonValue]]:
    if not isinstance(value, list):
        raise InvalidInput(f"{where} must be a list, got {_kind(value)}")
    if len(value) > MAX_TENSORS:
        raise InvalidInput(f"{where} names {len(value)} tensors; at most {MAX_TENSORS}")
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise InvalidInput(f"{where}[{index}] must be an object, got {_kind(item)}")
    return value


def _check_keys(where: str, obj: Mapping[str, JsonValue], allowed: frozenset[str]) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise InvalidInput(
            f"{where} has unknown field {shown(unknown[0])}; its fields are "
            + ", ".join(sorted(allowed))
        )


def _parameter_object(where: str, params: JsonValue) -> dict[str, JsonValue]:
    """A `parameters` object as given (a copy), its size and strings checked, and no
    value of a kind InferParameter cannot hold (only bool, int, float and str)."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidInput(f"{where}: 'parameters' must be an object, got {_kind(params)}")
    check_parameter_map(where, params)
    for key, value in params.items():
        reason = _UNSUPPORTED_PARAMETERS.get(key)
        if reason is not None:
            raise InvalidInput(f"{where}: parameter {key!r}: {reason}")
        if not isinstance(value, bool | int | float | str):
            raise InvalidInput(
                f"{where}: parameter {shown(key)} must be a boolean, number or string, "
                f"got {_kind(value)}"
            )
    return dict(params)


def _fill_parameters(where: str, target: Any, params: Mapping[str, ParamValue]) -> None:
    """Sets each parameter on a protobuf parameters map as the InferParameter of its
    kind: integers as int64, or uint64 past int64's range."""
    for key, value in params.items():
        entry = target[key]
        if isinstance(value, bool):
            entry.bool_param = value
        elif isinstance(value, int):
            if _INT64_MIN <= value <= _INT64_MAX:
                entry.int64_param = value
            elif _INT64_MAX < value <= _UINT64_MAX:
                entry.uint64_param = value
            else:
                raise InvalidInput(f"{where} parameter {shown(key)}: {value} does not fit 64 bits")
        elif isinstance(value, float):
            entry.double_param = value
        else:
            entry.string_param = value


def _kind(value: JsonValue) -> str:
    """What a JSON value is, for an error message (`a string 'x'`, `an object`)."""
    if value is None:
        return "null"
    if isinstance(value, dict | list):
        return _kind_name(type(value))
    return f"{_kind_name(type(value))} {shown(value)}"


def _kind_name(kind: type) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
        type(None): "null",
    }.get(kind, kind.__name__)


# ---------------------------------------------------------------------------------------
# Responses


def encode_infer_response(
    response: pb.ModelInferResponse, request: RestRequest
) -> tuple[bytes, int | None]:
    """The REST body of a backend's response, and the length of its JSON header when
    binary data follows it (None: the body is all JSON). Each output goes as binary
    data or as JSON `data` as `request` asked. Raw output contents (Switchyard
    workers) and typed contents (other v2 servers) are both read; a response whose
    contents do not match its outputs' shapes is Internal, a BYTES output asked for as
    JSON that is not UTF-8 is InvalidInput (ask for it as binary data)."""
    raws = response.raw_output_contents
    if raws and len(raws) != len(response.outputs):
        raise Internal(
            f"the backend's response has {len(raws)} raw_output_contents for "
            f"{len(response.outputs)} outputs"
        )
    outputs: list[dict[str, JsonValue]] = []
    chunks: list[bytes] = []
    for index, out in enumerate(response.outputs):
        shape = list(out.shape)
        entry: dict[str, JsonValue] = {
            "name": out.name,
            "datatype": out.datatype,
            "shape": shape,
        }
        where = f"output {shown(out.name)}"
        if out.datatype not in DATATYPES:
            raise Internal(f"{where}: the backend sent unknown datatype {shown(out.datatype)}")
        count = element_count(shape)
        if request.binary(out.name):
            data = (
                _checked_raw(where, out.datatype, shape, count, raws[index])
                if raws
                else _typed_to_raw(where, out.datatype, count, out.contents)
            )
            entry["parameters"] = {BINARY_DATA_SIZE: len(data)}
            chunks.append(data)
        elif raws:
            entry["data"] = _raw_to_json(where, out.datatype, shape, count, raws[index])
        else:
            entry["data"] = _typed_to_json(where, out.datatype, count, out.contents)
        outputs.append(entry)
    document: dict[str, JsonValue] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = _response_parameters(response.parameters)
    document["outputs"] = outputs
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def _response_parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, JsonValue]:
    shown_params: dict[str, JsonValue] = {}
    for key, param in params.items():
        value = parameter_value(param)
        convert = _NUMBER_PARAMETERS.get(key)
        if convert is not None and isinstance(value, str):
            try:
                value = convert(value)
            except ValueError:
                pass  # shown as the backend wrote it
        shown_params[key] = value
    return shown_params


def _checked_raw(where: str, datatype: str, shape: list[int], count: int, raw: bytes) -> bytes:
    """`raw` when it holds `count` elements of `datatype`; Internal otherwise."""
    if datatype == "BYTES":
        decoded = decode_bytes_tensor(raw, count)
        if isinstance(decoded, str):
            raise Internal(f"{where}: the backend's raw contents: {decoded}")
        return raw
    expected = count * ELEMENT_BYTES[datatype]
    if len(raw) != expected:
        raise Internal(
            f"{where}: the backend's raw contents hold {len(raw)} bytes; shape {shape} of "
            f"{datatype} needs {expected}"
        )
    return raw


def _raw_to_json(where: str, datatype: str, shape: list[int], count: int, raw: bytes) -> JsonValue:
    """Raw output contents as JSON `data`: a flat numpy array (orjson writes it) or a
    list of strings (BYTES)."""
    if datatype == "BYTES":
        decoded = decode_bytes_tensor(raw, count)
        if isinstance(decoded, str):
            raise Internal(f"{where}: the backend's raw contents: {decoded}")
        return _utf8_strings(where, decoded.tolist())
    _checked_raw(where, datatype, shape, count, raw)
    if datatype == "BF16":
        return _bf16_values(raw)
    if datatype == "BOOL":
        return np.frombuffer(raw, dtype=np.uint8) != 0
    return np.frombuffer(raw, dtype=NUMPY_DTYPES[datatype].newbyteorder("<"))


def _typed_values(
    where: str, datatype: str, count: int, contents: pb.InferTensorContents
) -> npt.NDArray[Any] | list[bytes]:
    """The values of typed output contents: a numpy array of `datatype`, or a list of
    bytes (BYTES). Internal when the count is wrong or a value does not fit."""
    field = CONTENTS_FIELDS.get(datatype)
    if field is None:
        raise Internal(f"{where}: {datatype} has no typed contents, and the backend sent no raw")
    values = getattr(contents, field)
    if len(values) != count:
        raise Internal(
            f"{where}: the backend's {field} holds {len(values)} values; {count} expected"
        )
    if datatype == "BYTES":
        return list(values)
    wide = np.array(values, dtype=_FIELD_DTYPES[field])
    bounds = _INT_BOUNDS.get(datatype)
    if bounds is not None and wide.size and NUMPY_DTYPES[datatype].itemsize < wide.itemsize:
        low, high = int(wide.min()), int(wide.max())
        if low < bounds[0] or high > bounds[1]:
            raise Internal(
                f"{where}: the backend's {field} holds {low if low < bounds[0] else high}, "
                f"out of range for {datatype}"
            )
    return wide.astype(NUMPY_DTYPES[datatype].newbyteorder("<"))


def _typed_to_raw(where: str, datatype: str, count: int, contents: pb.InferTensorContents) -> bytes:
    values = _typed_values(where, datatype, count, contents)
    if isinstance(values, list):
        items = np.empty(len(values), dtype=np.object_)
        items[:] = values
        return encode_bytes_tensor(items)
    return values.tobytes()


def _typed_to_json(
    where: str, datatype: str, count: int, contents: pb.InferTensorContents
) -> JsonValue:
    values = _typed_values(where, datatype, count, contents)
    if isinstance(values, list):
        return _utf8_strings(where, values)
    return values


def _utf8_strings(where: str, items: Sequence[bytes]) -> list[str]:
    try:
        return [item.decode("utf-8") for item in items]
    except UnicodeDecodeError:
        index = next(i for i, item in enumerate(items) if not _is_utf8(item))
        raise InvalidInput(
            f"{where}: BYTES element {index} is not UTF-8, which JSON cannot carry; ask "
            f"for the output as binary data (output parameter {BINARY_DATA}: true)"
        ) from None


def _is_utf8(item: bytes) -> bool:
    try:
        item.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
