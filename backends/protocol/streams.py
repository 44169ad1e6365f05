"""What travels on ModelStreamInfer between the gateway and a worker, at the level of
protobuf's wire format, so that neither side re-encodes a request or an answer.

A request is tagged with an `id` by appending that field to its bytes (protobuf keeps the
last occurrence of a field), and its deadline travels the same way as Triton's `timeout`
parameter (a stream has one gRPC deadline for all its requests). Each answer is a
ModelStreamInferResponse whose `infer_response.id` names its request, in whatever order
requests finish. An error keeps the stream going: its `error_message` says what went
wrong, and `infer_response` carries the request's id and, in its parameters, the status
code (`switchyard_status`, a gRPC code name) and the retry hint of a shed request
(`switchyard_retry_after_ms`) that a unary call's status and trailers would carry.

Plain bytes in, plain values out: no grpc, no generated code, nothing from the gateway.
"""

from __future__ import annotations

from dataclasses import dataclass

from backends.protocol.parameters import MAX_TIMEOUT_US

STATUS_PARAMETER = "switchyard_status"
"""The response parameter that names an error's gRPC status code on a stream."""

RETRY_AFTER_PARAMETER = "switchyard_retry_after_ms"
"""The response parameter that carries a shed request's retry hint on a stream."""

ID_FIELD = 3
"""`id` in both ModelInferRequest and ModelInferResponse."""
_PARAMETERS_FIELD = 4
_ERROR_MESSAGE_FIELD = 1
_INFER_RESPONSE_FIELD = 2
_LEN = 2  # wire type: length-delimited


class WireError(ValueError):
    """Bytes that are not the protobuf message they should be."""


@dataclass(frozen=True, slots=True)
class StreamAnswer:
    """One ModelStreamInferResponse as the gateway reads it: the request's `id`, and
    either the answer (`infer_response`'s bytes, as the backend encoded them) or an
    error (`error_message`, with the status code name and retry hint when given)."""

    id: str
    response: bytes
    error_message: str = ""
    status: str = ""
    retry_after_ms: int | None = None


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def length_delimited(number: int, value: bytes) -> bytes:
    """One length-delimited field (a string, bytes or a message), serialized."""
    return _varint((number << 3) | _LEN) + _varint(len(value)) + value


def id_field(request_id: str) -> bytes:
    """The `id` field set to `request_id`: appended to a request or a response, it
    overrides any `id` before it."""
    return length_delimited(ID_FIELD, request_id.encode())


def timeout_field(timeout_s: float) -> bytes:
    """Triton's `timeout` request parameter (microseconds, at least 1) for `timeout_s`,
    to append to a request: it overrides a `timeout` the request had."""
    timeout_us = min(MAX_TIMEOUT_US, max(1, int(timeout_s * 1e6)))
    value = _varint(2 << 3) + _varint(timeout_us)  # InferParameter.int64_param = 2
    entry = length_delimited(1, b"timeout") + length_delimited(2, value)
    return length_delimited(_PARAMETERS_FIELD, entry)


def fields(data: bytes) -> list[tuple[int, int, int, int]]:
    """The top-level fields of a message: (number, wire type, start, end) of each value
    (for a length-delimited one, its contents). WireError on malformed bytes."""
    found = []
    pos = 0
    size = len(data)
    while pos < size:
        key, pos = _read_varint(data, pos)
        number, kind = key >> 3, key & 7
        start = pos
        if kind == 0:
            _, pos = _read_varint(data, pos)
        elif kind == 1:
            pos += 8
        elif kind == _LEN:
            length, start = _read_varint(data, pos)
            pos = start + length
        elif kind == 5:
            pos += 4
        else:
            raise WireError(f"unsupported wire type {kind}")
        if pos > size:
            raise WireError("truncated field")
        found.append((number, kind, start, pos))
    return found


def message_id(data: bytes) -> str:
    """The `id` of a serialized ModelInferRequest or ModelInferResponse (its last
    occurrence, as protobuf reads it); "" when it has none. Malformed bytes are read
    as far as they go: a request that does not parse may still be answered by id."""
    found = ""
    pos = 0
    try:
        while pos < len(data):
            key, pos = _read_varint(data, pos)
            kind = key & 7
            if kind == 0:
                _, pos = _read_varint(data, pos)
                continue
            if kind != _LEN:
                pos += {1: 8, 5: 4}.get(kind, len(data))
                continue
            length, pos = _read_varint(data, pos)
            if key >> 3 == ID_FIELD and pos + length <= len(data):
                found = data[pos : pos + length].decode("utf-8", "replace")
            pos += length
    except WireError:
        pass
    return found


def read_answer(data: bytes) -> StreamAnswer:
    """A serialized ModelStreamInferResponse, read without decoding its tensors: the
    answer's bytes are `infer_response`'s as they came. WireError when malformed."""
    error = ""
    response = b""
    for number, kind, start, end in fields(data):
        if kind != _LEN:
            continue
        if number == _ERROR_MESSAGE_FIELD:
            error = data[start:end].decode("utf-8", "replace")
        elif number == _INFER_RESPONSE_FIELD:
            response = data[start:end]
    if not error:
        return StreamAnswer(message_id(response), response)
    request_id = ""
    status = ""
    retry_after_ms: int | None = None
    for number, kind, start, end in fields(response):
        if number == ID_FIELD and kind == _LEN:
            request_id = response[start:end].decode("utf-8", "replace")
        elif number == _PARAMETERS_FIELD and kind == _LEN:
            name, value = _parameter(response[start:end])
            if name == STATUS_PARAMETER and isinstance(value, str):
                status = value
            elif name == RETRY_AFTER_PARAMETER and isinstance(value, int):
                retry_after_ms = max(0, value)
    return StreamAnswer(request_id, b"", error, status, retry_after_ms)


def _parameter(entry: bytes) -> tuple[str, str | int | None]:
    """One parameters map entry: its name, and its string or integer value."""
    name = ""
    value: str | int | None = None
    for number, kind, start, end in fields(entry):
        if number == 1 and kind == _LEN:
            name = entry[start:end].decode("utf-8", "replace")
        elif number == 2 and kind == _LEN:
            param = entry[start:end]
            for inner, inner_kind, s, e in fields(param):
                if inner == 3 and inner_kind == _LEN:  # string_param
                    value = param[s:e].decode("utf-8", "replace")
                elif inner in (2, 5) and inner_kind == 0:  # int64_param, uint64_param
                    raw, _ = _read_varint(param, s)
                    value = raw - (1 << 64) if inner == 2 and raw >= 1 << 63 else raw
    return name, value
