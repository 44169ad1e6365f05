"""The gateway reads a backend's stream answers through its header messages
(protos/gateway.proto) where it can, at the wire level where it must: either way it reads
what the wire-level reader does (backends.protocol.streams.read_answer), on good answers,
error answers, ids that are not UTF-8, and bytes that are not an answer at all."""

from __future__ import annotations

import numpy as np
import pytest

from backends.protocol.streams import WireError, length_delimited, read_answer
from gateway.serving.streams import read_stream_answer
from protos import inference_pb2 as pb


def answer(request_id: str, error: str = "", tensors: int = 1) -> bytes:
    reply = pb.ModelStreamInferResponse(error_message=error)
    response = reply.infer_response
    response.model_name, response.id = "m", request_id
    response.parameters["switchyard_variant"].string_param = "ort-cpu-fp32"
    if error:
        response.parameters["switchyard_status"].string_param = "RESOURCE_EXHAUSTED"
        response.parameters["switchyard_retry_after_ms"].int64_param = 25
    for i in range(tensors):
        response.outputs.add(name=f"y{i}", datatype="FP32", shape=[1, 4])
        response.raw_output_contents.append(np.arange(4, dtype=np.float32).tobytes())
    return reply.SerializeToString()


ANSWERS = [
    answer("17"),
    answer(""),
    answer("17", tensors=0),
    answer("17", tensors=3),
    answer("17", error="queue full"),
    answer("", error="queue full"),
    # An id given twice (the stream's appended after the backend's own): the last counts.
    length_delimited(2, pb.ModelInferResponse(id="a").SerializeToString() + b"\x1a\x01b"),
    # An id that is not UTF-8: read as far as it goes, with replacement characters.
    length_delimited(2, b"\x1a\x02\xff\xfe"),
    # An error message that is not UTF-8.
    length_delimited(1, b"\xff") + length_delimited(2, b"\x1a\x013"),
    b"",
]


@pytest.mark.parametrize("data", ANSWERS)
def test_an_answer_reads_as_at_the_wire_level(data: bytes) -> None:
    assert read_stream_answer(data) == read_answer(data)


@pytest.mark.parametrize(
    "data",
    [
        b"\x12\x05abc",  # infer_response longer than the bytes
        b"\x0a",  # a key and no length
        b"\x17",  # wire type 7
    ],
)
def test_bytes_that_are_no_answer_are_malformed_either_way(data: bytes) -> None:
    with pytest.raises(WireError):
        read_answer(data)
    with pytest.raises(WireError):
        read_stream_answer(data)


def test_an_answers_tensors_come_back_as_they_came() -> None:
    data = answer("9", tensors=2)
    read = read_stream_answer(data)
    assert read.id == "9" and not read.error_message
    assert (
        read.response
        == pb.ModelStreamInferResponse.FromString(data).infer_response.SerializeToString()
    )
