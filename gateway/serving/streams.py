"""Requests to one backend multiplexed over a few long-lived ModelStreamInfer streams,
in place of one unary call each: a gRPC call and its task cost the gateway more CPU than
the request's bytes do.

Each request is tagged with an id of the stream's own by appending an `id` field to the
caller's bytes (nothing is re-encoded), and its deadline by appending Triton's `timeout`
(backends.protocol.streams); a future waits for the answer with that id. One reader task
per stream resolves the futures as answers come, in any order, and one writer task sends
what the callers queued (gRPC takes one message at a time on a stream; a caller that gives
up never interrupts a write). A caller that gives up (cancelled, or past its deadline)
stops waiting at once; its late answer is dropped. A stream that breaks fails every
request in flight on it with UNAVAILABLE (RESOURCE_EXHAUSTED when the backend refused the
stream for load), so the dispatcher retries them, and the next request opens a new one. A
backend that answers the stream UNIMPLEMENTED (one without ModelStreamInfer: KServe) has
its requests in flight, and every later one, sent as unary calls instead
(`StreamsUnsupported`).

An answer is read with the gateway's two header messages (protos/gateway.proto:
`StreamAnswerHeader`, then the answer's `AnswerId`), parsed in protobuf's C code and
leaving the tensors unparsed; an error answer, or one those do not read, is read at the
wire level (backends.protocol.streams.read_answer), which says what is malformed and reads
an id as far as the bytes go. Imports grpc; no routing.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque

import grpc
from google.protobuf.message import DecodeError

from backends.protocol.status import StatusError
from backends.protocol.streams import (
    StreamAnswer,
    WireError,
    id_field,
    message_id,
    read_answer,
    timeout_field,
)
from protos.gateway_pb2 import AnswerId, StreamAnswerHeader

log = logging.getLogger("switchyard.gateway")

STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"

REFUSALS_BEFORE_UNARY = 2
"""Streams in a row that end INTERNAL before any answer, after which a backend gets unary
calls only (UNIMPLEMENTED says so at once)."""

STREAM_MAX_REQUEST_BYTES = 1 << 20
"""Requests larger than this go to the backend as unary calls, not on a stream: a message
over the backend's own limit ends the whole stream it travels on (its neighbours in
flight would be retried), one stream carries one message at a time (a large one holds
the small ones back), and a call's own cost is small beside a megabyte's."""


class BackendCallError(StatusError):
    """A backend answered a call with an error status (passed to callers unchanged)."""


class StreamsUnsupported(Exception):
    """The backend does not serve ModelStreamInfer: send the request as a unary call."""


class _Stream:
    """One ModelStreamInfer call and the requests in flight on it, by id."""

    def __init__(self, mux: StreamMux, call: grpc.aio.StreamStreamCall) -> None:
        self.mux = mux
        self.call = call
        self.pending: dict[str, asyncio.Future[bytes]] = {}
        self.outbox: deque[bytes] = deque()
        self.wakeup: asyncio.Future[None] | None = None
        self.broken = False
        self.answers = 0
        """Answers read from this stream so far."""
        self.reader = asyncio.ensure_future(self._read())
        self.writer = asyncio.ensure_future(self._write())

    def send(self, data: bytes) -> None:
        self.outbox.append(data)
        wakeup = self.wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while self.outbox:
                    await self.call.write(self.outbox.popleft())
                self.wakeup = loop.create_future()
                await self.wakeup
        except asyncio.CancelledError:
            raise
        except Exception:
            # The call ended (a write to a stream the backend refused fails with
            # INTERNAL "Failed execute_batch"): the reader learns the call's own
            # status (UNIMPLEMENTED from a backend without streams) and fails what
            # is in flight with it.
            return

    async def _read(self) -> None:
        error: Exception
        try:
            while True:
                data = await self.call.read()
                if data is grpc.aio.EOF:
                    break
                self._answer(data)
            code = await self.call.code()
            error = BackendCallError(
                grpc.StatusCode.UNAVAILABLE, f"stream to backend ended ({code.name})"
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            refused = code == grpc.StatusCode.UNIMPLEMENTED
            if refused or (code == grpc.StatusCode.INTERNAL and not self.answers):
                # UNIMPLEMENTED: no ModelStreamInfer there. INTERNAL before any answer:
                # the first write failed on a stream the backend refused, and gRPC
                # reports that write's failure rather than the backend's status. Either
                # way the requests in flight go as unary calls, which say what is wrong.
                self.mux.refused(exc.details() or code.name, for_good=refused)
                error = StreamsUnsupported(exc.details() or code.name)
            else:
                if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    code = grpc.StatusCode.UNAVAILABLE
                error = BackendCallError(code, exc.details() or exc.code().name)
        except asyncio.CancelledError:
            error = BackendCallError(grpc.StatusCode.UNAVAILABLE, "stream to backend closed")
        self.break_with(error)

    def _answer(self, data: bytes) -> None:
        self.answers += 1
        self.mux.refusals = 0
        try:
            answer = read_stream_answer(data)
        except WireError as exc:
            log.warning("backend %s sent a malformed stream answer: %s", self.mux.address, exc)
            return
        future = self.pending.pop(answer.id, None)
        if future is None or future.done():
            return  # its caller gave up
        if not answer.error_message:
            future.set_result(answer.response)
            return
        code = grpc.StatusCode.UNKNOWN
        if answer.status:
            code = getattr(grpc.StatusCode, answer.status, grpc.StatusCode.UNKNOWN)
        future.set_exception(BackendCallError(code, answer.error_message, answer.retry_after_ms))

    def break_with(self, error: Exception) -> None:
        """Ends the stream: every request in flight fails with `error`."""
        if self.broken:
            return
        self.broken = True
        self.mux.forget(self)
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
        self.call.cancel()
        self.writer.cancel()


class StreamMux:
    """Up to `count` streams to one backend, taken in turn; each opened on first use
    and again after it breaks."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        address: str,
        count: int,
        max_request_bytes: int = STREAM_MAX_REQUEST_BYTES,
    ) -> None:
        self.address = address
        self.unsupported = False
        """Set once the backend answered a stream UNIMPLEMENTED: callers go unary."""
        self.max_request_bytes = max_request_bytes
        """Larger requests are for unary calls (`carries`)."""
        self.sent = 0
        """Requests sent on this backend's streams so far."""
        self.refusals = 0
        """Streams in a row that ended INTERNAL before their first answer."""
        self._open = channel.stream_stream(STREAM_METHOD)  # bytes in, bytes out
        self._streams: list[_Stream | None] = [None] * count
        self._turn = itertools.cycle(range(count))
        self._ids = itertools.count(1)

    def refused(self, why: str, for_good: bool) -> None:
        """A stream was refused: UNIMPLEMENTED (`for_good`), or ended INTERNAL before its
        first answer, which REFUSALS_BEFORE_UNARY streams in a row take as a refusal."""
        self.refusals += 1
        if for_good or self.refusals >= REFUSALS_BEFORE_UNARY:
            self.unsupported = True
            log.info("backend %s serves no ModelStreamInfer (%s): unary calls", self.address, why)

    def carries(self, request: bytes) -> bool:
        """Whether `request` goes on a stream: the backend serves streams (as far as
        known) and the request is no larger than `max_request_bytes`."""
        return not self.unsupported and len(request) <= self.max_request_bytes

    async def infer(self, request: bytes, timeout_s: float | None) -> bytes:
        """The backend's answer to `request` (a serialized ModelInferRequest) within
        `timeout_s`: the answer's bytes, with this stream's id for the request's.
        BackendCallError for an error answer, a deadline passed or a broken stream;
        StreamsUnsupported when the backend serves no streams."""
        if self.unsupported:
            raise StreamsUnsupported(self.address)
        if timeout_s is not None and timeout_s <= 0:
            raise _deadline()
        index = next(self._turn)
        stream = self._streams[index]
        if stream is None:
            stream = self._streams[index] = _Stream(self, self._open())
        loop = asyncio.get_running_loop()
        tag = str(next(self._ids))
        future: asyncio.Future[bytes] = loop.create_future()
        stream.pending[tag] = future
        data = request + id_field(tag)
        timer = None
        if timeout_s is not None:
            data += timeout_field(timeout_s)
            timer = loop.call_later(timeout_s, _expire, future)
        stream.send(data)
        self.sent += 1
        try:
            return await future
        finally:
            stream.pending.pop(tag, None)
            if timer is not None:
                timer.cancel()

    def in_flight(self) -> int:
        """Requests sent on this backend's open streams and not yet answered."""
        return sum(len(s.pending) for s in self._streams if s is not None)

    def forget(self, stream: _Stream) -> None:
        """A broken stream leaves its place, for a new one on next use."""
        for index, held in enumerate(self._streams):
            if held is stream:
                self._streams[index] = None

    async def close(self) -> None:
        streams = [s for s in self._streams if s is not None]
        for stream in streams:
            stream.break_with(
                BackendCallError(grpc.StatusCode.UNAVAILABLE, "stream to backend closed")
            )
        tasks = [t for s in streams for t in (s.reader, s.writer)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def read_stream_answer(data: bytes) -> StreamAnswer:
    """A stream answer, read: an answer's bytes and id through the header messages (C
    code, as nearly every answer is); an error answer, or one they do not read (a string
    not UTF-8, malformed bytes), at the wire level. WireError when malformed."""
    try:
        head = StreamAnswerHeader.FromString(data)
    except DecodeError:
        return read_answer(data)  # says what is wrong, or reads it leniently
    if head.error_message:
        return read_answer(data)  # its status and retry hint are in the response
    response = head.infer_response
    try:
        request_id = AnswerId.FromString(response).id
    except DecodeError:
        request_id = message_id(response)  # as far as the bytes go
    return StreamAnswer(request_id, response)


def _expire(future: asyncio.Future[bytes]) -> None:
    if not future.done():
        future.set_exception(_deadline())


def _deadline() -> BackendCallError:
    """What gRPC says of a unary call past its deadline."""
    return BackendCallError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
