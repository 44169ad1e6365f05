"""`Dispatcher.run` with a transport that runs the first attempt's call inline, in the
request's own task: the call's end, retries and hedges in tasks of their own, and every
way the call can be cancelled (the dispatcher giving it up, the caller going away, both
at once), on a real event loop with a manual clock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from backends.protocol.errors import DeadlineExceeded, Unavailable
from gateway.routing.router import choose
from gateway.routing.sla import Policy
from gateway.serving.dispatch import Attempt, Dispatcher, Job
from tests.unit.serving.test_dispatch import REQ, Counting, ManualTimers, route


class InlineTransport:
    """Each call waits for the test to end it (`answer`, `fail`); the first attempt of a
    `run` is awaited in the request's task, the others run in tasks of their own."""

    def __init__(self) -> None:
        self.dispatcher: Dispatcher | None = None
        self.inlined: list[Attempt] = []
        self.sent: list[Attempt] = []
        self.cancelled: list[Attempt] = []
        self.calls: dict[int, asyncio.Future[bytes]] = {}
        self.started = asyncio.Event()

    def send(self, attempt: Attempt) -> None:
        self.sent.append(attempt)
        attempt.call = asyncio.ensure_future(self._call(attempt))

    def inline(self, attempt: Attempt) -> Coroutine[Any, Any, None]:
        self.inlined.append(attempt)
        return self._call(attempt)

    def cancel(self, attempt: Attempt) -> None:
        self.cancelled.append(attempt)
        task: asyncio.Future[None] | None = attempt.call
        if task is not None:
            task.cancel()

    async def _call(self, attempt: Attempt) -> None:
        assert self.dispatcher is not None
        future = self.calls[id(attempt)] = asyncio.get_running_loop().create_future()
        self.started.set()
        try:
            reply = await future
        except Unavailable as exc:
            self.dispatcher.failed(attempt, exc, True, True, 0.0)
        else:
            self.dispatcher.answered(attempt, reply, 1.0, 0.0)

    async def running(self, attempt: Attempt) -> asyncio.Future[bytes]:
        """The call of `attempt`, once it has started."""
        await self.until(lambda: id(attempt) in self.calls)
        return self.calls[id(attempt)]

    async def until(self, started: Callable[[], bool]) -> None:
        """Waits until calls have started such that `started()` holds."""
        while not started():
            self.started.clear()
            await self.started.wait()


async def ended(task: asyncio.Task[Job]) -> None:
    """Waits for `task` to end: a cancellation taken back by mistake would leave it
    waiting for a job that was abandoned, for ever (the bound only turns that into a
    failure)."""
    await asyncio.wait([task], timeout=30)
    assert task.done(), "the request's task did not end"


class Rig:
    def __init__(self) -> None:
        self.transport = InlineTransport()
        self.timers = ManualTimers()
        self.observer = Counting()
        self.dispatcher = Dispatcher(self.transport, self.timers, self.observer)
        self.transport.dispatcher = self.dispatcher

    def job(self, routes: list[Any], policy: Policy, deadline_s: float | None = None) -> Job:
        decision = choose(REQ, routes, policy, self.timers.now_s)
        return Job(decision, policy, REQ, routes, choose, self.timers.now_s, deadline_s)

    async def request(self, job: Job) -> tuple[asyncio.Task[Job], Attempt]:
        """The job's request task, running, and its inline first attempt."""
        task = asyncio.ensure_future(self._request(job))
        await self.transport.until(lambda: bool(self.transport.calls))
        (first,) = self.transport.inlined
        return task, first

    async def _request(self, job: Job) -> Job:
        done = await self.dispatcher.run(job, self.timers.now_s)
        # The request's task goes on after the job: no cancellation of the dispatcher's
        # is left pending on it.
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        await asyncio.sleep(0)
        return done


async def test_the_first_attempt_runs_in_the_requests_own_task() -> None:
    rig = Rig()
    only = route("only", 0.1)
    job = rig.job([only], Policy(latency_ms=10))
    task, first = await rig.request(job)
    assert rig.transport.sent == [] and only.state.in_flight == 1
    (await rig.transport.running(first)).set_result(b"reply")
    done = await task
    assert done.winner is first and done.reply == b"reply"
    assert only.state.in_flight == 0 and rig.observer.outcomes == [("only", False)]
    assert first.call is None  # the request's task is no longer the attempt's call


async def test_a_hedge_that_wins_ends_the_inline_call_and_the_request_goes_on() -> None:
    rig = Rig()
    cheap, dear = route("cheap", 0.1, p50=4.0, p99=8.0), route("dear", 0.4, p50=4.0, p99=8.0)
    job = rig.job([cheap, dear], Policy(latency_ms=20, hedge=True))
    task, first = await rig.request(job)
    (hedge_at,) = rig.timers.pending()
    rig.timers.advance(hedge_at)
    (hedge,) = rig.transport.sent
    assert hedge.route.backend == "dear"
    (await rig.transport.running(hedge)).set_result(b"from dear")
    done = await task  # the request's task checks it holds no cancellation after
    assert done.winner is hedge and done.reply == b"from dear"
    assert rig.transport.cancelled == [first]
    assert cheap.state.in_flight == 0 and dear.state.in_flight == 0
    assert rig.observer.outcomes == [("dear", False)]  # the loser is not counted


async def test_the_deadline_passing_during_the_inline_call_raises_deadline_exceeded() -> None:
    rig = Rig()
    only = route("only", 0.1)
    job = rig.job([only], Policy(latency_ms=10), deadline_s=0.05)
    task, first = await rig.request(job)
    rig.timers.advance(0.05)
    with pytest.raises(DeadlineExceeded):
        await task
    assert rig.transport.cancelled == [first] and only.state.in_flight == 0


async def test_the_caller_going_away_cancels_the_inline_call_uncounted() -> None:
    rig = Rig()
    only = route("only", 0.1)
    job = rig.job([only], Policy(latency_ms=10), deadline_s=1.0)
    task, first = await rig.request(job)
    task.cancel()
    await ended(task)
    assert task.cancelled()
    assert job.done and first.settled and only.state.in_flight == 0
    assert rig.observer.outcomes == [] and rig.timers.pending() == []


async def test_the_caller_going_away_as_a_hedge_wins_still_ends_the_request() -> None:
    rig = Rig()
    cheap, dear = route("cheap", 0.1, p50=4.0, p99=8.0), route("dear", 0.4, p50=4.0, p99=8.0)
    job = rig.job([cheap, dear], Policy(latency_ms=20, hedge=True))
    task, first = await rig.request(job)
    rig.timers.advance(rig.timers.pending()[0])
    (hedge,) = rig.transport.sent
    hedge_call = await rig.transport.running(hedge)
    # Both before the request's task runs again: the dispatcher's cancellation (the
    # hedge's answer gives the inline call up) and the caller's.
    hedge_call.set_result(b"from dear")
    await asyncio.sleep(0)  # the hedge's task reports its answer
    assert job.done and rig.transport.cancelled == [first]
    task.cancel()
    await ended(task)
    assert task.cancelled()


async def test_a_failed_inline_call_is_retried_in_a_task_of_its_own() -> None:
    rig = Rig()
    cheap, dear = route("cheap", 0.1), route("dear", 0.4)
    job = rig.job([cheap, dear], Policy(latency_ms=10))
    task, first = await rig.request(job)
    (await rig.transport.running(first)).set_exception(Unavailable("down"))
    await rig.transport.until(lambda: len(rig.transport.calls) == 2)
    (retry,) = rig.transport.sent
    assert retry.route.backend == "dear" and rig.observer.retries == ["dear"]
    (await rig.transport.running(retry)).set_result(b"from dear")
    done = await task
    assert done.winner is retry and cheap.state.in_flight == 0 and dear.state.in_flight == 0
