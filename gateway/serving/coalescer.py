"""Request coalescing on the gateway's hop: concurrent requests for the same model
and route travel to the backend as one batched call.

Each route (backend and model) lets `limit` calls be in flight. A request that
finds a free slot goes at once, as the caller's own bytes (no latency added,
nothing re-encoded). A
request that finds every slot busy waits; when a call returns, everything waiting
for that route and model that can share a call (same inputs, datatypes and
non-batch dimensions, raw contents, same requested outputs) goes together as one
request whose batch is the sum of theirs, and the answer is split back by rows.
Under load this divides the per-call cost of both hops (gRPC and Python on the
gateway, and on the backend) by the batch size; idle, it changes nothing.

Only requests that check out against the model's signature are merged (raw
contents of exactly the declared size), so a malformed request can never borrow
bytes from a neighbour; it goes alone and gets the backend's own error. A merged
call that fails for any reason other than the backend being unavailable is
retried request by request, so one bad request never fails its neighbours.

A backend that other gateways send to as well (their requests show in its load
reports: `BackendState.shared_outside_group`) gets every request at once: a request held
here would lose its place to theirs, which reach the backend's queue meanwhile, and the
backend's own batcher merges what waits there. The other processes of this gateway's own
`--processes` group do not count: they split one gateway's traffic by connection, and
each merges its share as the one process would.

Waiting requests leave by Triton's `priority` (a lower non-zero value first, the
default 0 last), then earliest deadline first (a request's arrival plus its SLA,
as the router predicts waits), then in arrival order; a merged call carries its
best priority. A backend whose queue also goes by deadline (a Switchyard worker)
is told, as each call leaves, how long its request has left (`switchyard_due_us`;
a merged call: its earliest), less the backend's network round trip: the time the
request still has on arrival for its answer to be back by then.

Imports grpc and generated protobuf (it reads request headers and merges tensors);
nothing of the control plane.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from backends.protocol.parameters import DEFAULT_PRIORITY_LEVEL, DUE_PARAMETER, priority_level
from backends.protocol.tensors import NUMPY_DTYPES
from gateway.routing.fleet import ModelInfo, Route
from gateway.serving.converters import due_parameter, priority_param
from gateway.serving.pool import BackendCallError
from protos import gateway_pb2
from protos import inference_pb2 as pb

# Parameters the gateway consumes; they are not forwarded in a merged request.
ROUTING_PARAMETERS = frozenset({"sla_ms", "sla_class", "priority", "timeout", DUE_PARAMETER})

Send = Callable[[Route, bytes, float | None], Awaitable[bytes]]
INF = float("inf")
GroupKey = tuple[object, ...]


@dataclass(slots=True)
class _Waiting:
    request: bytes
    parsed: pb.ModelInferRequest
    rows: int
    max_rows: int
    deadline: float | None
    future: asyncio.Future[bytes]
    rank: tuple[int, float, int] = (0, 0.0, 0)
    """(priority level, due time, arrival): the order waiting requests leave in."""


@dataclass(slots=True)
class _RouteState:
    in_flight: int = 0
    waiting: dict[GroupKey, list[_Waiting]] = field(default_factory=dict)


def group_key(header: gateway_pb2.InferRequestHeader, info: ModelInfo) -> GroupKey | None:
    """What requests must share to travel together, or None when this one cannot."""
    if info.max_batch_size <= 0 or not header.inputs:
        return None
    if any(
        spec.datatype == "BYTES" or not spec.shape or spec.shape[0] != -1
        for spec in info.inputs + info.outputs
    ):
        return None
    specs = {s.name: s for s in info.inputs}
    if len(header.inputs) != len(specs):
        return None
    rows = -1
    tensors = []
    for tensor in header.inputs:
        spec = specs.get(tensor.name)
        if spec is None or tensor.datatype != spec.datatype or spec.check_shape(tensor.shape):
            return None
        if tensor.shape[0] <= 0 or (rows >= 0 and tensor.shape[0] != rows):
            return None
        rows = tensor.shape[0]
        if tensor.parameters:
            return None
        tensors.append((tensor.name, tensor.datatype, tuple(tensor.shape[1:])))
    if any(out.parameters for out in header.outputs):
        return None
    # Requests merge only with requests carrying the same parameters (the routing
    # ones aside), so the merged request forwards them exactly.
    parameters = tuple(
        sorted(
            (key, param.SerializeToString())
            for key, param in header.parameters.items()
            if key not in ROUTING_PARAMETERS
        )
    )
    outputs = tuple(out.name for out in header.outputs)
    return (header.model_name, header.model_version, tuple(tensors), outputs, parameters)


class Coalescer:
    """Per-route call slots and the merge of waiting requests."""

    def __init__(
        self,
        send: Send,
        clock: Callable[[], float],
        limit: int = 1,
        on_merged: Callable[[Route, int], None] | None = None,
    ) -> None:
        self._send = send
        self._on_merged = on_merged
        self._clock = clock
        self._limit = limit
        self._routes: dict[tuple[str, str, str], _RouteState] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._arrivals = itertools.count()
        self.merged_calls = 0

    async def call(
        self,
        route: Route,
        request: bytes,
        header: gateway_pb2.InferRequestHeader,
        info: ModelInfo,
        timeout_s: float | None,
        due_s: float = INF,
    ) -> bytes:
        """Sends `request` on `route`, alone or merged with others (due at `due_s`,
        by the clock, which ranks it among the waiting); a backend's error status
        raises BackendCallError."""
        state = self._routes.setdefault(route.key, _RouteState())
        if (
            state.in_flight < self._limit
            or self._limit <= 0
            or route.state.shared_outside_group(self._clock())
        ):
            return await self._direct(route, state, request, timeout_s, due_s)
        key = group_key(header, info)
        parsed = None if key is None else _checked(request)
        if key is None or parsed is None:
            return await self._direct(route, state, request, timeout_s, due_s)
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else self._clock() + timeout_s
        waiting = _Waiting(
            request,
            parsed,
            header.inputs[0].shape[0],
            info.max_batch_size,
            deadline,
            loop.create_future(),
            (priority_level(priority_param(header)), due_s, next(self._arrivals)),
        )
        state.waiting.setdefault(key, []).append(waiting)
        try:
            if timeout_s is None:
                return await asyncio.shield(waiting.future)
            return await asyncio.wait_for(asyncio.shield(waiting.future), timeout_s)
        except TimeoutError:
            raise BackendCallError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed") from None
        finally:
            if not waiting.future.done():
                waiting.future.cancel()  # the caller left; the merge skips it

    async def _direct(
        self,
        route: Route,
        state: _RouteState,
        request: bytes,
        timeout_s: float | None,
        due_s: float,
    ) -> bytes:
        state.in_flight += 1
        try:
            return await self._send(route, self._with_due(route, request, due_s), timeout_s)
        finally:
            state.in_flight -= 1
            self._release(route, state)

    def _release(self, route: Route, state: _RouteState) -> None:
        """A slot freed: send the group whose first request ranks first (priority level,
        due time, arrival), merged, its requests taken in rank order."""
        while state.waiting and state.in_flight < self._limit:
            key = min(state.waiting, key=lambda k: min(w.rank for w in state.waiting[k]))
            group = sorted(
                (w for w in state.waiting.pop(key) if not w.future.done()), key=lambda w: w.rank
            )
            if not group:
                continue
            batch, rest = _take(group, group[0].max_rows)
            if rest:
                state.waiting[key] = rest
            state.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._merged(route, state, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _merged(self, route: Route, state: _RouteState, batch: list[_Waiting]) -> None:
        try:
            if len(batch) == 1:
                await self._send_alone(route, batch[0])
                return
            self.merged_calls += 1
            if self._on_merged is not None:
                self._on_merged(route, len(batch))
            requests = [w.parsed for w in batch]
            merged = merge_requests(requests)
            level = batch[0].rank[0]  # the batch's best: it goes first at the backend too
            if level != DEFAULT_PRIORITY_LEVEL:
                merged.parameters["priority"].uint64_param = level
            due_s = min(w.rank[1] for w in batch)
            if route.deadlines and due_s < INF:
                merged.parameters[DUE_PARAMETER].int64_param = self._due_us(route, due_s)
            try:
                reply = await self._send(route, merged.SerializeToString(), self._timeout(batch))
                parts = split_response(pb.ModelInferResponse.FromString(reply), requests)
            except BackendCallError as exc:
                if exc.code == grpc.StatusCode.UNAVAILABLE:
                    for waiting in batch:
                        _fail(waiting, exc)
                    return
                parts = None
            if parts is None:  # isolate: one request per call
                await asyncio.gather(*(self._send_alone(route, w) for w in batch))
                return
            for waiting, part in zip(batch, parts, strict=True):
                if not waiting.future.done():
                    waiting.future.set_result(part)
        finally:
            state.in_flight -= 1
            self._release(route, state)

    async def _send_alone(self, route: Route, waiting: _Waiting) -> None:
        """One waiting request in a call of its own (with its due time and deadline)."""
        request = self._with_due(route, waiting.request, waiting.rank[1])
        await _settle(waiting, self._send(route, request, self._timeout([waiting])))

    def _with_due(self, route: Route, request: bytes, due_s: float) -> bytes:
        """`request` as it leaves for `route`: with how long it has left, where the
        backend queues by deadline."""
        if not route.deadlines or due_s == INF:
            return request
        return request + due_parameter(self._due_us(route, due_s))

    def _due_us(self, route: Route, due_s: float) -> int:
        """How long (us) a request due at `due_s` has at `route`'s backend once there:
        what is left of it, less the way there and back (its network round trip)."""
        left_s = due_s - self._clock() - route.state.network.rtt_ms * 0.001
        return max(0, int(left_s * 1e6))

    def _timeout(self, batch: list[_Waiting]) -> float | None:
        deadlines = [w.deadline for w in batch]
        if any(d is None for d in deadlines):
            return None
        return max(d for d in deadlines if d is not None) - self._clock()


def _take(group: list[_Waiting], max_rows: int) -> tuple[list[_Waiting], list[_Waiting]]:
    batch: list[_Waiting] = []
    rows = 0
    for index, waiting in enumerate(group):
        if batch and rows + waiting.rows > max_rows:
            return batch, group[index:]
        batch.append(waiting)
        rows += waiting.rows
    return batch, []


async def _settle(waiting: _Waiting, call: Awaitable[bytes]) -> None:
    try:
        result = await call
    except BackendCallError as exc:
        _fail(waiting, exc)
        return
    if not waiting.future.done():
        waiting.future.set_result(result)


def _fail(waiting: _Waiting, exc: BackendCallError) -> None:
    if not waiting.future.done():
        waiting.future.set_exception(BackendCallError(exc.code, exc.details, exc.retry_after_ms))


def _checked(request: bytes) -> pb.ModelInferRequest | None:
    """The parsed request when every input has raw contents of exactly the declared
    size (so merged bytes split back exactly), else None."""
    parsed = pb.ModelInferRequest.FromString(request)
    if len(parsed.raw_input_contents) != len(parsed.inputs):
        return None
    for tensor, raw in zip(parsed.inputs, parsed.raw_input_contents, strict=True):
        if tensor.HasField("contents"):
            return None
        count = 1
        for dim in tensor.shape:
            count *= dim
        if len(raw) != count * NUMPY_DTYPES[tensor.datatype].itemsize:
            return None
    return parsed


def merge_requests(requests: list[pb.ModelInferRequest]) -> pb.ModelInferRequest:
    """One request whose batch is the concatenation of theirs (raw contents, row-major)."""
    first = requests[0]
    merged = pb.ModelInferRequest(model_name=first.model_name, model_version=first.model_version)
    for key, param in first.parameters.items():
        if key not in ROUTING_PARAMETERS:
            merged.parameters[key].CopyFrom(param)
    rows = sum(r.inputs[0].shape[0] for r in requests)
    for index, tensor in enumerate(first.inputs):
        merged.inputs.add(
            name=tensor.name, datatype=tensor.datatype, shape=[rows, *tensor.shape[1:]]
        )
        merged.raw_input_contents.append(b"".join(r.raw_input_contents[index] for r in requests))
    merged.outputs.extend(first.outputs)
    return merged


def split_response(
    response: pb.ModelInferResponse, requests: list[pb.ModelInferRequest]
) -> list[bytes] | None:
    """Each request's share of a merged response, serialized; None when the response
    is not laid out as expected (then the requests are retried one by one)."""
    total = sum(r.inputs[0].shape[0] for r in requests)
    if len(response.raw_output_contents) != len(response.outputs):
        return None
    row_bytes = []
    for out, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if not out.shape or out.shape[0] != total or len(raw) % total:
            return None
        row_bytes.append(len(raw) // total)
    parts = []
    offset = 0
    for request in requests:
        rows = request.inputs[0].shape[0]
        part = pb.ModelInferResponse(
            model_name=response.model_name, model_version=response.model_version, id=request.id
        )
        for key, param in response.parameters.items():
            part.parameters[key].CopyFrom(param)
        for out, raw, size in zip(
            response.outputs, response.raw_output_contents, row_bytes, strict=True
        ):
            part.outputs.add(name=out.name, datatype=out.datatype, shape=[rows, *out.shape[1:]])
            part.raw_output_contents.append(raw[offset * size : (offset + rows) * size])
        parts.append(part.SerializeToString())
        offset += rows
    return parts
