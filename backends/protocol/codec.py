"""Converts Open Inference Protocol messages to and from the worker's domain types.

Decoding validates every input against the served model's signature and raises
`InvalidInput` with a message naming the input; nothing malformed reaches a
runtime. Raw contents are viewed without copying where the dtype allows.

The one module here that imports generated protobuf (protos.inference_pb2); no grpc, no
runtime, nothing from the gateway.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from backends.protocol.errors import InvalidInput, shown
from backends.protocol.parameters import MAX_PARAMETERS, check_parameter_map
from backends.protocol.tensors import (
    CONFIG_TYPES,
    CONTENTS_FIELDS,
    ELEMENT_BYTES,
    MAX_TENSORS,
    NUMPY_DTYPES,
    TensorSpec,
    as_bytes_items,
    decode_bytes_tensor,
    element_count,
    encode_bytes_tensor,
    shape_problem,
    shown_shape,
)
from backends.runtimes.base import Array
from protos import inference_pb2 as pb

ParamValue = bool | int | float | str

MAX_ZEROS_BYTES = 64 * 1024 * 1024
"""The most bytes of zeros `zeros_request` makes unless told otherwise (the gateway's
default largest message)."""


def _int_range(datatype: str) -> tuple[int, int]:
    info = np.iinfo(cast("np.dtype[np.integer[Any]]", NUMPY_DTYPES[datatype]))
    return int(info.min), int(info.max)


# Value ranges of the typed fields that carry narrower integer types.
_INT_RANGES = {dt: _int_range(dt) for dt in ("INT8", "INT16", "UINT8", "UINT16")}


@dataclass(frozen=True, slots=True)
class Signature:
    """What a served model takes and returns."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int


@dataclass(slots=True)
class DecodedRequest:
    """A validated inference request."""

    id: str
    inputs: dict[str, Array]
    outputs: list[str]
    raw_output: bool
    """Outputs go in raw_output_contents (the default, as Triton does) unless the request
    asks for typed contents with `binary_data_output: false` (request) or
    `binary_data: false` (every requested output)."""
    batch_size: int
    parameters: dict[str, ParamValue] = field(default_factory=dict)


def metadata_message(
    name: str,
    versions: Sequence[str],
    platform: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
) -> pb.ModelMetadataResponse:
    """ModelMetadata for a model's signature (shapes with -1 for any size)."""
    reply = pb.ModelMetadataResponse(name=name, versions=list(versions), platform=platform)
    for spec in inputs:
        reply.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
    for spec in outputs:
        reply.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
    return reply


def add_config_tensors(
    config: pb.ModelConfig, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
) -> None:
    """Fills ModelConfig's input and output lists in Triton's layout: the batch
    dimension left out of `dims` when the model batches (max_batch_size > 0)."""
    batch = config.max_batch_size
    for specs, target in ((inputs, config.input), (outputs, config.output)):
        for spec in specs:
            target.add(
                name=spec.name,
                data_type=pb.DataType.Value(CONFIG_TYPES.get(spec.datatype, "TYPE_INVALID")),
                dims=spec.shape[1:] if batch > 0 else spec.shape,
            )


def parameter_value(param: pb.InferParameter) -> ParamValue | None:
    kind = param.WhichOneof("parameter_choice")
    return None if kind is None else getattr(param, kind)


def parameter_values(
    where: str, parameters: Mapping[str, pb.InferParameter]
) -> dict[str, ParamValue | None]:
    """A parameters map's values (None for an entry with no value set), checked against
    the bounds of backends.protocol.parameters (`check_parameter_map`) before any is
    read: InvalidInput naming `where` ("request", "input 'x'") and what was too big."""
    if len(parameters) > MAX_PARAMETERS:
        check_parameter_map(where, parameters)  # raises: too many
    values = {key: parameter_value(param) for key, param in parameters.items()}
    check_parameter_map(where, values)
    return values


def check_request_size(inputs: int, outputs: int) -> None:
    """InvalidInput when a request names more than MAX_TENSORS inputs or outputs."""
    for what, count in (("inputs", inputs), ("outputs", outputs)):
        if count > MAX_TENSORS:
            raise InvalidInput(
                f"the request names {count} {what}; at most {MAX_TENSORS} are allowed"
            )


def zeros_request(
    model: str,
    inputs: Sequence[TensorSpec],
    max_batch_size: int,
    rows: int = 1,
    parameters: Mapping[str, str | float] | None = None,
    max_bytes: int = MAX_ZEROS_BYTES,
) -> bytes:
    """A serialized ModelInferRequest of zeros in a model's input shapes, as raw
    contents: `rows` in the batch dimension (the first, where the model batches:
    max_batch_size > 0 and it is -1), every other dimension as declared. InvalidInput
    names an input that has no fixed-size datatype (BYTES), another dimension of any
    size or a malformed shape, or says that the contents would take more than
    `max_bytes` (the shapes are a backend's word: checked before anything is
    allocated). `parameters`: strings as string_param, numbers as double_param."""
    request = pb.ModelInferRequest(model_name=model)
    shapes: list[list[int]] = []
    total_bytes = 0
    for spec in inputs:
        size = ELEMENT_BYTES.get(spec.datatype)
        if size is None:
            raise InvalidInput(
                f"input {shown(spec.name)}: cannot make zeros of {shown(spec.datatype)}"
            )
        shape = list(spec.shape)
        if max_batch_size > 0 and shape and shape[0] == -1:
            shape[0] = rows
        if any(d < 0 for d in shape):
            raise InvalidInput(
                f"input {shown(spec.name)}: shape {shown_shape(spec.shape)} has a dimension "
                "of any size"
            )
        problem = shape_problem(shape)
        if problem:
            raise InvalidInput(f"input {shown(spec.name)}: {problem}")
        total_bytes += size * element_count(shape)
        if total_bytes > max_bytes:
            raise InvalidInput(
                f"zeros of the inputs up to {shown(spec.name)} take {total_bytes} bytes, "
                f"over the limit of {max_bytes}"
            )
        shapes.append(shape)
    for spec, shape in zip(inputs, shapes, strict=True):
        size = ELEMENT_BYTES[spec.datatype]
        request.inputs.add(name=spec.name, datatype=spec.datatype, shape=shape)
        request.raw_input_contents.append(bytes(size * element_count(shape)))
    for key, value in (parameters or {}).items():
        if isinstance(value, str):
            request.parameters[key].string_param = value
        else:
            request.parameters[key].double_param = float(value)
    return request.SerializeToString()


def decode_request(request: pb.ModelInferRequest, signature: Signature) -> DecodedRequest:
    """Validates `request` against `signature`; raises InvalidInput naming the culprit.
    Counts, parameters maps and shapes are checked before anything is allocated."""
    check_request_size(len(request.inputs), len(request.outputs))
    parameters = {
        key: value
        for key, value in parameter_values("request", request.parameters).items()
        if value is not None
    }
    specs = {s.name: s for s in signature.inputs}
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "it must hold one entry per input, in input order"
        )
    arrays: dict[str, Array] = {}
    batch_sizes: set[int] = set()
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        spec = specs.get(name)
        if spec is None:
            raise InvalidInput(
                f"unexpected input {shown(name)}: the model takes "
                + ", ".join(repr(s) for s in specs)
            )
        if name in arrays:
            raise InvalidInput(f"input {name!r} is given more than once")
        parameter_values(f"input {name!r}", tensor.parameters)
        if tensor.datatype != spec.datatype:
            given = tensor.datatype[:32] or "(empty)"
            raise InvalidInput(
                f"input {name!r}: datatype {given} does not match the model's {spec.datatype}"
            )
        shape = list(tensor.shape)
        problem = shape_problem(shape) or spec.check_shape(shape)
        if problem:
            raise InvalidInput(f"input {name!r}: {problem}")
        if signature.max_batch_size > 0:
            if shape[0] > signature.max_batch_size:
                raise InvalidInput(
                    f"input {name!r}: batch size {shape[0]} exceeds the model's "
                    f"max_batch_size {signature.max_batch_size}"
                )
            batch_sizes.add(shape[0])
        if raw:
            if tensor.HasField("contents") and tensor.contents.ByteSize():
                raise InvalidInput(f"input {name!r}: has both typed contents and raw contents")
            arrays[name] = _from_raw(name, spec.datatype, shape, raw[index])
        else:
            arrays[name] = _from_typed(name, spec.datatype, shape, tensor.contents)
    missing = [s.name for s in signature.inputs if s.name not in arrays]
    if missing:
        raise InvalidInput("missing input " + ", ".join(repr(m) for m in missing))
    if len(batch_sizes) > 1:
        raise InvalidInput(f"inputs disagree on the batch size: {sorted(batch_sizes)}")
    known_outputs = {s.name for s in signature.outputs}
    outputs: list[str] = []
    for requested in request.outputs:
        out = requested.name
        if out not in known_outputs:
            raise InvalidInput(
                f"unknown output {shown(out)}: the model returns "
                + ", ".join(repr(s.name) for s in signature.outputs)
            )
        if out in outputs:
            raise InvalidInput(f"output {out!r} is requested more than once")
        parameter_values(f"output {out!r}", requested.parameters)
        outputs.append(out)
    if not outputs:
        outputs = [s.name for s in signature.outputs]
    return DecodedRequest(
        id=request.id,
        inputs=arrays,
        outputs=outputs,
        raw_output=_raw_output(request, parameters),
        batch_size=batch_sizes.pop() if batch_sizes else 1,
        parameters=parameters,
    )


def _raw_output(request: pb.ModelInferRequest, parameters: dict[str, ParamValue]) -> bool:
    if parameters.get("binary_data_output") is False:
        return False
    asked = [
        parameter_value(o.parameters["binary_data"])
        for o in request.outputs
        if "binary_data" in o.parameters
    ]
    return not (asked and len(asked) == len(request.outputs) and not any(asked))


def _from_raw(name: str, datatype: str, shape: list[int], data: bytes) -> Array:
    count = element_count(shape)
    if datatype == "BYTES":
        decoded = decode_bytes_tensor(data, count)
        if isinstance(decoded, str):
            raise InvalidInput(f"input {name!r}: {decoded}")
        return decoded.reshape(shape)
    dtype = NUMPY_DTYPES[datatype]
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"input {name!r}: raw contents hold {len(data)} bytes; shape {shape} of "
            f"{datatype} needs {expected}"
        )
    array = np.frombuffer(data, dtype=dtype.newbyteorder("<")).reshape(shape)
    if datatype == "BOOL" and array.size and array.view(np.uint8).max() > 1:
        raise InvalidInput(f"input {name!r}: BOOL raw contents must be bytes 0 or 1")
    return array


def _from_typed(
    name: str, datatype: str, shape: list[int], contents: pb.InferTensorContents
) -> Array:
    field_name = CONTENTS_FIELDS.get(datatype)
    if field_name is None:
        raise InvalidInput(f"input {name!r}: {datatype} travels only as raw_input_contents")
    for other in set(CONTENTS_FIELDS.values()) - {field_name}:
        if len(getattr(contents, other)):
            raise InvalidInput(
                f"input {name!r}: {datatype} contents belong in {field_name}, not {other}"
            )
    values = getattr(contents, field_name)
    count = element_count(shape)
    if len(values) != count:
        raise InvalidInput(
            f"input {name!r}: {field_name} holds {len(values)} elements; shape {shape} needs "
            f"{count}"
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=np.object_)
        array[:] = list(values)
        return array.reshape(shape)
    bounds = _INT_RANGES.get(datatype)
    if bounds is not None and count:
        wide = np.asarray(values, dtype=np.int64)
        low, high = int(wide.min()), int(wide.max())
        if low < bounds[0] or high > bounds[1]:
            raise InvalidInput(
                f"input {name!r}: value out of range for {datatype} "
                f"(got {low if low < bounds[0] else high}, range {bounds[0]}..{bounds[1]})"
            )
    return np.asarray(values, dtype=NUMPY_DTYPES[datatype]).reshape(shape)


def encode_response(
    response: pb.ModelInferResponse,
    specs: Mapping[str, TensorSpec],
    names: Sequence[str],
    arrays: Sequence[Array],
    raw: bool,
) -> None:
    """Fills `response.outputs` from runtime outputs: raw contents when `raw` (or when
    an output is FP16, which has no typed field), typed contents otherwise."""
    raw = raw or any(specs[name].datatype == "FP16" for name in names)
    for name, array in zip(names, arrays, strict=True):
        spec = specs[name]
        out = response.outputs.add()
        out.name = name
        out.datatype = spec.datatype
        out.shape.extend(array.shape)
        if raw:
            if spec.datatype == "BYTES":
                response.raw_output_contents.append(encode_bytes_tensor(array))
            else:
                dtype = NUMPY_DTYPES[spec.datatype].newbyteorder("<")
                response.raw_output_contents.append(
                    np.ascontiguousarray(array, dtype=dtype).tobytes()
                )
        elif spec.datatype == "BYTES":
            out.contents.bytes_contents.extend(as_bytes_items(array))
        else:
            getattr(out.contents, CONTENTS_FIELDS[spec.datatype]).extend(array.reshape(-1).tolist())
