"""Merging requests and splitting a merged response: pure protobuf logic."""

from __future__ import annotations

import numpy as np

from backends.tensors import TensorSpec
from gateway.coalescer import group_key, merge_requests, split_response
from gateway.fleet import ModelInfo
from protos import gateway_pb2
from protos import inference_pb2 as pb

INFO = ModelInfo(
    "m",
    ("1",),
    "p",
    (TensorSpec("x", "FP32", (-1, 2)),),
    (TensorSpec("y", "INT64", (-1,)),),
    8,
    "v",
)


def request(rows: int, start: float, rid: str) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="m", id=rid)
    r.inputs.add(name="x", datatype="FP32", shape=[rows, 2])
    r.raw_input_contents.append(np.arange(start, start + 2 * rows, dtype=np.float32).tobytes())
    r.parameters["sla_ms"].int64_param = 10
    return r


def header(r: pb.ModelInferRequest) -> gateway_pb2.InferRequestHeader:
    return gateway_pb2.InferRequestHeader.FromString(r.SerializeToString())


def test_merge_concatenates_rows_and_drops_routing_parameters() -> None:
    merged = merge_requests([request(1, 0, "a"), request(2, 10, "b")])
    assert list(merged.inputs[0].shape) == [3, 2]
    assert np.frombuffer(merged.raw_input_contents[0], np.float32).tolist() == [
        0,
        1,
        10,
        11,
        12,
        13,
    ]
    assert "sla_ms" not in merged.parameters


def test_split_gives_each_request_its_rows_and_id() -> None:
    requests = [request(1, 0, "a"), request(2, 10, "b")]
    merged = pb.ModelInferResponse(model_name="m", model_version="1")
    merged.outputs.add(name="y", datatype="INT64", shape=[3])
    merged.raw_output_contents.append(np.array([7, 8, 9], np.int64).tobytes())
    merged.parameters["switchyard_variant"].string_param = "v"
    parts = split_response(merged, requests)
    assert parts is not None
    a, b = (pb.ModelInferResponse.FromString(p) for p in parts)
    assert (a.id, list(a.outputs[0].shape)) == ("a", [1])
    assert np.frombuffer(a.raw_output_contents[0], np.int64).tolist() == [7]
    assert (b.id, list(b.outputs[0].shape)) == ("b", [2])
    assert np.frombuffer(b.raw_output_contents[0], np.int64).tolist() == [8, 9]
    assert b.parameters["switchyard_variant"].string_param == "v"


def test_split_refuses_an_unexpected_layout() -> None:
    requests = [request(1, 0, "a"), request(2, 10, "b")]
    wrong_rows = pb.ModelInferResponse()
    wrong_rows.outputs.add(name="y", datatype="INT64", shape=[2])
    wrong_rows.raw_output_contents.append(np.zeros(2, np.int64).tobytes())
    assert split_response(wrong_rows, requests) is None
    typed = pb.ModelInferResponse()
    typed.outputs.add(name="y", datatype="INT64", shape=[3]).contents.int64_contents.extend(
        [1, 2, 3]
    )
    assert split_response(typed, requests) is None


def test_group_key_only_for_mergeable_requests() -> None:
    assert group_key(header(request(1, 0, "a")), INFO) == group_key(
        header(request(3, 5, "b")), INFO
    )
    unbatched = ModelInfo("m", ("1",), "p", INFO.inputs, INFO.outputs, 0, "v")
    assert group_key(header(request(1, 0, "a")), unbatched) is None
    wrong_type = request(1, 0, "a")
    wrong_type.inputs[0].datatype = "FP64"
    assert group_key(header(wrong_type), INFO) is None
    custom = request(1, 0, "a")
    custom.parameters["tenant"].string_param = "x"
    same = request(2, 0, "b")
    same.parameters["tenant"].string_param = "x"
    assert group_key(header(custom), INFO) == group_key(header(same), INFO)
    assert group_key(header(custom), INFO) != group_key(header(request(1, 0, "c")), INFO)
    merged = merge_requests([custom, same])
    assert merged.parameters["tenant"].string_param == "x"
    asked = request(1, 0, "a")
    asked.outputs.add(name="y")
    assert group_key(header(asked), INFO) != group_key(header(request(1, 0, "b")), INFO)
