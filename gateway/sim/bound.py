"""The offline lower bound on a scenario's cost: for each time segment between events a
linear program (scipy HiGHS) sends each stream's arrival rate in that segment to the
routes that can meet its SLA unloaded (network + service quantile at the policy's
percentile <= latency), at least cost, with no backend above 100% utilisation (mean
service time x rate / slots <= 1). It knows the future and ignores queueing, so no
policy that meets the SLA can be cheaper in expectation.

Imports the routing core's formulas and policy book, the modelled routes and numpy;
scipy when solving. No grpc, no clock.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.config import PoliciesSettings
from gateway.routing.figures import per_request, predicted_ms, usd_per_busy_ms
from gateway.routing.policy import PolicyBook
from gateway.routing.router import RouteRequest, batch_factor
from gateway.routing.sla import Policy
from gateway.sim.arrivals import Trace
from gateway.sim.modelled import RouteModel, route_models
from gateway.sim.scenario import MultiplyRate, MultiplyRateEvent, Scenario

UTILISATION_CAP = 1.0
"""The lower bound's per-backend utilisation limit (pure capacity: a bound, not a target)."""
INF = float("inf")


@dataclass(frozen=True, slots=True)
class Bound:
    cost_usd_per_1m: float
    infeasible_classes: list[str]
    relaxed_segments: int
    """Segments where the fleet could not carry the traffic within capacity and
    SLA, solved with those limits lifted for the streams concerned."""


class _Segment:
    """The fleet as the lower bound sees it between two events: prices, which
    backends may take traffic, the policies."""

    def __init__(self, scenario: Scenario) -> None:
        self.prices = {b.name: b.price_usd_per_hour for b in scenario.backends}
        self.down: set[str] = set()
        self.drained: set[str] = set()
        self.policies = scenario.policies

    def set_price(self, backend: str, usd_per_hour: float) -> None:
        self.prices[backend] = usd_per_hour

    def set_carbon(self, backend: str, g_per_kwh: float) -> None:
        pass  # the bound is the cheapest plan: carbon does not change it

    def kill(self, backend: str) -> None:
        self.down.add(backend)

    def restart(self, backend: str) -> None:
        self.down.discard(backend)

    def drain(self, backend: str, drained: bool) -> None:
        (self.drained.add if drained else self.drained.discard)(backend)

    def set_policy(self, policies: PoliciesSettings) -> None:
        self.policies = policies

    def multiply_rate(self, surge: MultiplyRate) -> None:
        pass  # in the arrivals the segment counts

    def snapshot(self) -> dict[str, Any]:
        return {
            "prices": dict(self.prices),
            "available": {n for n in self.prices if n not in self.down | self.drained},
            "policies": self.policies,
        }


def _segment_states(scenario: Scenario) -> list[tuple[float, float, dict[str, Any]]]:
    """(start, end, state) for each stretch between events: prices, availability, policies."""
    segment = _Segment(scenario)
    events = sorted(scenario.events, key=lambda e: e.at_s)
    cuts = {0.0, scenario.duration_s}
    for event in events:
        cuts.add(event.at_s)
        if isinstance(event, MultiplyRateEvent):
            cuts.add(min(scenario.duration_s, event.at_s + event.multiply_rate.for_s))
    points = sorted(c for c in cuts if 0.0 <= c <= scenario.duration_s)
    out = []
    index = 0
    for a, b in itertools.pairwise(points):
        while index < len(events) and events[index].at_s <= a:
            events[index].apply(segment)
            index += 1
        out.append((a, b, segment.snapshot()))
    return out


def feasible(route: RouteModel, backend_rtt_ms: float, policy: Policy, factor: float) -> bool:
    """Whether `route`, unloaded, meets `policy`'s latency at its percentile."""
    service_ms = route.quantile_ms(policy.percentile)
    return predicted_ms(backend_rtt_ms, service_ms, factor) <= policy.budget_ms


def infeasible_classes(scenario: Scenario) -> list[str]:
    """Classes (under the scenario's policies) that no route can serve within SLA unloaded."""
    book = PolicyBook(scenario.policies)
    routes = route_models(scenario)
    ok: dict[str, bool] = {}
    for stream in scenario.traffic:
        policy = book.resolve(
            RouteRequest(stream.model, stream.batch_size, stream.sla_ms, stream.sla_class)
        )
        factor = batch_factor(stream.batch_size)
        any_ok = any(
            feasible(r, scenario.backends[r.backend].network_ms, policy, factor)
            for r in routes
            if r.model == stream.model
        )
        ok[stream.class_name] = ok.get(stream.class_name, False) or any_ok
    return sorted(name for name, good in ok.items() if not good)


def lower_bound(scenario: Scenario, trace: Trace) -> Bound:
    from scipy.optimize import linprog

    routes = route_models(scenario)
    backends = scenario.backends
    streams = scenario.traffic
    total_cost = 0.0
    total_served = 0
    relaxed = 0
    for start, end, state in _segment_states(scenario):
        width = end - start
        if width <= 0:
            continue
        lo, hi = np.searchsorted(trace.times, [start, end], side="left")
        counts = np.bincount(trace.streams[lo:hi], minlength=len(streams))
        book = PolicyBook(state["policies"])
        available = [r for r in routes if backends[r.backend].name in state["available"]]
        variables: list[tuple[int, RouteModel, float, float]] = []  # stream, route, cost, load
        demand: list[tuple[int, float]] = []
        for k, stream in enumerate(streams):
            if counts[k] == 0:
                continue
            policy = book.resolve(
                RouteRequest(stream.model, stream.batch_size, stream.sla_ms, stream.sla_class)
            )
            factor = batch_factor(stream.batch_size)
            candidates = [r for r in available if r.model == stream.model]
            if not candidates:
                continue  # nothing could serve it: no cost to bound
            cap = INF
            if policy.max_cost_usd_per_1m is not None:
                cap = policy.max_cost_usd_per_1m / 1e6 * stream.batch_size

            def unit_cost(
                r: RouteModel, factor: float = factor, prices: dict[str, float] = state["prices"]
            ) -> float:
                rate = usd_per_busy_ms(prices[backends[r.backend].name], backends[r.backend].slots)
                return per_request(rate, r.mean_ms, factor)

            good = [
                r
                for r in candidates
                if feasible(r, backends[r.backend].network_ms, policy, factor)
                and unit_cost(r) <= cap
            ]
            if not good:
                if policy.on_infeasible == "reject":
                    continue
                good = candidates
            rate = counts[k] / width
            demand.append((k, rate))
            for r in good:
                load = rate * r.mean_ms * factor / 1000.0 / backends[r.backend].slots
                variables.append((k, r, unit_cost(r), load))
        if not variables:
            continue
        a_eq = np.zeros((len(demand), len(variables)))
        b_eq = np.ones(len(demand))
        row = {k: i for i, (k, _) in enumerate(demand)}
        rate_of = dict(demand)
        # Variables are fractions of each stream's rate, so the problem stays well scaled.
        for j, (k, _, _, _) in enumerate(variables):
            a_eq[row[k], j] = 1.0
        used = sorted({v[1].backend for v in variables})
        a_ub = np.zeros((len(used), len(variables)))
        for j, (_, r, _, load) in enumerate(variables):
            a_ub[used.index(r.backend), j] = load
        b_ub = np.full(len(used), UTILISATION_CAP)
        cost_per_s = np.asarray([v[2] * rate_of[v[0]] for v in variables])
        result = linprog(cost_per_s, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq, method="highs")
        if result.status != 0:
            relaxed += 1
            result = linprog(cost_per_s, A_eq=a_eq, b_eq=b_eq, method="highs")
        total_cost += float(result.fun) * width
        total_served += int(sum(counts[k] for k, _ in demand))
    per_1m = total_cost / total_served * 1e6 if total_served else 0.0
    return Bound(per_1m, infeasible_classes(scenario), relaxed)
