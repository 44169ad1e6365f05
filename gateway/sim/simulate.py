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

Each run is compared with the offline lower bound (`bound.py`) over the same trace
(`arrivals.py`) of the modelled routes (`modelled.py`).

Imports the router, the fleet state, the policy book, the serving Dispatcher and the
scenario format; numpy; rich only for the table. No grpc, no protobuf.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gateway.config import GatewaySettings, PoliciesSettings
from gateway.routing.estimates import service_sample
from gateway.routing.fleet import BackendState, Route, Ticket
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
from gateway.sim.arrivals import FloatArray, Trace, make_trace
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
    """Per-route simulation data, looked up once per attempt."""

    __slots__ = ("backend", "pos", "rng", "samples", "scale")

    def __init__(self, backend: int, rng: np.random.Generator, model: RouteModel) -> None:
        self.backend = backend
        self.rng = rng
        self.scale = (model.mu, model.sigma)
        self.samples: list[float] = []
        self.pos = 0
        self.refill()

    def refill(self) -> None:
        mu, sigma = self.scale
        self.samples = self.rng.lognormal(mu, sigma, SAMPLE_CHUNK).tolist()
        self.pos = 0


class Simulation:
    """One policy's run over a trace."""

    def __init__(
        self,
        scenario: Scenario,
        trace: Trace,
        chooser: Chooser,
        retry_by_alternatives: bool,
        latency_probe_interval_s: float = GatewaySettings().latency_probe_interval_s,
    ) -> None:
        """As in the live gateway, only attempts that found a free slot feed the
        route's service estimate."""
        self.latency_probe_interval_s = latency_probe_interval_s
        self.scenario = scenario
        self.trace = trace
        self.chooser = chooser
        self.retry_by_alternatives = retry_by_alternatives
        self.states = [
            BackendState(
                b.name, f"sim://{b.name}", b.hardware_class, b.price_usd_per_hour, slots=b.slots
            )
            for b in scenario.backends
        ]
        for state, backend in zip(self.states, scenario.backends, strict=True):
            state.healthy = True
            state.network.rtt_ms = backend.network_ms
            state.refresh()
        self.rtts = [b.network_ms for b in scenario.backends]
        self.sims: dict[Route, _RouteSim] = {}
        self.routes: dict[str, list[Route]] = {}
        for index, model in enumerate(route_models(scenario)):
            route = Route(self.states[model.backend], model.model, model.variant, model.default)
            route.estimate.seed(model.p50_ms, model.p99_ms)
            rng = np.random.default_rng([scenario.seed, 1, index])
            self.sims[route] = _RouteSim(model.backend, rng, model)
            self.routes.setdefault(model.model, []).append(route)
        self.requests = [
            RouteRequest(s.model, s.batch_size, s.sla_ms, s.sla_class) for s in scenario.traffic
        ]
        self.factors = [batch_factor(s.batch_size) for s in scenario.traffic]
        self.book = PolicyBook(scenario.policies)
        self.policies = [self.book.resolve(r) for r in self.requests]

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
        fleet = ModelledFleet(
            self.states, self.rtts, self.sims, self.factors, streams, self.set_policies
        )
        dispatcher = fleet.dispatcher
        heap = fleet.heap
        pop = heapq.heappop
        chooser = self.chooser
        requests = self.requests
        routes_of = [self.routes.get(r.model, []) for r in requests]
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
                    fleet.fire(pop(heap), dispatcher)
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
                fleet.fire(pop(heap), dispatcher)
            k = streams[i]
            policy = policies[k]
            sla[i] = policy.latency_ms
            decision = chooser(requests[k], routes_of[k], policy, now)
            if decision.route is None:
                continue
            fleet.now_s = now
            job = Job(decision, policy, requests[k], routes_of[k], chooser, now, ident=i)
            job.on_done = done
            dispatcher.start(job, now)
        next_probe = INF  # the run is over: no more probes, only the queues to empty
        next_event = events[ev_index].at_s if ev_index < len(events) else INF
        advance(INF)
        return np.asarray(latency), np.asarray(sla), fleet.cost, fleet.retried_count


@dataclass(slots=True)
class ModelledCall:
    """A modelled attempt's call: its backend, its drawn service time, when it was sent,
    and the backend's life it belongs to (a killed backend's calls die with it)."""

    backend: int
    service_ms: float
    sent_s: float


class _Timer:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[float], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ModelledFleet(Observer):
    """The simulated backends, as the Dispatcher sees them: its transport (each call
    takes its drawn service time once it holds a slot of its backend's earliest-deadline
    queue, the fleet state's own), its timers and its observer, over one event heap of
    (time, request, backend life, sequence, what). The heap's order is time, then
    request number."""

    def __init__(
        self,
        states: list[BackendState],
        rtts: list[float],
        sims: dict[Route, _RouteSim],
        factors: list[float],
        streams: list[int],
        set_policies: Callable[[PoliciesSettings], None],
    ) -> None:
        self.dispatcher = Dispatcher(self, self, self)
        # The live gateway's retry budget, at its default. No attempt timeouts: no
        # modelled backend hangs, and under modelled overload they would only move
        # a baseline's queue about (each would cost a full queue prediction per send).
        self.dispatcher.guard(GatewaySettings(attempt_timeout_slack_s=0))
        self.set_policies = set_policies
        self.states = states
        self.rtts = rtts
        self.sims = sims
        self.factors = factors
        self.streams = streams
        self.names = {s.name: i for i, s in enumerate(states)}
        self.lives = list(range(len(states)))
        """Each backend's current life: a kill starts a new one."""
        self._next_life = len(states)
        self.heap: list[tuple[float, int, int, int, Any]] = []
        self._seq = itertools.count()
        self.now_s = 0.0
        self.cost = 0.0
        self.retried_count = 0

    # ---- the transport ----

    def send(self, attempt: Attempt) -> None:
        sim = self.sims[attempt.route]
        pos = sim.pos
        if pos >= SAMPLE_CHUNK:
            sim.refill()
            pos = 0
        job = attempt.job
        service_ms = sim.samples[pos] * self.factors[self.streams[job.ident]]
        sim.pos = pos + 1
        now = self.now_s
        attempt.call = ModelledCall(sim.backend, service_ms, now)
        if attempt.free_slot:
            self._serve(attempt, now)

    def cancel(self, attempt: Attempt) -> None:
        attempt.call = None  # its heap entry, if any, finds no call

    def _serve(self, attempt: Attempt, now: float) -> None:
        call: ModelledCall = attempt.call
        heapq.heappush(
            self.heap,
            (
                now + call.service_ms * 0.001,
                attempt.job.ident,
                self.lives[call.backend],
                next(self._seq),
                attempt,
            ),
        )

    def fire(self, entry: tuple[float, int, int, int, Any], dispatcher: Dispatcher) -> None:
        """One heap entry's time has come: a call answers (unless it died with its
        backend's life or was cancelled), or a timer fires."""
        now, _, life, _, what = entry
        if isinstance(what, _Timer):
            if not what.cancelled:
                self.now_s = now
                what.callback(now)
            return
        attempt: Attempt = what
        call: ModelledCall | None = attempt.call
        if call is None or life != self.lives[call.backend]:
            return
        self.now_s = now
        latency_ms = (now - call.sent_s) * 1000.0 + self.rtts[call.backend]
        nxt = dispatcher.answered(attempt, None, latency_ms, now)
        if nxt is not None:  # the waiting request due first takes the slot
            waiting = nxt.attempt
            assert isinstance(waiting, Attempt)
            if waiting.call is not None:
                self._serve(waiting, now)

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

    # ---- scenario events and probes ----

    def set_price(self, backend: str, usd_per_hour: float) -> None:
        self.states[self.names[backend]].set_price(usd_per_hour)

    def kill(self, backend: str) -> None:
        """The backend dies: its calls in service and waiting fail (each retried by the
        dispatcher, in request order) and it leaves the routes until restarted."""
        b = self.names[backend]
        state = self.states[b]
        state.healthy = False
        state.last_error = "killed"
        state.refresh()
        self.lives[b] = self._next_life  # the calls in service die with the old life
        self._next_life += 1
        now = self.now_s
        lost = sorted(state.clear(), key=_request_number)
        for ticket in lost:
            attempt = ticket.attempt
            assert isinstance(attempt, Attempt)
            self.dispatcher.failed(attempt, BackendKilled(state.name), True, True, now)

    def restart(self, backend: str) -> None:
        state = self.states[self.names[backend]]
        state.healthy = True
        state.last_error = ""
        state.refresh()

    def drain(self, backend: str, drained: bool) -> None:
        state = self.states[self.names[backend]]
        state.drained = drained
        state.refresh()

    def set_policy(self, policies: PoliciesSettings) -> None:
        self.set_policies(policies)

    def multiply_rate(self, surge: MultiplyRate) -> None:
        pass  # already in the arrivals

    def probe(self, now: float, interval_s: float) -> None:
        """The prober's latency probes: one inference on each available route that had
        no sample for an interval (modelled unqueued: the route is idle)."""
        for route, sim in self.sims.items():
            last = route.estimate.last_sample_s
            if route.state.available and (last is None or now - last >= interval_s):
                if sim.pos >= SAMPLE_CHUNK:
                    sim.refill()
                svc = sim.samples[sim.pos]
                sim.pos += 1
                rtt = self.rtts[sim.backend]
                route.estimate.observe(service_sample(svc + rtt, rtt), now)


def _request_number(ticket: Ticket) -> int:
    attempt = ticket.attempt
    assert isinstance(attempt, Attempt)
    return attempt.job.ident


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


@dataclass(slots=True)
class Report:
    scenario: Scenario
    requests: int
    wall_s: float
    bound: Bound
    results: dict[str, PolicyResult]
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.met for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario.scenario,
            "requests": self.requests,
            "wall_s": round(self.wall_s, 4),
            "lower_bound_cost_usd_per_1m": self.bound.cost_usd_per_1m,
            "infeasible_classes": self.bound.infeasible_classes,
            "policies": {name: r.to_json() for name, r in self.results.items()},
        }


@dataclass(frozen=True, slots=True)
class Check:
    """One of the scenario's thresholds, checked."""

    key: str
    """attainment, cost_vs_bound, saving_vs_fastest or cheapest_misses."""
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


def simulate(
    scenario: Scenario,
    policies: Sequence[str] = POLICIES,
    clock: Callable[[], float] = time.perf_counter,
) -> Report:
    # The solver's library loads before the clock starts, as the simulator's own
    # modules did: wall_s is the simulation's work (trace, bound, runs), not imports.
    import scipy.optimize  # noqa: F401

    started = clock()
    trace = make_trace(scenario)
    bound = lower_bound(scenario, trace)
    results = {}
    for name in policies:
        chooser = chooser_for(name)
        sim = Simulation(scenario, trace, chooser, retry_by_alternatives=name == "switchyard")
        latency, sla, cost, retried = sim.run()
        results[name] = summarise(
            scenario, trace, latency, sla, cost, retried, bound.infeasible_classes
        )
    wall_s = clock() - started
    report = Report(scenario, len(trace), wall_s, bound, results)
    if "switchyard" in results and set(POLICIES) <= set(results):
        report.checks = check(scenario, bound, results)
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


def run(args: argparse.Namespace) -> int:
    try:
        scenario = load_scenario(args.scenario)
        if args.short:
            scenario = scenario.shortened()
        if args.seed is not None:
            scenario = scenario.model_copy(update={"seed": args.seed})
        report = simulate(scenario)
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
    runs = len(report.results)
    rate = report.requests * runs / report.wall_s if report.wall_s > 0 else 0.0
    console.print(
        f"[bold]{scenario.scenario}[/bold]: {scenario.description}\n"
        f"{report.requests:,} requests over {scenario.duration_s:g} s, {runs} policies, "
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
