"""The Dispatcher's rules (attempts, retries, hedges, deadlines, queue bookkeeping),
driven through its transport and timer interfaces by a scripted transport and a
manual clock: the same code the live gateway and the simulator run."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

import pytest

from backends.protocol.errors import DeadlineExceeded, Exhausted, InvalidInput, Unavailable
from gateway.routing.budget import RetryBudget
from gateway.routing.fleet import BackendState, RetryThrottle, Route
from gateway.routing.router import RouteRequest, choose, fastest_only, predict_ms
from gateway.routing.sla import Policy
from gateway.serving.dispatch import Attempt, AttemptTimeout, Dispatcher, Job, Observer

REQ = RouteRequest("m")


class ManualTimers:
    """A clock that moves only when told, with the timers due by then."""

    def __init__(self) -> None:
        self.now_s = 0.0
        self._heap: list[tuple[float, int, _Handle]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self.now_s

    def call_at(self, when_s: float, callback: Callable[[float], None]) -> _Handle:
        handle = _Handle(callback)
        heapq.heappush(self._heap, (when_s, next(self._seq), handle))
        return handle

    def pending(self) -> list[float]:
        return sorted(when for when, _, h in self._heap if not h.cancelled)

    def advance(self, to_s: float) -> None:
        while self._heap and self._heap[0][0] <= to_s:
            when, _, handle = heapq.heappop(self._heap)
            self.now_s = when
            if not handle.cancelled:
                handle.callback(when)
        self.now_s = to_s


class _Handle:
    def __init__(self, callback: Callable[[float], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ScriptedTransport:
    """Records what is sent and cancelled; the test ends each call."""

    def __init__(self) -> None:
        self.sent: list[Attempt] = []
        self.cancelled: list[Attempt] = []

    def send(self, attempt: Attempt) -> None:
        self.sent.append(attempt)

    def cancel(self, attempt: Attempt) -> None:
        self.cancelled.append(attempt)


class Counting(Observer):
    def __init__(self) -> None:
        self.retries: list[str] = []
        self.hedges: list[str] = []
        self.outcomes: list[tuple[str, bool]] = []

    def retried(self, job: Job, route: Route) -> None:
        self.retries.append(route.backend)

    def hedged(self, job: Job, route: Route) -> None:
        self.hedges.append(route.backend)

    def outcome(
        self,
        attempt: Attempt,
        latency_ms: float | None,
        fault: bool,
        error: BaseException | None,
        now_s: float,
    ) -> None:
        self.outcomes.append((attempt.route.backend, fault))


def route(name: str, price: float, p50: float = 1.0, p99: float = 2.0, slots: int = 1) -> Route:
    state = BackendState(name, "127.0.0.1:1", "cpu", price, slots=slots)
    state.network.rtt_ms = 0.0
    state.healthy = True
    state.refresh()
    r = Route(state, "m", "v", True)
    r.estimate.seed(p50, p99)
    return r


class Rig:
    def __init__(self) -> None:
        self.transport = ScriptedTransport()
        self.timers = ManualTimers()
        self.observer = Counting()
        self.dispatcher = Dispatcher(self.transport, self.timers, self.observer)
        self.ended: list[Job] = []

    def start(
        self,
        routes: list[Route],
        policy: Policy,
        deadline_s: float | None = None,
        chooser: Callable[..., object] = choose,
    ) -> Job:
        decision = chooser(REQ, routes, policy, self.timers.now_s)
        job = Job(
            decision,  # type: ignore[arg-type]
            policy,
            REQ,
            routes,
            chooser,  # type: ignore[arg-type]
            self.timers.now_s,
            deadline_s,
            on_done=self.ended.append,
        )
        self.dispatcher.start(job, self.timers.now_s)
        return job

    def answer(
        self, attempt: Attempt, latency_ms: float = 1.0, queued_ms: float | None = None
    ) -> None:
        self.dispatcher.answered(attempt, b"reply", latency_ms, self.timers.now_s, queued_ms)

    def fail(self, attempt: Attempt, retryable: bool = True, fault: bool = True) -> None:
        error = Unavailable("down") if retryable else InvalidInput("bad")
        self.dispatcher.failed(attempt, error, retryable, fault, self.timers.now_s)


def test_an_answer_ends_the_job_frees_the_slot_and_measures_the_route() -> None:
    rig = Rig()
    cheap, dear = route("cheap", 0.1), route("dear", 0.4)
    job = rig.start([dear, cheap], Policy(latency_ms=10))
    (attempt,) = rig.transport.sent
    assert attempt.route is cheap and attempt.free_slot
    assert cheap.state.in_flight == 1 and job.due_s == pytest.approx(0.010)
    samples = cheap.estimate.samples
    rig.answer(attempt, latency_ms=3.0)
    assert rig.ended == [job] and job.winner is attempt and job.reply == b"reply"
    assert job.tried == 1 and job.error is None
    assert cheap.state.in_flight == 0
    assert cheap.estimate.samples == samples + 1
    assert rig.observer.outcomes == [("cheap", False)]


def unseeded(name: str) -> Route:
    """A route whose estimate is its samples alone (the first sets its mean)."""
    state = BackendState(name, "127.0.0.1:1", "cpu", 0.1)
    state.network.rtt_ms = 0.0
    state.healthy = True
    state.refresh()
    return Route(state, "m", "v", True)


def test_an_attempt_that_queued_measures_its_route_from_when_it_took_its_slot() -> None:
    # Each takes 7 ms at the backend: the second, sent at once, waited 7 ms of its 14
    # for the first. Its sample is its 7 ms in the slot, not its latency.
    rig = Rig()
    only = unseeded("only")
    first = rig.start([only], Policy(latency_ms=1000))
    second = rig.start([only], Policy(latency_ms=1000))
    a1, a2 = rig.transport.sent
    assert a1.free_slot and not a2.free_slot
    rig.timers.advance(0.007)
    rig.answer(a1, latency_ms=7.0)
    assert only.estimate.samples == 1 and only.estimate.mean_ms == pytest.approx(7.0)
    assert a2.ticket.started_s == pytest.approx(0.007)  # it took the slot a1 freed
    rig.timers.advance(0.014)
    rig.answer(a2, latency_ms=14.0)
    assert only.estimate.samples == 2
    assert only.estimate.mean_ms == pytest.approx(7.0)  # 14 would have made it 7.7
    assert first.done and second.done and only.state.in_flight == 0


def test_a_queued_attempt_whose_call_may_carry_others_measures_nothing() -> None:
    # Where the transport merges calls (the gateway's coalescer), a queued request's
    # answer may come with its neighbours': the time since it took its slot is not its own.
    rig = Rig()
    only = unseeded("only")
    rig.start([only], Policy(latency_ms=1000))
    rig.start([only], Policy(latency_ms=1000))
    a1, a2 = rig.transport.sent
    a2.alone = False
    rig.timers.advance(0.007)
    rig.answer(a1, latency_ms=7.0)
    rig.timers.advance(0.008)
    rig.answer(a2, latency_ms=8.0)
    assert only.estimate.samples == 1 and only.estimate.mean_ms == pytest.approx(7.0)


def test_an_attempt_answered_while_it_waited_measures_nothing() -> None:
    # The queued one answers first (its call overtook, or travelled merged): it never
    # held the slot, so nothing of its latency is the route's service time.
    rig = Rig()
    only = unseeded("only")
    rig.start([only], Policy(latency_ms=1000))
    rig.start([only], Policy(latency_ms=1000))
    a1, a2 = rig.transport.sent
    rig.timers.advance(0.003)
    rig.answer(a2, latency_ms=3.0)
    assert only.estimate.samples == 0 and only.state.in_flight == 1
    rig.timers.advance(0.007)
    rig.answer(a1, latency_ms=7.0)
    assert only.estimate.samples == 1 and only.estimate.mean_ms == pytest.approx(7.0)


def test_an_answer_whose_shared_backend_says_how_long_it_queued_measures_the_rest() -> None:
    # Another gateway's requests held the backend: this one found a slot free as far as
    # it knew, and waited 20 ms of its 27 there. The backend's report of that wait
    # leaves 7 ms of service, not 27. A request that waited here too (its slot not yet
    # free) measures its latency less the wait as well, merged or not.
    rig = Rig()
    only = unseeded("only")
    only.state.others_seen_s = 0.0  # its reports showed another gateway's requests
    rig.start([only], Policy(latency_ms=1000))
    rig.start([only], Policy(latency_ms=1000))
    a1, a2 = rig.transport.sent
    a2.alone = False
    assert a1.free_slot and not a2.free_slot
    rig.timers.advance(0.027)
    assert only.state.shared(rig.timers.now_s)
    rig.answer(a1, latency_ms=27.0, queued_ms=20.0)
    assert only.estimate.samples == 1 and only.estimate.mean_ms == pytest.approx(7.0)
    rig.timers.advance(0.034)
    rig.answer(a2, latency_ms=34.0, queued_ms=27.0)
    assert only.estimate.samples == 2 and only.estimate.mean_ms == pytest.approx(7.0)


def test_a_backend_this_gateway_alone_sends_to_keeps_its_unforeseen_waits() -> None:
    # No other gateway's requests there: a wait this gateway's queue model did not
    # foresee is the backend's own (fewer slots than it says, a stall), and stays in the
    # sample of a request that found a slot free, as the estimate must learn it.
    rig = Rig()
    only = unseeded("only")
    rig.start([only], Policy(latency_ms=1000))
    (attempt,) = rig.transport.sent
    rig.timers.advance(0.027)
    assert not only.state.shared(rig.timers.now_s)
    rig.answer(attempt, latency_ms=27.0, queued_ms=20.0)
    assert only.estimate.samples == 1 and only.estimate.mean_ms == pytest.approx(27.0)


def test_a_retryable_failure_goes_to_the_next_best_route() -> None:
    rig = Rig()
    cheap, mid, dear = route("cheap", 0.1), route("mid", 0.2), route("dear", 0.4)
    job = rig.start([dear, mid, cheap], Policy(latency_ms=10))
    rig.fail(rig.transport.sent[0])
    assert [a.route.backend for a in rig.transport.sent] == ["cheap", "mid"]
    assert rig.observer.retries == ["mid"]
    assert cheap.state.in_flight == 0 and mid.state.in_flight == 1
    rig.answer(rig.transport.sent[1])
    assert job.winner is not None and job.winner.route is mid and job.tried == 2
    assert rig.observer.outcomes == [("cheap", True), ("mid", False)]


def test_retries_stop_at_the_policy_limit_with_the_last_error() -> None:
    rig = Rig()
    routes = [route(f"b{i}", 0.1 * (i + 1)) for i in range(4)]
    job = rig.start(routes, Policy(latency_ms=10, retries=1))
    rig.fail(rig.transport.sent[0])
    rig.fail(rig.transport.sent[1])
    assert len(rig.transport.sent) == 2 and job.done and job.tried == 2
    assert isinstance(job.error, Unavailable)


def test_a_caller_error_is_not_retried_and_does_not_count_against_the_backend() -> None:
    rig = Rig()
    job = rig.start([route("a", 0.1), route("b", 0.2)], Policy(latency_ms=10))
    rig.fail(rig.transport.sent[0], retryable=False, fault=False)
    assert len(rig.transport.sent) == 1
    assert isinstance(job.error, InvalidInput)
    assert rig.observer.outcomes == [("a", False)]


def test_the_callers_deadline_ends_the_job_and_does_not_count_against_the_backend() -> None:
    rig = Rig()
    slow = route("slow", 0.1)
    job = rig.start([slow], Policy(latency_ms=10), deadline_s=0.050)
    assert rig.timers.pending() == [0.050]
    rig.timers.advance(0.049)
    assert not job.done
    rig.timers.advance(0.050)
    assert isinstance(job.error, DeadlineExceeded)
    assert str(job.error) == "deadline passed after 1 attempt(s) for model 'm'"
    assert rig.transport.cancelled == rig.transport.sent
    # The caller chose the deadline: the backend's verdict is not a fault.
    assert rig.observer.outcomes == [("slow", False)]
    assert slow.state.in_flight == 0


def test_no_retry_once_the_deadline_has_passed() -> None:
    rig = Rig()
    job = rig.start([route("a", 0.1), route("b", 0.2)], Policy(latency_ms=10), deadline_s=0.05)
    rig.timers.now_s = 0.06  # the failure arrives after the deadline, before its timer
    rig.fail(rig.transport.sent[0])
    assert len(rig.transport.sent) == 1
    assert isinstance(job.error, DeadlineExceeded)
    assert str(job.error) == "deadline passed after 1 attempt(s) for model 'm'"


def test_a_hedge_goes_at_the_first_attempts_predicted_p95_and_the_first_answer_wins() -> None:
    rig = Rig()
    # Unloaded, rtt 0: the predicted p95 is the estimate's own p95, between p50 and p99.
    cheap, dear = route("cheap", 0.1, p50=4.0, p99=8.0), route("dear", 0.4, p50=4.0, p99=8.0)
    job = rig.start([cheap, dear], Policy(latency_ms=20, hedge=True))
    (hedge_at,) = rig.timers.pending()
    assert 0.004 < hedge_at < 0.008
    rig.timers.advance(hedge_at)
    assert [a.route.backend for a in rig.transport.sent] == ["cheap", "dear"]
    assert rig.observer.hedges == ["dear"]
    first, hedge = rig.transport.sent
    rig.answer(hedge)
    assert job.winner is hedge and job.tried == 2
    # The loser is cancelled, leaves its queue and is not counted against its backend.
    assert rig.transport.cancelled == [first]
    assert cheap.state.in_flight == 0 and dear.state.in_flight == 0
    assert rig.observer.outcomes == [("dear", False)]
    assert rig.timers.pending() == []


def test_a_baselines_retry_chooses_again() -> None:
    rig = Rig()
    fast, slow = route("fast", 0.4, p50=1.0), route("slow", 0.1, p50=5.0, p99=9.0)
    job = rig.start([fast, slow], Policy(latency_ms=10), chooser=fastest_only)
    assert not job.decision.ranks
    fast.state.healthy = False
    fast.state.refresh()
    rig.fail(rig.transport.sent[0])
    assert [a.route.backend for a in rig.transport.sent] == ["fast", "slow"]


def test_abandoning_a_job_cancels_its_attempts_uncounted() -> None:
    rig = Rig()
    only = route("only", 0.1)
    job = rig.start([only], Policy(latency_ms=10), deadline_s=1.0)
    rig.dispatcher.abandon(job, 0.001)
    assert job.done and rig.transport.cancelled == rig.transport.sent
    assert only.state.in_flight == 0 and rig.observer.outcomes == []
    assert rig.timers.pending() == []
    assert rig.ended == []  # nobody waits for it


def test_a_late_report_after_the_end_changes_nothing_but_its_slot() -> None:
    rig = Rig()
    a, b = route("a", 0.1, p50=4.0, p99=8.0), route("b", 0.2, p50=4.0, p99=8.0)
    job = rig.start([a, b], Policy(latency_ms=20, hedge=True))
    rig.timers.advance(rig.timers.pending()[0])
    first, hedge = rig.transport.sent
    rig.answer(first)
    # A transport that raced its cancel still reports: it is settled, not re-ended.
    rig.fail(hedge)
    assert job.winner is first and rig.ended == [job]
    assert a.state.in_flight == 0 and b.state.in_flight == 0


def test_an_attempt_past_its_timeout_counts_once_and_the_request_goes_on_elsewhere() -> None:
    """A hung backend: at its route's predicted p99 plus the slack (50 ms) the attempt
    counts against it, and the request is retried on the next route while the slow
    attempt keeps running; the first answer wins and the loser is given up uncounted."""
    rig = Rig()
    rig.dispatcher.attempt_timeout = AttemptTimeout(slack_ms=50.0)
    hung, other = route("hung", 0.1, p50=10.0, p99=20.0), route("other", 5.0)
    p99_ms = predict_ms(hung, 99.0, 0.0, 1, 100.0)
    job = rig.start([hung, other], Policy(latency_ms=100))
    (first,) = rig.transport.sent
    assert first.route is hung
    assert first.timeout_at_s == pytest.approx((p99_ms + 50.0) / 1000)
    assert first.timeout_at_s is not None
    rig.timers.advance(0.99 * first.timeout_at_s)
    assert len(rig.transport.sent) == 1
    rig.timers.advance(first.timeout_at_s + 0.001)
    assert [a.route.backend for a in rig.transport.sent] == ["hung", "other"]
    assert rig.transport.cancelled == [] and first.timed_out
    assert rig.observer.outcomes == [("hung", True)]
    assert rig.observer.retries == ["other"]
    rig.answer(rig.transport.sent[1])
    assert job.winner is rig.transport.sent[1]
    assert rig.transport.cancelled == [first]
    # The timed-out attempt counted once, when it timed out; the winner as a success.
    assert rig.observer.outcomes == [("hung", True), ("other", False)]
    assert hung.state.in_flight == 0 and other.state.in_flight == 0


def test_a_timed_out_attempt_with_nowhere_else_to_go_keeps_running() -> None:
    rig = Rig()
    rig.dispatcher.attempt_timeout = AttemptTimeout(slack_ms=50.0)
    only = route("only", 0.1)
    job = rig.start([only], Policy(latency_ms=100))
    rig.timers.advance(1.0)
    assert not job.done and len(rig.transport.sent) == 1
    rig.answer(rig.transport.sent[0], latency_ms=1000.0)
    assert job.winner is rig.transport.sent[0]
    assert rig.observer.outcomes == [("only", True)]  # counted at the timeout only


def test_the_retry_budget_bounds_retries_as_a_share_of_requests() -> None:
    rig = Rig()
    rig.dispatcher.budget = RetryBudget(ratio=0.2, min_per_s=0.0)
    assert rig.dispatcher.budget.balance == 0.0
    routes = [route("a", 0.1), route("b", 0.2)]
    jobs = [rig.start(routes, Policy(latency_ms=10)) for _ in range(10)]
    # Ten requests deposited 2 tokens: two of the ten failures are retried.
    for attempt in list(rig.transport.sent):
        rig.fail(attempt)
    assert rig.observer.retries == ["b", "b"]
    assert rig.dispatcher.budget.refused == 8 and rig.dispatcher.budget.withdrawn == 2
    assert sum(job.done for job in jobs) == 8


def test_retry_throttling_keeps_retries_off_a_failing_backend() -> None:
    rig = Rig()
    rig.dispatcher.throttle = RetryThrottle(max_tokens=10.0, token_ratio=0.1)
    a, b, c = route("a", 0.1), route("b", 0.2), route("c", 0.3)
    b.state.retry_tokens = 5.0  # half or less: no retries or hedges go there
    job = rig.start([a, b, c], Policy(latency_ms=10))
    rig.fail(rig.transport.sent[0])
    assert [x.route.backend for x in rig.transport.sent] == ["a", "c"]
    rig.answer(rig.transport.sent[1])
    assert job.winner is not None and job.winner.route is c


def test_a_timed_out_attempt_is_never_retried_on_its_own_route() -> None:
    """A baseline chooses again on a retry, and would choose the same (overloaded or
    hung) route: the retry is not sent there a second time."""
    rig = Rig()
    rig.dispatcher.attempt_timeout = AttemptTimeout(slack_ms=50.0)
    fast, slow = route("fast", 0.4, p50=1.0, p99=2.0), route("slow", 0.1, p50=5.0, p99=9.0)
    job = rig.start([fast, slow], Policy(latency_ms=100), chooser=fastest_only)
    (first,) = rig.transport.sent
    assert first.route is fast
    rig.timers.advance(1.0)
    assert rig.transport.sent == [first] and first.timed_out and not job.done
    rig.answer(first)
    assert job.winner is first


def shared_worker(name: str, price: float) -> Route:
    """A Switchyard worker's route (it takes due times) whose load reports showed other
    gateways' requests just now."""
    r = route(name, price)
    r.deadlines = True
    r.state.others_seen_s = 0.0
    return r


def refuse(rig: Rig, attempt: Attempt) -> None:
    error = Exhausted("model m: would be answered past its due time")
    rig.dispatcher.refused(attempt, error, rig.timers.now_s)


def test_only_an_attempt_on_a_shared_worker_asks_to_be_refused_rather_than_late() -> None:
    rig = Rig()
    rig.start([shared_worker("cheap", 0.1)], Policy(latency_ms=10))
    lone = route("lone", 0.1)
    lone.deadlines = True
    rig.start([lone], Policy(latency_ms=10))
    rig.start([route("foreign", 0.1)], Policy(latency_ms=10))
    assert [a.refuse_late for a in rig.transport.sent] == [True, False, False]


def test_a_late_refusal_sends_the_request_to_the_next_route_at_once() -> None:
    rig = Rig()
    cheap, dear = shared_worker("cheap", 0.1), route("dear", 0.4)
    job = rig.start([dear, cheap], Policy(latency_ms=10))
    first = rig.transport.sent[0]
    assert first.route is cheap and first.refuse_late
    refuse(rig, first)
    assert [a.route.backend for a in rig.transport.sent] == ["cheap", "dear"]
    assert rig.observer.retries == ["dear"]
    assert rig.observer.outcomes == [("cheap", False)]  # a refusal is no fault
    assert cheap.state.in_flight == 0 and dear.state.in_flight == 1
    rig.answer(rig.transport.sent[1])
    assert job.winner is not None and job.winner.route is dear


def test_a_late_refusal_with_nowhere_else_to_go_waits_its_turn_at_the_same_backend() -> None:
    rig = Rig()
    only = shared_worker("only", 0.1)
    job = rig.start([only], Policy(latency_ms=10))
    refuse(rig, rig.transport.sent[0])
    again = rig.transport.sent[1]
    assert again.route is only and not again.refuse_late  # this time it is not refused
    assert not job.done and only.state.in_flight == 1
    rig.answer(again)
    assert job.winner is again and job.error is None


def test_a_late_refusal_past_the_retry_limit_still_costs_no_request() -> None:
    rig = Rig()
    cheap, dear = shared_worker("cheap", 0.1), route("dear", 0.4)
    job = rig.start([dear, cheap], Policy(latency_ms=10, retries=0))
    refuse(rig, rig.transport.sent[0])
    assert [a.route.backend for a in rig.transport.sent] == ["cheap", "cheap"]
    rig.answer(rig.transport.sent[1])
    assert job.winner is not None and job.error is None


def test_a_late_refusal_after_the_deadline_ends_the_job_with_it() -> None:
    rig = Rig()
    job = rig.start([shared_worker("only", 0.1)], Policy(latency_ms=10), deadline_s=0.05)
    rig.timers.now_s = 0.06
    refuse(rig, rig.transport.sent[0])
    assert job.done and isinstance(job.error, DeadlineExceeded)
    assert len(rig.transport.sent) == 1


def test_a_late_refusal_skips_the_other_variants_of_the_refusing_backend() -> None:
    rig = Rig()
    fp32 = shared_worker("cheap", 0.1)
    int8 = Route(fp32.state, "m", "int8", False)
    int8.deadlines = True
    int8.estimate.seed(1.0, 2.0)
    dear = route("dear", 0.4)
    rig.start([dear, int8, fp32], Policy(latency_ms=10))
    refuse(rig, rig.transport.sent[0])
    assert [a.route.backend for a in rig.transport.sent] == ["cheap", "dear"]
