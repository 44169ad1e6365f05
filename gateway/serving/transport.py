"""The live side of the Dispatcher: its gRPC transport (each attempt's call through the
coalescer and the backend pool, as forwarded bytes) and its observer (metrics, the
routes' observed latency, passive outlier detection).

Imports grpc and the data plane's coalescer and pool; the Dispatcher knows none of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc

from backends.protocol.errors import DeadlineExceeded, SwitchyardError
from backends.protocol.load import (
    GROUP_SEPARATOR,
    REPORT_FIELD_BYTES,
    ReportError,
    caller_field,
    split_report,
)
from backends.protocol.parameters import LATE_REFUSAL
from backends.protocol.status import retry_after_ms
from backends.protocol.streams import id_field
from gateway.routing.fleet import FleetState, ModelInfo, Route
from gateway.serving.coalescer import Coalescer
from gateway.serving.converters import refuse_late_parameter, request_parameters
from gateway.serving.dispatch import Attempt, Dispatcher, Job, Observer
from gateway.serving.metrics import GatewayMetrics
from gateway.serving.pool import BackendCallError, BackendPool
from gateway.serving.streams import StreamsUnsupported
from protos import gateway_pb2

log = logging.getLogger("switchyard.gateway")

# Codes on which an attempt is retried on the next route: the backend could not
# run it (down, overloaded) or failed on its side; inference is idempotent.
# CANCELLED from a backend (the gateway's own cancellations of hedges never reach
# here) is its gRPC server shedding calls it had not yet accepted when its backlog
# passed gRPC's pending-request limit, as Python servers do when overloaded.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
# Codes that count against a backend in passive outlier detection: failures of its
# own. Not the caller's errors (INVALID_ARGUMENT...), not a deadline (the caller's,
# which travels with the call: attempts past their own timeout are counted by the
# dispatcher), and not load shed (RESOURCE_EXHAUSTED, CANCELLED): an overloaded
# backend is routed around by its queue, and ejecting it would pile its load on
# the others.
BACKEND_FAULTS = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
)
# Codes that give no verdict on the backend either way.
NO_VERDICT = frozenset(
    {
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)

REFUSED = grpc.StatusCode.RESOURCE_EXHAUSTED
"""The code of a worker's refusal of a request it would answer past its due time."""
REFUSE_LATE = refuse_late_parameter()
"""The parameter, as appended to a request, that asks a worker for that refusal."""

ANSWER_QUEUED_MS: ContextVar[float | None] = ContextVar("switchyard_answer_queued_ms", default=None)
"""How long (ms) the answer to the call last made in this task waited in its backend's
queue, as the backend's load report said (`LoadReport.queued_us`); set by `_send`, read
by the attempt whose task made the call. A merged call is made in a task of the
coalescer's: its attempts see none."""

TRACED_ATTEMPT: ContextVar[Attempt | None] = ContextVar("switchyard_traced_attempt", default=None)
"""The traced attempt whose call task this is (set by tracing as the task starts; tasks
it starts inherit it, so a call checks the task is the attempt's own)."""


@dataclass(frozen=True, slots=True)
class Forward:
    """What a live job's attempts send: the caller's bytes and what was parsed of them."""

    request: bytes
    header: gateway_pb2.InferRequestHeader
    info: ModelInfo


class GrpcTransport:
    """Each attempt is one coalescer call of the job's bytes (the variant named when the
    route's is not the backend's default), under the job's deadline and due time.

    A request to a Switchyard worker names this gateway (`switchyard_caller`, an id
    drawn at start), and its answer ends with the worker's load report, less this
    gateway's own requests (backends.protocol.load): the report goes to the backend's
    queue model (`BackendState.record_report`, unless the fleet's `load_reports` is off)
    and is cut off the answer, so callers never see it."""

    def __init__(
        self,
        pool: BackendPool,
        fleet: FleetState,
        metrics: GatewayMetrics,
        clock: Callable[[], float],
        coalesce_in_flight: int,
    ) -> None:
        self.pool = pool
        self.fleet = fleet
        self.metrics = metrics
        self.clock = clock
        self.dispatcher: Dispatcher | None = None
        self._merges = coalesce_in_flight > 0
        """Calls may carry several requests, merged: their answers measure no route
        once they waited (see Attempt.alone)."""
        self._variant_suffixes: dict[str, bytes] = {}
        self.caller = b""
        """This gateway's name in its requests (the field as sent), for the workers'
        load reports; its latency probes carry it too (Prober.caller)."""
        self.name_caller(None)
        self._streams = pool.streams > 0
        self.traced = False
        """Attempts may carry trace context to their backends (gateway.serving.tracing)."""
        self.coalescer = Coalescer(
            self._send,
            clock,
            coalesce_in_flight,
            lambda route, n: metrics.merged_batch.labels(route.backend, route.model).observe(n),
        )

    def name_caller(self, group: str | None) -> None:
        """Names this gateway afresh in its requests: an id of its own, within `group`
        where given (`GROUP/ID`: a `--processes` group's processes share one, so the
        workers' reports tell them apart from other gateways)."""
        own = uuid.uuid4().hex[:12]
        self.caller = caller_field(own if group is None else f"{group}{GROUP_SEPARATOR}{own}")

    def send(self, attempt: Attempt) -> None:
        attempt.alone = not self._merges
        attempt.call = asyncio.ensure_future(self._attempt(attempt))

    def inline(self, attempt: Attempt) -> Coroutine[Any, Any, None]:
        """The attempt's call, for the dispatcher to await in the request's own task
        (see `Transport`)."""
        attempt.alone = not self._merges
        return self._attempt(attempt)

    def cancel(self, attempt: Attempt) -> None:
        task: asyncio.Future[None] | None = attempt.call
        if task is not None:
            task.cancel()

    async def _attempt(self, attempt: Attempt) -> None:
        """The attempt's call, reported to the dispatcher the moment it ends (its
        latency measured here, not after the event loop gets round to a callback)."""
        job, route = attempt.job, attempt.route
        forward: Forward = job.payload
        request = forward.request
        if not route.default:
            request = request + self._variant_parameter(route.variant)
        if attempt.refuse_late:
            request = request + REFUSE_LATE
        timeout_s = None if job.deadline_s is None else job.deadline_s - self.clock()
        dispatcher = self.dispatcher
        assert dispatcher is not None
        in_flight = self.metrics.in_flight.labels(route.backend)
        in_flight.inc()
        # A task made after an inline attempt's call copies the request's context, with
        # that call's figure in it: each attempt reads its own call's only.
        ANSWER_QUEUED_MS.set(None)
        sent_ns = time.perf_counter_ns()
        try:
            reply = await self.coalescer.call(
                route, request, forward.header, forward.info, timeout_s, job.due_s
            )
        except asyncio.CancelledError:
            raise  # the dispatcher gave it up
        except BackendCallError as exc:
            code = exc.code
            if attempt.refuse_late and _late_refusal(exc):
                dispatcher.refused(attempt, exc, self.clock())
            else:
                dispatcher.failed(
                    attempt, exc, code in RETRYABLE, code in BACKEND_FAULTS, self.clock()
                )
        except SwitchyardError as exc:
            dispatcher.failed(attempt, exc, False, True, self.clock())
        except Exception as exc:
            log.exception("attempt on %s failed", route.backend)
            dispatcher.failed(attempt, exc, False, True, self.clock())
        else:
            latency_ms = (time.perf_counter_ns() - sent_ns) / 1e6
            if self._streams:
                # A stream's answer names the stream's id for the request: the caller's
                # own (or none) goes back in its place.
                reply += id_field(forward.header.id)
            queued_ms = ANSWER_QUEUED_MS.get()
            dispatcher.answered(attempt, reply, latency_ms, self.clock(), queued_ms)
        finally:
            in_flight.dec()

    async def _send(self, route: Route, request: bytes, timeout_s: float | None) -> bytes:
        """One backend call, as the coalescer makes it: on a stream where the backend
        serves them, else unary."""
        client = self.pool.client(route.address)
        if route.deadlines:  # a Switchyard worker: it reports its load to the caller named
            request += self.caller
        trace = _attempt_trace() if self.traced else None
        metadata = None if trace is None else trace.metadata()
        error: BackendCallError
        try:
            streams = client.streams
            if streams is not None and streams.carries(request):
                if trace is not None:  # a stream's requests have no metadata of their own
                    request += trace.parameter()
                try:
                    reply = await streams.infer(request, timeout_s)
                except StreamsUnsupported:
                    reply = await client.infer(request, timeout=timeout_s, metadata=metadata)
            else:
                reply = await client.infer(request, timeout=timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            hint = retry_after_ms(exc.trailing_metadata())
            error = BackendCallError(code, exc.details() or code.name, hint)
        except BackendCallError as exc:
            error = exc
        else:
            self.metrics.attempts.labels(route.backend, "OK").inc()
            try:
                reply, report = split_report(reply)
            except ReportError as exc:
                log.warning("backend %s sent a malformed load report: %s", route.backend, exc)
                return reply[:-REPORT_FIELD_BYTES]
            if report is not None and self.fleet.load_reports:
                route.state.record_report(report, self.clock())
                if report.queued_us is not None:
                    ANSWER_QUEUED_MS.set(report.queued_us * 0.001)
            return reply
        code = error.code
        self.metrics.attempts.labels(route.backend, _outcome(error)).inc()
        if code == grpc.StatusCode.UNAVAILABLE:
            # Passive health: a backend that refuses connections leaves the routes
            # until a probe finds it ready again.
            self.fleet.record_failure(route.backend, self.clock(), error.details)
            log.warning("backend %s unavailable: %s", route.backend, error.details)
        raise error

    def _variant_parameter(self, variant: str) -> bytes:
        suffix = self._variant_suffixes.get(variant)
        if suffix is None:
            suffix = request_parameters({"switchyard_variant": variant})
            self._variant_suffixes[variant] = suffix
        return suffix


REFUSED_LATE = "REFUSED_LATE"
"""The attempts metric's outcome for a worker's refusal of a request it would answer past
its due time, as the gateway asked (a RESOURCE_EXHAUSTED of its own: a gateway sharing the
worker with others learnt of their requests, not a queue shedding load)."""


def _late_refusal(error: BackendCallError) -> bool:
    """Whether `error` is a worker's refusal of a request it would answer past its due
    time (as asked: `Attempt.refuse_late`)."""
    return bool(error.code == REFUSED and LATE_REFUSAL in error.details)


def _outcome(error: BackendCallError) -> str:
    """An attempt's failure as the attempts metric names it: its status code's name, or
    REFUSED_LATE."""
    return REFUSED_LATE if _late_refusal(error) else str(error.code.name)


def _attempt_trace() -> Any:
    """The trace of the attempt this call is for: None where the call is not one
    attempt's own (a merged call, sent from another attempt's task)."""
    attempt = TRACED_ATTEMPT.get()
    if attempt is None or attempt.call is not asyncio.current_task():
        return None
    return attempt.trace


class GatewayObserver(Observer):
    """Retries and hedges in the decision metrics; each attempt's outcome in the route's
    observed latency and the fleet's passive outlier detection, whose ejections (and
    the clean spells that end their runs) go to `FleetState.on_ejection`."""

    def __init__(self, fleet: FleetState, metrics: GatewayMetrics) -> None:
        self.fleet = fleet
        self.metrics = metrics

    def retried(self, job: Job, route: Route) -> None:
        self.metrics.decisions.labels(route.model, "retry").inc()

    def hedged(self, job: Job, route: Route) -> None:
        self.metrics.decisions.labels(route.model, "hedge").inc()

    def outcome(
        self,
        attempt: Attempt,
        latency_ms: float | None,
        fault: bool,
        error: BaseException | None,
        now_s: float,
    ) -> None:
        route = attempt.route
        state = route.state
        if latency_ms is not None:
            route.observed.observe(latency_ms, now_s)
        fleet = self.fleet
        run = state.ejections
        ejected = fleet.record_attempt(route, _verdict(fault, error), now_s, _describe(error))
        if ejected:
            self.metrics.ejections.labels(route.backend).inc()
            log.warning("backend %s ejected: %s", route.backend, state.last_error)
        # An ejection made here, or a clean spell that ended a run, goes to whoever
        # listens (the control plane, with a shared store).
        if (ejected or (run and not state.ejections)) and fleet.on_ejection is not None:
            fleet.on_ejection(state)


def _verdict(fault: bool, error: BaseException | None) -> bool | None:
    """An attempt's outcome for outlier detection: False (the backend failed it), None
    (no verdict: a deadline, a cancellation or load shed), True (it answered)."""
    if fault:
        return False
    if isinstance(error, DeadlineExceeded):
        return None
    if isinstance(error, BackendCallError) and error.code in NO_VERDICT:
        return None
    return True


def _describe(error: BaseException | None) -> str:
    if error is None:
        return ""
    if isinstance(error, BackendCallError):
        return f"{error.code.name}: {error.details}"
    return str(error)
