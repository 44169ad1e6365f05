"""Merging requests and splitting a merged response (pure protobuf logic), and the order
waiting requests leave in."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from backends.protocol.errors import InvalidInput
from backends.protocol.tensors import TensorSpec
from gateway.routing.fleet import BackendState, ModelInfo, Route
from gateway.serving.coalescer import Coalescer, group_key, merge_requests, split_response
from gateway.serving.converters import priority_param
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


def leave_order(arrivals: list[tuple[str, float | None, int | None]]) -> list[str]:
    """Requests sent one after another through one call slot, each alone (one row
    per call here), as (id, due time or None, priority or None): the order they
    reach the backend while the first holds the slot."""
    one_row = ModelInfo("m", ("1",), "p", INFO.inputs, INFO.outputs, 1, "v")
    route = Route(BackendState("b", "addr", "cpu", 1.0), "m", "v", True)
    first = arrivals[0][0]
    sent: list[str] = []
    gate = asyncio.Event()

    async def send(_route: Route, request: bytes, _timeout: float | None) -> bytes:
        parsed = pb.ModelInferRequest.FromString(request)
        sent.append(parsed.id)
        if parsed.id == first:
            await gate.wait()
        return pb.ModelInferResponse(model_name="m", id=parsed.id).SerializeToString()

    async def scenario() -> None:
        coalescer = Coalescer(send, clock=lambda: 0.0, limit=1)
        calls = []
        for rid, due_s, priority in arrivals:
            r = request(1, 0, rid)
            if priority is not None:
                r.parameters["priority"].uint64_param = priority
            due = float("inf") if due_s is None else due_s
            raw = r.SerializeToString()
            calls.append(
                asyncio.create_task(coalescer.call(route, raw, header(r), one_row, None, due))
            )
            await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(*calls)

    asyncio.run(scenario())
    return sent


def test_waiting_requests_leave_by_priority_then_arrival() -> None:
    """While the first request holds the one call slot, the others wait; they leave by
    Triton's `priority` (1, then 2, then the default)."""
    arrivals: list[tuple[str, float | None, int | None]] = [
        ("first", None, None),
        ("default", None, None),
        ("p2", None, 2),
        ("p1", None, 1),
    ]
    assert leave_order(arrivals) == ["first", "p1", "p2", "default"]


def test_waiting_requests_of_one_priority_leave_earliest_deadline_first() -> None:
    """Within a priority level, the request due first (its arrival plus its SLA, as the
    servicer passes it) leaves first, whatever the order they came in; a tie keeps the
    arrival order; a higher priority still goes before an earlier deadline."""
    arrivals: list[tuple[str, float | None, int | None]] = [
        ("first", 9.0, None),
        ("bronze", 0.25, None),
        ("gold", 0.01, None),
        ("silver", 0.03, None),
        ("bronze-2", 0.25, None),
        ("urgent-late", 5.0, 1),
    ]
    assert leave_order(arrivals) == ["first", "urgent-late", "gold", "silver", "bronze", "bronze-2"]


def test_priority_must_be_a_non_negative_integer() -> None:
    r = request(1, 0, "a")
    assert priority_param(header(r)) == 0
    r.parameters["priority"].uint64_param = 3
    assert priority_param(header(r)) == 3
    for bad in (-1.0, 1.5):
        r.parameters["priority"].double_param = bad
        with pytest.raises(InvalidInput, match="'priority' must be a non-negative integer"):
            priority_param(header(r))
