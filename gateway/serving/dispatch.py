"""The Dispatcher: runs one routing decision to its end, for the live gateway and for
the simulator alike.

A request's decision names its first route; the Dispatcher sends the attempt there
and, as the transport reports each attempt's end, does the rest: on a retryable
failure the next route of the decision's alternatives (ranked when the retry goes,
by the load of that moment; a baseline's decision chooses again) while the policy's
retries and the deadline allow; with hedging, a second attempt when the first runs
past its predicted p95 (the first answer wins, the others are abandoned); at the
deadline, DeadlineExceeded. An attempt that runs past its timeout (its route's
predicted p99 plus a slack, see `AttemptTimeout`) counts against its backend and, where
another route and the retry budget allow, is retried there while it keeps running (a
hung backend costs a request about its timeout, not its deadline). Retries and hedges
draw on one `RetryBudget` and skip backends that gRPC's retry throttling holds back.
Every attempt is a ticket in its backend's queue
(`BackendState.admit` / `finish`), due at the request's arrival plus its SLA budget.
Answers measure their route's service time: an attempt that found a free slot when
sent, its latency less the network round trip; one that waited and travelled alone,
the time from when it took its slot (the answer that freed it) to its own answer, so
that a backend kept busy by a flood, where no request finds a free slot, still shows
how long it takes (its latency, queue included, would feed the estimate's own error
back, magnified by the queue). Where the backend says how long the request waited in
its queue (a Switchyard worker's load report) and other gateways send there too, its
latency less that wait and the network measures the route whatever the gateway knew of
the queue: a backend that other gateways keep busy does not look slow to this one.

Nothing here does I/O or reads a clock. The transport starts and cancels calls and
reports their ends (`answered`, `failed`) with the time they ended; timers come from
an injected `Timers`; each event carries its `now_s`. The live gateway gives it a
gRPC transport and the event loop's timers (`run` awaits a request's end); the
simulator gives it modelled backends and its own event queue.

Imports the routing core and the domain errors; no grpc, no protobuf.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from backends.protocol.errors import DeadlineExceeded
from gateway.config import GatewaySettings
from gateway.routing.budget import RetryBudget
from gateway.routing.estimates import service_sample
from gateway.routing.figures import predicted_ms as predicted
from gateway.routing.fleet import BackendState, RetryThrottle, Route, Ticket
from gateway.routing.router import Chooser, Decision, RouteRequest, batch_factor, hedge_after_ms
from gateway.routing.sla import Policy


@dataclass(frozen=True, slots=True)
class AttemptTimeout:
    """How long one attempt may run before it counts as failed at its backend and
    the request is retried elsewhere: its route's predicted p99 when sent (queue wait
    included) plus `slack_ms`; never past the caller's deadline."""

    slack_ms: float = 1000.0

    def after_ms(
        self,
        route: Route,
        policy: Policy,
        now_s: float,
        batch_size: int,
        predicted_ms: float = math.inf,
    ) -> float:
        """The timeout of an attempt sent on `route` now; `predicted_ms`: its latency as
        the router just predicted it at the policy's percentile (p99 or above), where
        known. Else (a retry, a hedge, a baseline's choice) a quick bound: the route's
        p99 service time behind the work waiting at its backend, shared by its slots
        (the router's full prediction reads the whole queue: too dear for every send)."""
        if not 0.0 < predicted_ms < math.inf or policy.percentile < 99.0:
            state = route.state
            est = route.estimate
            waiting = max(0, state.in_flight - state.slots + 1)
            wait_ms = waiting * est.mean_ms / state.slots
            service_ms = est.quantile_ms(max(99.0, policy.percentile))
            factor = batch_factor(batch_size, route.row_fraction)
            predicted_ms = predicted(state.network.rtt_ms, service_ms, factor, wait_ms)
        return predicted_ms + self.slack_ms


class AttemptTimedOut(Exception):
    """An attempt ran past its timeout (it may still answer: it is not cancelled)."""


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Timers(Protocol):
    """The dispatcher's clock, and callbacks on it: `callback(now_s)` at `when_s`."""

    def now(self) -> float: ...

    def call_at(self, when_s: float, callback: Callable[[float], None]) -> TimerHandle: ...


class Transport(Protocol):
    """Starts and cancels attempts' calls. It reports each started call's end to the
    dispatcher, once: `answered` or `failed` (never after `cancel`).

    A transport may also have `inline(attempt)`: the attempt's call as a coroutine, for
    `Dispatcher.run` to await in the request's own task rather than start a task of its
    own (a task costs the live gateway a creation, a turn of the event loop to start and
    another to report). The coroutine reports the call's end as `send`'s task does, and
    `cancel` cancels the task that awaits it (`Attempt.call`)."""

    def send(self, attempt: Attempt) -> None: ...

    def cancel(self, attempt: Attempt) -> None: ...


class Observer:
    """What the dispatcher's owner counts: retries and hedges sent, each attempt's
    outcome (`latency_ms` as the gateway saw it when it answered, else None; `fault`:
    a failure that originated at the backend). This one counts nothing: owners
    override what they count."""

    def retried(self, job: Job, route: Route) -> None:
        pass

    def hedged(self, job: Job, route: Route) -> None:
        pass

    def outcome(
        self,
        attempt: Attempt,
        latency_ms: float | None,
        fault: bool,
        error: BaseException | None,
        now_s: float,
    ) -> None:
        pass


@dataclass(eq=False, slots=True)
class Job:
    """One request as the dispatcher runs it."""

    decision: Decision
    policy: Policy
    request: RouteRequest
    routes: Sequence[Route]
    """The routes the decision was made among (a baseline's retry chooses among them again)."""
    chooser: Chooser
    arrived_s: float
    deadline_s: float | None = None
    """When the caller stops waiting (its timeout), if it said."""
    payload: Any = None
    """What the transport sends (the live gateway's request bytes and header)."""
    ident: int = 0
    """The owner's tag (the simulator's request number)."""
    on_done: Callable[[Job], None] | None = None
    """Called once, when the request ends: `winner` answered, or `error` says why not."""
    due_s: float = 0.0
    tried: int = 0
    pending: list[Attempt] = field(default_factory=list)
    winner: Attempt | None = None
    reply: Any = None
    error: BaseException | None = None
    done: bool = False
    hedged: bool = False
    queue: list[Route] | None = None
    """The routes retries and hedges take, best first: ranked on first need."""
    timer: TimerHandle | None = None
    trace: Any = None
    """The owner's trace of the request (the live gateway's spans); None: not traced."""
    inline: bool = False
    """Its next attempt is to be run in the request's own task (`Dispatcher.run`'s
    first), not sent: `_launch` leaves it in `inline_attempt`."""
    inline_attempt: Attempt | None = None


@dataclass(eq=False, slots=True)
class Attempt:
    """One call of a job on one route, and its ticket in the route's backend queue."""

    job: Job
    route: Route
    ticket: Ticket
    free_slot: bool
    """It took a free slot when sent: its latency measures the route."""
    alone: bool = True
    """Its call carries its request only (the transport clears it where its calls may
    be merged with others): had it waited, the time from when it took its slot to its
    answer measures the route."""
    call: Any = None
    """The transport's own handle on the call."""
    hedge_at_s: float | None = None
    """When a hedge follows it: its predicted p95 from its send, as predicted before it
    joined its backend's queue (None where the job hedges no more)."""
    timeout_at_s: float | None = None
    """When it counts as failed at its backend (None: no timeout, or it has passed)."""
    timed_out: bool = False
    """It ran past its timeout and was counted then: its end is not counted again."""
    sent_s: float = 0.0
    settled: bool = False
    """It has left its backend's queue (answered, failed or given up)."""
    trace: Any = None
    """The owner's trace of the attempt (its span); None: not traced."""
    refuse_late: bool = False
    """It asks its backend to refuse it at once if it would be answered past its due
    time (`Dispatcher.refused`): sent to a Switchyard worker that other gateways send
    to as well, whose queue this gateway sees only as of its last load report."""


class Dispatcher:
    def __init__(
        self,
        transport: Transport,
        timers: Timers,
        observer: Observer | None = None,
        budget: RetryBudget | None = None,
        attempt_timeout: AttemptTimeout | None = None,
        throttle: RetryThrottle | None = None,
    ) -> None:
        self.transport = transport
        self.timers = timers
        self.observer = observer if observer is not None else Observer()
        self.budget = budget if budget is not None else RetryBudget(ratio=float("inf"))
        """Retries and hedges allowed; default: unlimited."""
        self.attempt_timeout = attempt_timeout
        self.throttle = throttle
        # An observer that counts no outcomes is not called for each answer.
        self._counts_outcomes = type(self.observer).outcome is not Observer.outcome

    def observe_with(self, observer: Observer) -> None:
        """Reports to `observer` from now on."""
        self.observer = observer
        self._counts_outcomes = type(observer).outcome is not Observer.outcome

    def guard(self, settings: GatewaySettings, throttle: RetryThrottle | None = None) -> None:
        """Takes the retry budget and attempt timeout the gateway's settings say, and
        `throttle` (gRPC's retry throttling, whose tokens the fleet state keeps)."""
        self.budget = RetryBudget(settings.retry_budget_ratio, settings.retry_budget_min_per_s)
        slack_s = settings.attempt_timeout_slack_s
        self.attempt_timeout = AttemptTimeout(slack_s * 1000.0) if slack_s > 0.0 else None
        self.throttle = throttle

    # ---- a job's life -------------------------------------------------------------------

    def start(self, job: Job, now_s: float) -> None:
        """Sends the decision's route its attempt (the decision must name one)."""
        route = job.decision.route
        assert route is not None
        job.due_s = job.arrived_s + job.policy.budget_ms * 0.001
        job.hedged = hedged = not job.policy.hedge
        self.budget.deposit(now_s)
        self._launch(job, route, now_s)
        if job.deadline_s is not None or not hedged or self.attempt_timeout is not None:
            self._arm(job, now_s)

    async def run(self, job: Job, now_s: float) -> Job:
        """`start`, then waits for the job's end (the live gateway): returns the job
        with its winner, or raises its error. Cancelled (the caller went away), it
        abandons the job's attempts.

        Where the transport runs calls inline (`Transport`), the first attempt's call is
        awaited here, in the caller's task; its retries and hedges get tasks of their
        own. Given up by the dispatcher while it runs (a hedge won, the deadline
        passed), that call is cancelled through this task, which takes the cancellation
        back (`Task.uncancel`) and goes on to the job's end; a cancellation of the
        caller's own, at the same moment or any other, still ends it."""
        future: asyncio.Future[Job] | None = None

        def done(finished: Job) -> None:
            if future is not None and not future.done():
                future.set_result(finished)

        job.on_done = done
        inline = getattr(self.transport, "inline", None)
        job.inline = inline is not None
        self.start(job, now_s)
        try:
            attempt = job.inline_attempt
            if attempt is not None and inline is not None:
                job.inline_attempt = None
                await self._run_inline(attempt, inline)
            if not job.done:
                future = asyncio.get_running_loop().create_future()
                await future
        except asyncio.CancelledError:
            self.abandon(job, self.timers.now())
            raise
        if job.error is not None:
            raise job.error
        return job

    @staticmethod
    async def _run_inline(
        attempt: Attempt, inline: Callable[[Attempt], Coroutine[Any, Any, None]]
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        attempt.call = task  # the transport's cancel cancels this task while it runs
        try:
            await inline(attempt)
        except asyncio.CancelledError:
            # Settled before its end was reported: the dispatcher gave it up (and
            # cancelled this task once). Any other cancellation is the caller's.
            if not attempt.settled or task.uncancel() > 0:
                raise
        finally:
            attempt.call = None

    def abandon(self, job: Job, now_s: float) -> None:
        """The job's caller is gone: its attempts are cancelled and leave their queues
        (not counted against their backends), and it ends with no answer."""
        if job.done:
            return
        job.done = True
        self._cancel_timer(job)
        self._give_up(job, now_s)

    # ---- what the transport reports -------------------------------------------------------

    def answered(
        self,
        attempt: Attempt,
        reply: Any,
        latency_ms: float,
        now_s: float,
        queued_ms: float | None = None,
    ) -> Ticket | None:
        """`attempt` answered at `now_s`, `latency_ms` after it was sent (as the gateway
        saw it, network included); `queued_ms`: how long it waited in its backend's
        queue, where the backend said (a Switchyard worker's load report; None: not
        said). Returns the waiting ticket that took its slot."""
        if attempt.settled:
            return None  # given up already (a report that raced its cancel)
        job = attempt.job
        route = attempt.route
        state = route.state
        ticket = attempt.ticket
        nxt = self._settle(attempt, now_s)
        sample = None
        if queued_ms is not None and state.shared(now_s):
            # Its backend, which other gateways send to as well, said how long it waited
            # there (behind their requests, which this one saw only as of their last
            # report): the rest of its latency, less the network, is its service. Where
            # this gateway alone sends, a wait its queue model did not foresee stays in
            # the sample, as the backend's own slowness (fewer slots than it says, a
            # stall), which the estimate must learn.
            sample = service_sample(latency_ms - queued_ms, state.network.rtt_ms)
        elif attempt.free_slot:
            sample = service_sample(latency_ms, state.network.rtt_ms)
        elif attempt.alone and ticket.started_s is not None and ticket.timed:
            # It waited, then took the slot an answer freed: from then to its own answer
            # the slot was its (the backend takes its next request as it answers one).
            sample = (now_s - ticket.started_s) * 1000.0
        if sample is not None:
            # The estimate is of a one-row request: a batch's time is scaled back.
            route.estimate.observe(
                sample / batch_factor(job.request.batch_size, route.row_fraction), now_s
            )
        if self._counts_outcomes and not attempt.timed_out:
            self.observer.outcome(attempt, latency_ms, False, None, now_s)
        if not job.done:
            job.winner, job.reply = attempt, reply
            self._end(job, None, now_s)
        return nxt

    def failed(
        self,
        attempt: Attempt,
        error: BaseException,
        retryable: bool,
        fault: bool,
        now_s: float,
        refused: bool = False,
    ) -> Ticket | None:
        """`attempt` failed at `now_s`: `retryable` when another route may serve the
        request, `fault` when the failure originated at the backend (it counts toward
        ejecting it), `refused` when its backend refused it at once as it asked
        (see `Dispatcher.refused`). Returns the waiting ticket that took its slot."""
        if attempt.settled:
            return None
        job = attempt.job
        nxt = self._settle(attempt, now_s)
        if not attempt.timed_out:
            self.observer.outcome(attempt, None, fault, error, now_s)
        if job.done:
            return nxt
        if retryable and not self._past_deadline(job, now_s):
            avoid = attempt.route.state if refused else None
            retry = self._next_route(job, now_s, avoid)
            if retry is not None:
                self.observer.retried(job, retry)
                self._launch(job, retry, now_s)
            elif refused and not job.pending:
                self._launch(job, attempt.route, now_s, refusable=False)
        if not job.pending:
            if retryable and self._past_deadline(job, now_s):
                error = self._deadline_error(job)
            self._end(job, error, now_s)
        elif not job.hedged or self.attempt_timeout is not None:
            self._arm(job, now_s)
        return nxt

    def refused(self, attempt: Attempt, error: BaseException, now_s: float) -> Ticket | None:
        """`attempt`'s backend refused it at once, as it asked (`Attempt.refuse_late`): it
        would have been answered past its due time there, behind requests this gateway
        did not know of (other gateways'). The request goes to the next route on another
        backend, as after a retryable failure; where there is none (or the retries or
        their budget are spent), back to the same backend, this time to wait its turn
        there: a refusal never costs a request. Returns the waiting ticket that took its
        slot."""
        return self.failed(attempt, error, True, False, now_s, refused=True)

    # ---- inside ---------------------------------------------------------------------------

    def _launch(self, job: Job, route: Route, now_s: float, refusable: bool = True) -> None:
        job.tried += 1
        hedge_at_s = None
        if not job.hedged:
            batch = job.request.batch_size
            hedge_at_s = now_s + hedge_after_ms(route, job.policy, now_s, batch) / 1000.0
        timeout_at_s = None
        timeout = self.attempt_timeout
        if timeout is not None:  # predicted, like the hedge's, before it joins the queue
            decision = job.decision
            predicted = decision.predicted_ms if route is decision.route else math.inf
            after_ms = timeout.after_ms(route, job.policy, now_s, job.request.batch_size, predicted)
            timeout_at_s = now_s + after_ms * 0.001
        ticket = route.state.admit(
            route, route.estimate.mean_ms, job.due_s, now_s, job.policy.budget_ms
        )
        attempt = Attempt(job, route, ticket, ticket.started_s is not None)
        attempt.hedge_at_s = hedge_at_s
        attempt.sent_s = now_s
        if refusable and route.deadlines and job.due_s < math.inf:
            attempt.refuse_late = route.state.shared(now_s)
        if timeout_at_s is not None:
            attempt.timeout_at_s = timeout_at_s
        ticket.attempt = attempt
        job.pending.append(attempt)
        if job.inline:  # `run` awaits its call in the request's own task
            job.inline = False
            job.inline_attempt = attempt
            return
        self.transport.send(attempt)

    def _next_route(
        self, job: Job, now_s: float, avoid: BackendState | None = None
    ) -> Route | None:
        """The next available route for a retry or a hedge, while retries allow (none on
        backend `avoid`: one that refused the request, whatever the variant)."""
        if job.tried > job.policy.retries:
            return None
        queue = job.queue
        if queue is None:
            queue = job.queue = self._alternatives(job, now_s)
        throttle = self.throttle
        while queue:
            candidate = queue.pop(0)
            state = candidate.state
            if (
                not state.available
                or state is avoid
                or any(a.route is candidate for a in job.pending)
            ):
                continue  # down, or already running this request (a timed-out attempt)
            if throttle is not None and state.retry_tokens <= throttle.max_tokens * 0.5:
                continue
            if not self.budget.withdraw(now_s):
                queue.insert(0, candidate)
                return None
            return candidate
        return None

    @staticmethod
    def _alternatives(job: Job, now_s: float) -> list[Route]:
        """The SLA router's decision ranks the other routes now; a baseline chooses again."""
        if job.decision.ranks:
            return job.decision.alternatives(now_s)
        again = job.chooser(job.request, job.routes, job.policy, now_s)
        return [] if again.route is None else [again.route]

    def _arm(self, job: Job, now_s: float) -> None:
        """The job's next timer: the hedge (its first attempt out's predicted p95), an
        attempt's timeout or the deadline, whichever comes first."""
        self._cancel_timer(job)
        when = job.deadline_s
        if not job.hedged and job.pending:
            hedge_s = job.pending[0].hedge_at_s
            if hedge_s is not None:
                when = hedge_s if when is None else min(when, hedge_s)
        for attempt in job.pending:
            timeout_s = attempt.timeout_at_s
            if timeout_s is not None and (when is None or timeout_s < when):
                when = timeout_s
        if when is not None:
            job.timer = self.timers.call_at(when, lambda at_s: self._timer(job, at_s))

    def _timer(self, job: Job, now_s: float) -> None:
        job.timer = None
        if job.done:
            return
        if self._past_deadline(job, now_s):
            # The caller's deadline passed: the attempts still out are given up, and
            # not counted against their backends (the caller chose the deadline).
            late = DeadlineExceeded("deadline passed")
            for attempt in self._give_up(job, now_s):
                if not attempt.timed_out:
                    self.observer.outcome(attempt, None, False, late, now_s)
            self._end(job, self._deadline_error(job), now_s)
            return
        late_attempts = [
            a for a in job.pending if a.timeout_at_s is not None and now_s >= a.timeout_at_s
        ]
        for attempt in late_attempts:
            # Past its timeout: it counts against its backend at once, and the request
            # is retried elsewhere while this attempt keeps running (it may yet win).
            attempt.timeout_at_s = None
            attempt.timed_out = True
            after_ms = (now_s - attempt.sent_s) * 1000.0
            error = AttemptTimedOut(
                f"no answer from {attempt.route.backend} after {after_ms:.0f} ms"
            )
            self.observer.outcome(attempt, None, True, error, now_s)
            retry = self._next_route(job, now_s)
            if retry is not None:
                self.observer.retried(job, retry)
                self._launch(job, retry, now_s)
        if not late_attempts and not job.hedged:
            hedge_s = job.pending[0].hedge_at_s if job.pending else None
            if hedge_s is not None and now_s >= hedge_s:
                job.hedged = True
                hedge = self._next_route(job, now_s)
                if hedge is not None:
                    self.observer.hedged(job, hedge)
                    self._launch(job, hedge, now_s)
        self._arm(job, now_s)

    def _end(self, job: Job, error: BaseException | None, now_s: float) -> None:
        job.done = True
        job.error = error
        self._cancel_timer(job)
        if job.pending:
            # Attempts still out lost the race (hedges): they leave their queues uncounted.
            self._give_up(job, now_s)
        if job.on_done is not None:
            job.on_done(job)

    def _settle(self, attempt: Attempt, now_s: float) -> Ticket | None:
        """The attempt leaves its backend's queue and its job's attempts out."""
        attempt.settled = True
        attempt.job.pending.remove(attempt)
        return attempt.route.state.finish(attempt.ticket, now_s)

    def _give_up(self, job: Job, now_s: float) -> list[Attempt]:
        """Cancels the job's attempts still out; returns them."""
        given_up = job.pending
        job.pending = []
        for attempt in given_up:
            attempt.settled = True
            self.transport.cancel(attempt)
            attempt.route.state.finish(attempt.ticket, now_s)
        return given_up

    def _cancel_timer(self, job: Job) -> None:
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None

    @staticmethod
    def _past_deadline(job: Job, now_s: float) -> bool:
        return job.deadline_s is not None and now_s >= job.deadline_s

    @staticmethod
    def _deadline_error(job: Job) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"deadline passed after {job.tried} attempt(s) for model {job.request.model!r}"
        )


class LoopTimers:
    """Timers on the running event loop, for a dispatcher whose clock is `clock`."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock

    def now(self) -> float:
        return self.clock()

    def call_at(self, when_s: float, callback: Callable[[float], None]) -> TimerHandle:
        loop = asyncio.get_running_loop()
        return loop.call_later(max(0.0, when_s - self.clock()), lambda: callback(self.clock()))
