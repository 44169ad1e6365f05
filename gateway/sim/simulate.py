"""`switchyard simulate`: the live router's code against modelled backends.

A discrete-event simulation with an injected clock. Each modelled backend has
`slots` parallel servers and a queue served earliest deadline first (a
request's arrival plus its SLA), the fleet state's own model of a backend, which
the live gateway keeps too (`BackendState.admit` / `finish`); service times per route are drawn
from a lognormal fitted to the scenario's p50 and p99 (seeded numpy RNG, drawn
in bulk). Arrivals are generated up front for the whole run (numpy) and every
policy runs on the same trace, and each route's k-th request draws the same
service time under every policy (common random numbers).

Each request is routed by the function under test with the same inputs the live
gateway gives it: the fleet state (`BackendState` with `in_flight`, price,
availability) and the routes' `LatencyEstimate`s. As the gateway's servicer
does, an attempt counts in the backend's queue while it runs, and when it
answers, if it found a free slot when sent, the route's estimate observes
`latency - network`. A backend that is killed fails
its in-flight and queued requests; each is retried on the next route of its
decision's `alternatives(now)` while the policy's retries allow (baselines, whose
decisions carry no alternatives, choose again). Cost is the backend's price for
the busy time each answered request took: `usd_per_busy_ms x drawn service ms`.
A backend's carbon intensity (its `carbon_g_per_kwh` and `power_w`, changed by
`set_carbon` events and replayed carbon feeds) is its fleet state's, which the carbon
objective reads; the scenario's `thresholds.shares` are checked on the SLA router's run
(which backend answered each request).

Several gateways (`--gateways N`, `Replicas`): arrivals are spread over N routers
(round-robin or at random, as a load balancer in front would), each with its own fleet
state, route estimates, dispatcher and prober, over one set of modelled backends whose
queues hold every gateway's calls (`_Backend`: what the backends really hold). Each
gateway sees its own requests; with load reports, each answer also carries its
backend's queue less that gateway's requests as it stood one network round trip before
(or `report_delay_ms`), taken by the live rule (`BackendState.record_report`) before
the answer settles, as the live transport does. Prices, drains, kills and policies
reach every gateway at once (the shared control state). One gateway is exactly the
single router's run.

Each run is compared with the offline lower bound (`bound.py`) over the same trace
(`arrivals.py`) of the modelled routes (`modelled.py`).

Imports the router, the fleet state, the policy book, the serving Dispatcher, the
scenario format and the load reports' form (backends.protocol.load); numpy; rich only
for the tables. No grpc, no protobuf.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import sys
import time
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from backends.protocol.errors import Exhausted
from backends.protocol.load import BUCKETS, DUE_EDGES_MS, LoadReport
from backends.protocol.parameters import LATE_REFUSAL
from gateway.config import GatewaySettings, PoliciesSettings
from gateway.routing.estimates import service_sample
from gateway.routing.fleet import BackendState, Route
from gateway.routing.percentiles import percentile
from gateway.routing.policy import PolicyBook
from gateway.routing.router import (
    ROUTING,
    Chooser,
    RouteRequest,
    batch_factor,
    chooser_for,
)
from gateway.serving.dispatch import Attempt, Dispatcher, Job, Observer
from gateway.sim.arrivals import FloatArray, IntArray, Trace, make_trace
from gateway.sim.bound import Bound, lower_bound
from gateway.sim.modelled import RouteModel, route_models
from gateway.sim.scenario import MultiplyRate, Scenario, ScenarioError, load_scenario

POLICIES = ROUTING
"""The policies a run compares: the SLA router and the baselines."""
INF = float("inf")
SAMPLE_CHUNK = 65_536


# ---- one run --------------------------------------------------------------------------


@dataclass(slots=True)
class PolicyResult:
    attainment: dict[str, float]
    cost_usd_per_1m: float
    p99_ms: dict[str, float | None]
    answered: int
    failed: int
    retried: int

    def to_json(self) -> dict[str, Any]:
        return {
            "attainment": self.attainment,
            "cost_usd_per_1m": self.cost_usd_per_1m,
            "p99_ms": self.p99_ms,
        }


class _RouteSim:
    """Per-route simulation data, looked up once per attempt (shared by every gateway's
    route object for the same backend, model and variant)."""

    __slots__ = ("backend", "mean_ms", "pos", "rng", "samples", "scale")

    def __init__(self, backend: int, rng: np.random.Generator, model: RouteModel) -> None:
        self.backend = backend
        self.rng = rng
        self.scale = (model.mu, model.sigma)
        self.mean_ms = model.mean_ms
        self.samples: list[float] = []
        self.pos = 0
        self.refill()

    def refill(self) -> None:
        mu, sigma = self.scale
        self.samples = self.rng.lognormal(mu, sigma, SAMPLE_CHUNK).tolist()
        self.pos = 0


BALANCERS = ("round-robin", "random")


@dataclass(frozen=True, slots=True)
class Replicas:
    """Several gateways routing one scenario: how many, how a load balancer in front
    spreads the arrivals over them, and what each knows of the others' requests."""

    gateways: int = 1
    """Gateways, each with its own fleet state, route estimates, dispatcher (its retry
    budget) and prober; prices, drains, kills and policies reach them all at once (the
    shared control state makes it so within milliseconds)."""
    reports: bool = False
    """Each gateway takes the load reports its answers carry (the backend's queue less
    its own requests: `BackendState.record_report`, the live gateway's rule); without,
    it sees only its own requests, as gateways without load reports do."""
    report_delay_ms: float | None = None
    """How long after the backend's answer its report reaches the gateway: the queue it
    holds is the backend's as of now less this (None: the backend's network round trip)."""
    balancer: str = "round-robin"
    """round-robin, or random (seeded from the scenario's seed)."""

    def assignment(self, n: int, seed: int) -> list[int]:
        """The gateway of each of `n` arrivals."""
        if self.gateways == 1:
            return [0] * n
        if self.balancer == "random":
            drawn = np.random.default_rng([seed, 3]).integers(0, self.gateways, n)
        else:
            drawn = np.arange(n) % self.gateways
        out: list[int] = drawn.tolist()
        return out


class Simulation:
    """One policy's run over a trace, by one gateway or several (`Replicas`)."""

    def __init__(
        self,
        scenario: Scenario,
        trace: Trace,
        chooser: Chooser,
        retry_by_alternatives: bool,
        latency_probe_interval_s: float = GatewaySettings().latency_probe_interval_s,
        replicas: Replicas = Replicas(),
    ) -> None:
        """As in the live gateway, only attempts that found a free slot feed the
        route's service estimate."""
        self.latency_probe_interval_s = latency_probe_interval_s
        self.scenario = scenario
        self.trace = trace
        self.chooser = chooser
        self.retry_by_alternatives = retry_by_alternatives
        self.replicas = replicas
        self.views = [self._states(scenario) for _ in range(replicas.gateways)]
        """Each gateway's fleet state: its own view of every backend."""
        self.rtts = [b.network_ms for b in scenario.backends]
        self.sims: dict[Route, _RouteSim] = {}
        self.routes: list[dict[str, list[Route]]] = [{} for _ in self.views]
        for index, model in enumerate(route_models(scenario)):
            rng = np.random.default_rng([scenario.seed, 1, index])
            sim = _RouteSim(model.backend, rng, model)
            for states, routes in zip(self.views, self.routes, strict=True):
                route = Route(states[model.backend], model.model, model.variant, model.default)
                route.estimate.seed(model.p50_ms, model.p99_ms)
                # With reports, the backends are Switchyard workers: they take due times
                # and refuse, at once, a request they would answer late if it asks.
                route.deadlines = replicas.reports
                self.sims[route] = sim
                routes.setdefault(model.model, []).append(route)
        self.requests = [
            RouteRequest(s.model, s.batch_size, s.sla_ms, s.sla_class) for s in scenario.traffic
        ]
        self.factors = [batch_factor(s.batch_size) for s in scenario.traffic]
        self.book = PolicyBook(scenario.policies)
        self.policies = [self.book.resolve(r) for r in self.requests]
        self.answered_by: IntArray = np.zeros(0, dtype=np.int64)
        """After `run`: per request, the index of the backend that answered it (-1: none)."""

    @staticmethod
    def _states(scenario: Scenario) -> list[BackendState]:
        states = [
            BackendState(
                b.name,
                f"sim://{b.name}",
                b.hardware_class,
                b.price_usd_per_hour,
                slots=b.slots,
                carbon_g_per_kwh=b.carbon_g_per_kwh,
                power_w=b.power_w,
            )
            for b in scenario.backends
        ]
        for state, backend in zip(states, scenario.backends, strict=True):
            state.healthy = True
            state.network.rtt_ms = backend.network_ms
            state.refresh()
        return states

    def set_policies(self, settings: PoliciesSettings) -> None:
        self.book = PolicyBook(settings)
        self.policies = [self.book.resolve(r) for r in self.requests]

    def run(self) -> tuple[FloatArray, FloatArray, float, int]:
        """Runs the trace; returns per request (latency ms, inf when failed; SLA ms),
        the total cost in USD and the number of retried attempts."""
        times: list[float] = self.trace.times.tolist()
        streams: list[int] = self.trace.streams.tolist()
        n = len(times)
        latency = [INF] * n
        sla = [0.0] * n
        answered_by = [-1] * n
        replicas = self.replicas
        gateway_of = replicas.assignment(n, self.scenario.seed)
        fleet = ModelledFleet(
            self.views,
            self.rtts,
            self.sims,
            self.factors,
            streams,
            gateway_of,
            self.set_policies,
            [
                (b.network_ms if replicas.report_delay_ms is None else replicas.report_delay_ms)
                * 0.001
                for b in self.scenario.backends
            ]
            if replicas.reports
            else None,
        )
        dispatchers = fleet.dispatchers
        heap = fleet.heap
        pop = heapq.heappop
        fire = fleet.fire
        chooser = self.chooser
        requests = self.requests
        routes_of = [[routes.get(r.model, []) for r in requests] for routes in self.routes]
        events = sorted(self.scenario.events, key=lambda e: e.at_s)
        ev_index = 0
        probe_every = self.latency_probe_interval_s
        next_probe = probe_every if probe_every > 0 else INF
        next_event = min(events[0].at_s if events else INF, next_probe)
        rtts = self.rtts

        def done(job: Job) -> None:
            """A request's end: its latency as its client sees it, and the busy time
            its answer cost."""
            attempt = job.winner
            if attempt is None:
                return  # failed: its latency stays infinite
            call: ModelledCall = attempt.call
            now = fleet.now_s
            latency[job.ident] = (now - times[job.ident]) * 1000.0 + rtts[call.backend]
            answered_by[job.ident] = call.backend
            fleet.cost += attempt.route.state.usd_per_busy_ms * call.service_ms

        def apply(event_at: float) -> None:
            nonlocal ev_index, next_event, next_probe
            while next_probe <= event_at:
                fleet.probe(next_probe, probe_every)
                next_probe += probe_every
            while ev_index < len(events) and events[ev_index].at_s <= event_at:
                event = events[ev_index]
                ev_index += 1
                fleet.now_s = event.at_s
                event.apply(fleet)
            next_event = min(events[ev_index].at_s if ev_index < len(events) else INF, next_probe)

        def advance(until: float) -> None:
            """Completions, timers and events up to `until` (inclusive), in time order."""
            while True:
                if heap and heap[0][0] <= until and heap[0][0] < next_event:
                    fire(pop(heap))
                elif next_event <= until and next_event < INF:
                    apply(next_event)
                else:
                    return

        policies = self.policies
        for i in range(n):
            now = times[i]
            if now >= next_event:
                advance(now)
                policies = self.policies
            while heap and heap[0][0] <= now:
                fire(pop(heap))
            k = streams[i]
            g = gateway_of[i]
            policy = policies[k]
            sla[i] = policy.latency_ms
            routes = routes_of[g][k]
            decision = chooser(requests[k], routes, policy, now)
            if decision.route is None:
                continue
            fleet.now_s = now
            job = Job(decision, policy, requests[k], routes, chooser, now, ident=i)
            job.on_done = done
            dispatchers[g].start(job, now)
        next_probe = INF  # the run is over: no more probes, only the queues to empty
        next_event = events[ev_index].at_s if ev_index < len(events) else INF
        advance(INF)
        self.answered_by = np.asarray(answered_by, dtype=np.int64)
        return np.asarray(latency), np.asarray(sla), fleet.cost, fleet.retried_count


@dataclass(slots=True)
class ModelledCall:
    """A modelled attempt's call: its backend, its drawn service time, when it was sent
    and when it took a slot and ended, the gateway that sent it, its expected work (what
    the backend's load report counts), and whether its gateway gave it up."""

    backend: int
    service_ms: float
    sent_s: float
    gateway: int = 0
    mean_ms: float = 0.0
    started_s: float | None = None
    ended_s: float = INF
    cancelled: bool = False


class _Backend:
    """A modelled backend as it is, whatever any gateway thinks: its slots and its one
    queue of every gateway's calls, earliest deadline first (ties in arrival order), as
    the fleet state models it; its life (a kill starts a new one); and the calls that
    ended lately, so that a load report can tell the queue as it stood a moment ago."""

    __slots__ = ("life", "recent", "seq", "serving", "slots", "waiting", "waiting_due")

    def __init__(self, slots: int, life: int) -> None:
        self.slots = slots
        self.life = life
        self.seq = 0
        """Its load reports' sequence number."""
        self.serving: list[Attempt] = []
        self.waiting: list[Attempt] = []
        self.waiting_due: list[float] = []
        self.recent: deque[Attempt] = deque()
        """Calls that ended, oldest first (kept only while reports need them)."""

    def answer_in_ms(self, due_s: float, mean_ms: float, now_s: float) -> float:
        """How soon a worker predicts a call due at `due_s` of mean `mean_ms` would be
        answered (`backends.worker.batching.answer_in_ns`): the expected work ahead of it
        (what the calls in service have left, and the waiting calls due no later),
        shared by the slots, plus its own; its own alone while a slot is free."""
        if len(self.serving) < self.slots:
            return mean_ms
        work = 0.0
        for attempt in self.serving:
            call: ModelledCall = attempt.call
            started_s = call.started_s if call.started_s is not None else now_s
            work += max(0.0, call.mean_ms - (now_s - started_s) * 1000.0)
        for waiting in self.waiting[: bisect_right(self.waiting_due, due_s)]:
            work += waiting.call.mean_ms
        return work / self.slots + mean_ms

    def admit(self, attempt: Attempt) -> bool:
        """The call arrives: True when it takes a free slot, else it waits."""
        if len(self.serving) < self.slots:
            self.serving.append(attempt)
            return True
        at = bisect_right(self.waiting_due, attempt.job.due_s)
        self.waiting_due.insert(at, attempt.job.due_s)
        self.waiting.insert(at, attempt)
        return False

    def done(self, attempt: Attempt, now_s: float, keep: bool) -> Attempt | None:
        """The call in service ends at `now_s` (`keep`: remembered for reports); returns
        the waiting call that takes its slot."""
        self.serving.remove(attempt)
        if keep:
            attempt.call.ended_s = now_s
            self.recent.append(attempt)
        if not self.waiting:
            return None
        del self.waiting_due[0]
        nxt = self.waiting.pop(0)
        nxt.call.started_s = now_s
        self.serving.append(nxt)
        return nxt

    def withdraw(self, attempt: Attempt) -> None:
        """A cancelled call leaves the queue if it waits (one in service runs on)."""
        for at, waiting in enumerate(self.waiting):
            if waiting is attempt:
                del self.waiting[at], self.waiting_due[at]
                return

    def clear(self) -> list[Attempt]:
        """Every call dies (the backend was killed): returns them."""
        lost = self.serving + self.waiting
        self.serving, self.waiting, self.waiting_due = [], [], []
        self.recent.clear()
        return lost

    def report(self, gateway: int, at_s: float) -> LoadReport:
        """Its load report to `gateway` as a Switchyard worker makes it, of its queue as
        it stood at `at_s` (a moment ago, or now): the other gateways' calls in service
        then (and how long until the first ends, by their expected work) and waiting
        then (by how soon each was due)."""
        self.seq += 1
        recent = self.recent
        while recent and recent[0].call.ended_s <= at_s:
            recent.popleft()  # ended before then (the report times only move on)
        rest_ms = []
        counts = [0] * BUCKETS
        work_us = [0.0] * BUCKETS
        for attempt in itertools.chain(recent, self.serving, self.waiting):
            call: ModelledCall = attempt.call
            if call.gateway == gateway or call.sent_s > at_s:
                continue
            started_s = call.started_s
            if started_s is not None and started_s <= at_s:
                rest_ms.append(max(0.0, call.mean_ms - (at_s - started_s) * 1000.0))
            else:
                at = bisect_left(DUE_EDGES_MS, (attempt.job.due_s - at_s) * 1000.0)
                counts[at] += 1
                work_us[at] += call.mean_ms * 1000.0
        return LoadReport(
            self.seq,
            self.slots,
            len(rest_ms),
            int(min(rest_ms) * 1000.0) if rest_ms else 0,
            tuple(zip(counts, (int(w) for w in work_us), strict=True)),
        )


LATE = Exhausted(f"modelled worker: {LATE_REFUSAL}")
"""What a modelled worker's refusal of a late request says."""


class _Timer:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[float], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ModelledFleet(Observer):
    """The simulated backends, as the gateways' Dispatchers see them: their transport
    (each call takes its drawn service time once it holds a slot of its backend's
    earliest-deadline queue, shared by every gateway's calls), their timers and their
    observer, over one event heap of (time, request, backend life, sequence, what). The
    heap's order is time, then request number.

    Each gateway has its own view of each backend (`views`): the requests it sent, and,
    with `report_delays_s` (per backend), the load reports its answers carry, each of
    the backend's queue as it stood that long before the answer."""

    def __init__(
        self,
        views: list[list[BackendState]],
        rtts: list[float],
        sims: dict[Route, _RouteSim],
        factors: list[float],
        streams: list[int],
        gateway_of: list[int],
        set_policies: Callable[[PoliciesSettings], None],
        report_delays_s: list[float] | None = None,
    ) -> None:
        # The live gateway's retry budget, at its default. No attempt timeouts: no
        # modelled backend hangs, and under modelled overload they would only move
        # a baseline's queue about (each would cost a full queue prediction per send).
        settings = GatewaySettings(attempt_timeout_slack_s=0)
        self.dispatchers = []
        for _ in views:
            dispatcher = Dispatcher(self, self, self)
            dispatcher.guard(settings)
            self.dispatchers.append(dispatcher)
        self.set_policies = set_policies
        self.views = views
        self.rtts = rtts
        self.sims = sims
        self.factors = factors
        self.streams = streams
        self.gateway_of = gateway_of
        self.report_delays_s = report_delays_s
        self.names = {s.name: i for i, s in enumerate(views[0])}
        self.backends = [_Backend(s.slots, i) for i, s in enumerate(views[0])]
        self._next_life = len(self.backends)
        self.heap: list[tuple[float, int, int, int, Any]] = []
        self._seq = itertools.count()
        self.now_s = 0.0
        self.cost = 0.0
        self.retried_count = 0
        self.refused_count = 0
        """Attempts refused by their backend as they would have been answered late."""

    # ---- the transport ----

    def send(self, attempt: Attempt) -> None:
        sim = self.sims[attempt.route]
        pos = sim.pos
        if pos >= SAMPLE_CHUNK:
            sim.refill()
            pos = 0
        ident = attempt.job.ident
        factor = self.factors[self.streams[ident]]
        service_ms = sim.samples[pos] * factor
        sim.pos = pos + 1
        now = self.now_s
        call = ModelledCall(
            sim.backend, service_ms, now, self.gateway_of[ident], sim.mean_ms * factor
        )
        attempt.call = call
        backend = self.backends[sim.backend]
        if attempt.refuse_late:
            due_s = attempt.job.due_s
            if now + backend.answer_in_ms(due_s, call.mean_ms, now) * 0.001 > due_s:
                # Refused on arrival; the refusal reaches the gateway a round trip on.
                self.refused_count += 1
                dispatcher = self.dispatchers[call.gateway]

                def refused(at_s: float) -> None:
                    dispatcher.refused(attempt, LATE, at_s)

                self.call_at(now + self.rtts[sim.backend] * 0.001, refused)
                return
        if backend.admit(attempt):
            self._serve(attempt, now)

    def cancel(self, attempt: Attempt) -> None:
        call: ModelledCall = attempt.call
        call.cancelled = True  # its answer, if it is in service, reaches no one
        self.backends[call.backend].withdraw(attempt)

    def _serve(self, attempt: Attempt, now: float) -> None:
        call: ModelledCall = attempt.call
        call.started_s = now
        heapq.heappush(
            self.heap,
            (
                now + call.service_ms * 0.001,
                attempt.job.ident,
                self.backends[call.backend].life,
                next(self._seq),
                attempt,
            ),
        )

    def fire(self, entry: tuple[float, int, int, int, Any]) -> None:
        """One heap entry's time has come: a call answers (unless it died with its
        backend's life; a cancelled one only frees its slot), or a timer fires."""
        now, _, life, _, what = entry
        if isinstance(what, _Timer):
            if not what.cancelled:
                self.now_s = now
                what.callback(now)
            return
        attempt: Attempt = what
        call: ModelledCall = attempt.call
        backend = self.backends[call.backend]
        if life != backend.life:
            return
        self.now_s = now
        delays = self.report_delays_s
        # The waiting call due first takes the slot.
        nxt = backend.done(attempt, now, delays is not None)
        if not call.cancelled:
            queued_ms = None
            if delays is not None:
                # As the live transport does, the gateway takes the report its answer
                # carries before the answer settles its request, and the answer's own
                # wait at the worker from it.
                report = backend.report(call.gateway, now - delays[call.backend])
                attempt.route.state.record_report(report, now)
                assert call.started_s is not None  # it was served: it answers
                queued_ms = (call.started_s - call.sent_s) * 1000.0
            latency_ms = (now - call.sent_s) * 1000.0 + self.rtts[call.backend]
            self.dispatchers[call.gateway].answered(attempt, None, latency_ms, now, queued_ms)
        if nxt is not None:
            self._serve(nxt, now)

    # ---- the timers ----

    def now(self) -> float:
        return self.now_s

    def call_at(self, when_s: float, callback: Callable[[float], None]) -> _Timer:
        timer = _Timer(callback)
        heapq.heappush(self.heap, (when_s, -1, -1, next(self._seq), timer))
        return timer

    # ---- the observer ----

    def retried(self, job: Job, route: Route) -> None:
        self.retried_count += 1

    # ---- scenario events (every gateway's view at once) and probes ----

    def _views_of(self, backend: str) -> list[BackendState]:
        b = self.names[backend]
        return [states[b] for states in self.views]

    def set_price(self, backend: str, usd_per_hour: float) -> None:
        for state in self._views_of(backend):
            state.set_price(usd_per_hour)

    def set_carbon(self, backend: str, g_per_kwh: float) -> None:
        for state in self._views_of(backend):
            state.set_carbon(g_per_kwh, state.power_w)

    def kill(self, backend: str) -> None:
        """The backend dies: its calls in service and waiting fail (each retried by its
        gateway's dispatcher, in request order) and it leaves every gateway's routes
        until restarted."""
        b = self.names[backend]
        truth = self.backends[b]
        truth.life = self._next_life  # the calls in service die with the old life
        self._next_life += 1
        lost = sorted(truth.clear(), key=lambda a: a.job.ident)
        for state in self._views_of(backend):
            state.healthy = False
            state.last_error = "killed"
            state.refresh()
            state.clear()
        now = self.now_s
        for attempt in lost:
            call: ModelledCall = attempt.call
            if not call.cancelled:
                self.dispatchers[call.gateway].failed(
                    attempt, BackendKilled(backend), True, True, now
                )

    def restart(self, backend: str) -> None:
        for state in self._views_of(backend):
            state.healthy = True
            state.last_error = ""
            state.refresh()

    def drain(self, backend: str, drained: bool) -> None:
        for state in self._views_of(backend):
            state.drained = drained
            state.refresh()

    def set_policy(self, policies: PoliciesSettings) -> None:
        self.set_policies(policies)

    def multiply_rate(self, surge: MultiplyRate) -> None:
        pass  # already in the arrivals

    def probe(self, now: float, interval_s: float) -> None:
        """Each gateway's prober's latency probes: one inference on each available route
        that had no sample for an interval (modelled unqueued: the route is idle)."""
        for route, sim in self.sims.items():
            last = route.estimate.last_sample_s
            if route.state.available and (last is None or now - last >= interval_s):
                if sim.pos >= SAMPLE_CHUNK:
                    sim.refill()
                svc = sim.samples[sim.pos]
                sim.pos += 1
                rtt = self.rtts[sim.backend]
                route.estimate.observe(service_sample(svc + rtt, rtt), now)


class BackendKilled(Exception):
    def __init__(self, backend: str) -> None:
        super().__init__(f"backend {backend} was killed")


def summarise(
    scenario: Scenario,
    trace: Trace,
    latency: FloatArray,
    sla: FloatArray,
    cost: float,
    retried: int,
    infeasible: Sequence[str],
) -> PolicyResult:
    classes = [s.class_name for s in scenario.traffic]
    names = sorted(set(classes) - set(infeasible))
    klass = np.asarray([classes.index(c) for c in classes], dtype=np.int64)[trace.streams]
    answered = np.isfinite(latency)
    attainment: dict[str, float] = {}
    p99: dict[str, float | None] = {}
    for name in sorted(set(classes)):
        mask = klass == classes.index(name)
        if not mask.any():
            continue
        done = latency[mask & answered]
        p99[name] = percentile(done, 99) if len(done) else None
        if name in names:
            attainment[name] = float(np.mean(latency[mask] <= sla[mask]))
    count = int(answered.sum())
    return PolicyResult(
        attainment=attainment,
        cost_usd_per_1m=cost / count * 1e6 if count else 0.0,
        p99_ms=p99,
        answered=count,
        failed=len(latency) - count,
        retried=retried,
    )


# ---- the whole report -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplicaRun:
    """The SLA router's run by several gateways: one row of the gateways table."""

    gateways: int
    reports: bool
    result: PolicyResult

    def to_json(self, one_gateway_usd_per_1m: float) -> dict[str, Any]:
        r = self.result
        return {
            "gateways": self.gateways,
            "reports": self.reports,
            "cost_usd_per_1m": r.cost_usd_per_1m,
            "cost_vs_one_gateway": r.cost_usd_per_1m / one_gateway_usd_per_1m
            if one_gateway_usd_per_1m
            else None,
            "attainment": r.attainment,
            "p99_ms": r.p99_ms,
            "answered": r.answered,
            "failed": r.failed,
            "retried": r.retried,
        }


@dataclass(slots=True)
class Report:
    scenario: Scenario
    requests: int
    wall_s: float
    bound: Bound
    results: dict[str, PolicyResult]
    checks: list[Check] = field(default_factory=list)
    replicas: list[ReplicaRun] = field(default_factory=list)
    """The SLA router by 1 and by several gateways (`simulate --gateways`); the first
    row is one gateway's."""
    replicas_by: Replicas = Replicas()
    """How those runs spread arrivals and delayed reports."""

    @property
    def passed(self) -> bool:
        return all(c.met for c in self.checks)

    @property
    def runs(self) -> int:
        return len(self.results) + len(self.replicas)

    def to_json(self) -> dict[str, Any]:
        out = {
            "scenario": self.scenario.scenario,
            "requests": self.requests,
            "wall_s": round(self.wall_s, 4),
            "lower_bound_cost_usd_per_1m": self.bound.cost_usd_per_1m,
            "infeasible_classes": self.bound.infeasible_classes,
            "policies": {name: r.to_json() for name, r in self.results.items()},
        }
        if self.replicas:
            one = self.replicas[0].result.cost_usd_per_1m
            out["gateways"] = {
                "balancer": self.replicas_by.balancer,
                "report_delay_ms": self.replicas_by.report_delay_ms,
                "runs": [run.to_json(one) for run in self.replicas],
            }
        return out


@dataclass(frozen=True, slots=True)
class Check:
    """One of the scenario's thresholds, checked."""

    key: str
    """attainment, cost_vs_bound, saving_vs_fastest, cheapest_misses or shares."""
    name: str
    met: bool
    detail: str


def check(scenario: Scenario, bound: Bound, results: dict[str, PolicyResult]) -> list[Check]:
    """The scenario's simulated thresholds."""
    t = scenario.thresholds
    out = []
    ours = results["switchyard"]
    worst = min(ours.attainment.items(), key=lambda kv: kv[1], default=None)
    if worst is not None:
        out.append(
            Check(
                "attainment",
                f"attainment >= {t.attainment_min:g} in every feasible class",
                worst[1] >= t.attainment_min,
                f"lowest: {worst[0]} {worst[1]:.4f}",
            )
        )
    if t.max_cost_vs_lower_bound is not None:
        ratio = ours.cost_usd_per_1m / bound.cost_usd_per_1m if bound.cost_usd_per_1m else INF
        out.append(
            Check(
                "cost_vs_bound",
                f"cost <= {t.max_cost_vs_lower_bound:g}x the lower bound",
                ratio <= t.max_cost_vs_lower_bound,
                f"{ratio:.3f}x",
            )
        )
    if t.min_saving_vs_fastest_only is not None:
        fastest = results["fastest-only"].cost_usd_per_1m
        saving = 1.0 - ours.cost_usd_per_1m / fastest if fastest else 0.0
        out.append(
            Check(
                "saving_vs_fastest",
                f"saving vs fastest-only >= {t.min_saving_vs_fastest_only:.0%}",
                saving >= t.min_saving_vs_fastest_only,
                f"{saving:.1%}",
            )
        )
    if t.cheapest_only_must_miss:
        cheap = results["cheapest-only"].attainment
        low = min(cheap.items(), key=lambda kv: kv[1], default=("-", 1.0))
        out.append(
            Check(
                "cheapest_misses",
                "cheapest-only misses the SLA",
                low[1] < t.attainment_min,
                f"lowest: {low[0]} {low[1]:.4f}",
            )
        )
    return out


def share_checks(scenario: Scenario, trace: Trace, answered_by: IntArray) -> list[Check]:
    """The scenario's simulated share thresholds on a run: per check, the backend's
    share of the answers to the requests (of its class) sent in its window."""
    names = [b.name for b in scenario.backends]
    classes = np.asarray([s.class_name for s in scenario.traffic])[trace.streams]
    out = []
    for c in scenario.thresholds.shares:
        inside = (trace.times >= c.from_s) & (trace.times < c.to_s) & (answered_by >= 0)
        if c.sla_class is not None:
            inside &= classes == c.sla_class
        bounds = [f">= {c.min_share:.0%}"] if c.min_share is not None else []
        bounds += [f"<= {c.max_share:.0%}"] if c.max_share is not None else []
        whose = f" of {c.sla_class}" if c.sla_class is not None else ""
        name = f"{c.backend} share{whose} {c.from_s:g}-{c.to_s:g} s {' and '.join(bounds)}"
        total = int(inside.sum())
        if not total:
            out.append(Check("shares", name, False, "no answers in the window"))
            continue
        share = float((answered_by[inside] == names.index(c.backend)).sum()) / total
        met = (c.min_share is None or share >= c.min_share) and (
            c.max_share is None or share <= c.max_share
        )
        out.append(Check("shares", name, met, f"{share:.1%} of {total:,}"))
    return out


def replica_runs(gateways: Sequence[int], by: Replicas = Replicas()) -> list[Replicas]:
    """The runs of `simulate --gateways`: one gateway, then each count above one without
    and with load reports."""
    if any(n < 1 for n in gateways):
        raise ValueError(f"gateways must be at least 1, not {min(gateways)}")
    runs = [replace(by, gateways=1, reports=False)]
    for n in sorted(set(gateways) - {1}):
        runs += [replace(by, gateways=n, reports=False), replace(by, gateways=n, reports=True)]
    return runs


def simulate(
    scenario: Scenario,
    policies: Sequence[str] = POLICIES,
    clock: Callable[[], float] = time.perf_counter,
    gateways: Sequence[int] = (),
    replicas_by: Replicas = Replicas(),
) -> Report:
    """The policies over the scenario's trace, each by one gateway; with `gateways`
    (counts), the SLA router also by one gateway and by each count, without and with
    load reports, arrivals spread and reports delayed as `replicas_by` says."""
    # The solver's library loads before the clock starts, as the simulator's own
    # modules did: wall_s is the simulation's work (trace, bound, runs), not imports.
    import scipy.optimize  # noqa: F401

    runs = replica_runs(gateways, replicas_by) if gateways else []
    started = clock()
    trace = make_trace(scenario)
    bound = lower_bound(scenario, trace)
    results = {}
    shares: list[Check] = []
    for name in policies:
        chooser = chooser_for(name)
        sim = Simulation(scenario, trace, chooser, retry_by_alternatives=name == "switchyard")
        latency, sla, cost, retried = sim.run()
        if name == "switchyard":
            shares = share_checks(scenario, trace, sim.answered_by)
        results[name] = summarise(
            scenario, trace, latency, sla, cost, retried, bound.infeasible_classes
        )
    replicas = []
    for replicas_of in runs:
        sim = Simulation(
            scenario,
            trace,
            chooser_for("switchyard"),
            retry_by_alternatives=True,
            replicas=replicas_of,
        )
        latency, sla, cost, retried = sim.run()
        result = summarise(scenario, trace, latency, sla, cost, retried, bound.infeasible_classes)
        replicas.append(ReplicaRun(replicas_of.gateways, replicas_of.reports, result))
    wall_s = clock() - started
    report = Report(scenario, len(trace), wall_s, bound, results, [], replicas, replicas_by)
    if "switchyard" in results and set(POLICIES) <= set(results):
        report.checks = check(scenario, bound, results) + shares
    return report


# ---- command line -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenario", type=Path, required=True, help="scenario file (YAML)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument(
        "--short", action="store_true", help="the scenario's short form (as the tests run it)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="the random seed of arrivals and service times (default: the scenario's `seed`)",
    )
    parser.add_argument(
        "--gateways",
        type=_gateway_count,
        nargs="+",
        default=[],
        metavar="N",
        help="also run the SLA router by N gateways (repeatable counts: --gateways 2 4), "
        "each seeing its own requests, without and with the backends' load reports, "
        "beside one gateway: cost per 1M and SLA attainment per class",
    )
    parser.add_argument(
        "--balancer",
        choices=BALANCERS,
        default="round-robin",
        help="how arrivals are spread over the gateways (default: round-robin)",
    )
    parser.add_argument(
        "--report-delay-ms",
        type=float,
        default=None,
        metavar="MS",
        help="how long after a backend's answer its load report reaches the gateway "
        "(default: the backend's network round trip)",
    )


def _gateway_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"a gateway count is a whole number >= 1, not {text!r}")
    return n


def run(args: argparse.Namespace) -> int:
    try:
        scenario = load_scenario(args.scenario)
        if args.short:
            scenario = scenario.shortened()
        if args.seed is not None:
            scenario = scenario.model_copy(update={"seed": args.seed})
        if args.report_delay_ms is not None and args.report_delay_ms < 0:
            raise ScenarioError(f"--report-delay-ms must be >= 0, not {args.report_delay_ms:g}")
        report = simulate(
            scenario,
            gateways=args.gateways,
            replicas_by=Replicas(balancer=args.balancer, report_delay_ms=args.report_delay_ms),
        )
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print_report(report)
    return 0 if report.passed else 1


def print_report(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(100, Console().width))
    scenario = report.scenario
    runs = report.runs
    rate = report.requests * runs / report.wall_s if report.wall_s > 0 else 0.0
    console.print(
        f"[bold]{scenario.scenario}[/bold]: {scenario.description}\n"
        f"{report.requests:,} requests over {scenario.duration_s:g} s, {runs} runs, "
        f"{report.wall_s:.2f} s wall ({rate:,.0f} simulated requests/s)"
    )
    classes = sorted({c for r in report.results.values() for c in r.p99_ms})
    table = Table(title="SLA met (p99 ms) per class; cost per 1M inferences")
    table.add_column("policy")
    table.add_column("$/1M", justify="right")
    table.add_column("/bound", justify="right")
    for name in classes:
        table.add_column(name, justify="right")
    table.add_column("failed", justify="right")
    bound = report.bound.cost_usd_per_1m
    for policy, result in report.results.items():
        row = [
            policy,
            f"{result.cost_usd_per_1m:.4f}",
            f"{result.cost_usd_per_1m / bound:.3f}" if bound else "-",
        ]
        for name in classes:
            met = result.attainment.get(name)
            p99 = result.p99_ms.get(name)
            cell = "infeasible" if met is None else f"{met:.2%}"
            row.append(cell + ("" if p99 is None else f" ({p99:.1f})"))
        row.append(f"{result.failed:,}")
        table.add_row(*row)
    table.add_row("lower bound", f"{bound:.4f}", "1.000", *[""] * (len(classes) + 1))
    console.print(table)
    if report.bound.infeasible_classes:
        console.print(
            "infeasible classes (no route meets the SLA unloaded): "
            + ", ".join(report.bound.infeasible_classes)
        )
    for c in report.checks:
        mark = "[green]pass[/green]" if c.met else "[red]FAIL[/red]"
        console.print(f"{mark}  {c.name}: {c.detail}")
    if report.replicas:
        print_replicas(console, report)


def _met(result: PolicyResult, name: str) -> str:
    met = result.attainment.get(name)
    p99 = result.p99_ms.get(name)
    cell = "infeasible" if met is None else f"{met:.2%}"
    return cell + ("" if p99 is None else f" ({p99:.1f})")


def print_replicas(console: Any, report: Report) -> None:
    """The gateways table: the SLA router by one gateway and by several."""
    from rich.table import Table

    by = report.replicas_by
    delay = (
        "each backend's round trip" if by.report_delay_ms is None else f"{by.report_delay_ms:g} ms"
    )
    classes = sorted({c for run in report.replicas for c in run.result.p99_ms})
    console.print(
        f"SLA router by several gateways: arrivals {by.balancer}, load reports {delay} late"
    )
    table = Table(title="SLA met (p99 ms) per class; cost per 1M inferences")
    table.add_column("gateways", justify="right")
    table.add_column("reports")
    table.add_column("$/1M", justify="right")
    table.add_column("vs one", justify="right")
    for name in classes:
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("failed", justify="right")
    one = report.replicas[0].result.cost_usd_per_1m
    for run in report.replicas:
        r = run.result
        table.add_row(
            str(run.gateways),
            "-" if run.gateways == 1 else ("yes" if run.reports else "no"),
            f"{r.cost_usd_per_1m:.4f}",
            f"{r.cost_usd_per_1m / one:.3f}x" if one else "-",
            *[_met(r, name) for name in classes],
            f"{r.failed:,}",
        )
    console.print(table)
