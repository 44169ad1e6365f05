"""The router: chooses a route for one request. A pure function of (request,
routes, policy, now): no I/O, no clock, no randomness of its own; simulation
replays it with an injected clock.

For every available route it predicts the request's latency at the policy's
percentile:

    predicted = network round trip + queue wait + service time at the percentile

where the queue wait is the work due before the request on its backend (each
backend takes waiting requests earliest deadline first, a request's deadline
being its arrival plus its SLA): the time until the first busy slot frees, the
waiting work due first shared by the slots, and the spread of that many waits
at the percentile, inflated for tighter classes that arrive meanwhile and go
ahead (see `queue_wait_ms`); the service time grows with the batch. It keeps the
routes that meet the SLA (and the cost cap) and chooses the cheapest, the
lowest-carbon or the fastest as the policy's objective says. When none is
feasible: the fastest route (best effort) or a rejection with the reason.

The cost of a request on a route is the backend's price for the busy time it
takes: USD per hour x mean service time / parallel slots (`figures.py`).

Imports the fleet state and the formulas only: no grpc, protobuf, clock, event loop or
randomness (import-linter and ruff check it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gateway.routing.figures import per_request, predicted_ms
from gateway.routing.fleet import DEFAULT_ROW_FRACTION, BackendState, Route
from gateway.routing.sla import Policy

ROW_FRACTION = DEFAULT_ROW_FRACTION
"""Extra service time per extra row of a batch, as a fraction of one row's, where a
route's profile does not say (the simulator's modelled routes)."""
INF = float("inf")


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What routing knows about a request."""

    model: str
    batch_size: int = 1
    sla_ms: float | None = None
    sla_class: str | None = None
    priority: int = 0


REASONS = {
    "cost": "cheapest-feasible",
    "carbon": "lowest-carbon-feasible",
    "latency": "fastest-feasible",
}


@dataclass(slots=True)
class Decision:
    """The router's choice for one request, and why."""

    route: Route | None
    reason: str
    """cheapest-feasible, lowest-carbon-feasible, fastest-feasible, infeasible-fallback,
    infeasible-explore (see `explores`), infeasible-reject, queue-full (every available
    route's backend is at its queue limit) or no-healthy-route."""
    predicted_ms: float = INF
    cost_usd: float = 0.0
    message: str = ""
    """For rejections: what was infeasible, for the caller."""
    _asked: tuple[RouteRequest, Sequence[Route], Policy] | None = field(default=None, repr=False)
    """What the router was asked (the SLA router's decisions): to rank the others."""

    @property
    def ranks(self) -> bool:
        """Whether `alternatives` ranks the other routes (the SLA router's decisions;
        a baseline's do not)."""
        return self._asked is not None

    def alternatives(self, now_s: float) -> list[Route]:
        """The other available routes, best first as the router ranks them at `now_s`
        (feasible by objective, then the rest fastest first): where retries and
        hedges go, ranked when they go, by the load and estimates of that moment.
        Empty for the baselines' decisions."""
        if self._asked is None:
            return []
        ranked: list[tuple[tuple[float, ...], Route]] = []
        _choose(*self._asked, now_s, ranked)
        ranked.sort(key=lambda item: item[0])
        return [route for _, route in ranked if route is not self.route]


def batch_factor(batch_size: int, row_fraction: float = ROW_FRACTION) -> float:
    """Service time of a `batch_size`-row request in units of a one-row request's, where
    each extra row costs `row_fraction` of one row (a route's own, from its profile)."""
    return 1.0 + row_fraction * (batch_size - 1) if batch_size > 1 else 1.0


def queue_wait_ms(
    state: BackendState,
    mean_ms: float,
    service_ms: float,
    sla_ms: float,
    percentile: float,
    now_s: float,
) -> float:
    """The wait of one more request, due in `sla_ms`, on a backend whose slots are
    all busy, at the percentile `service_ms` is for (0 while a slot is free, but for
    other gateways' requests sent since the backend's last load report).

    Backends take waiting requests earliest deadline first, so only the work due
    before this one is ahead of it: the time until the first busy slot frees (each
    request in service ends at its route's quantile at level 1 - (1 - p)^(1/N), N
    of them, measured from its start, so that the first of N to end does so by then
    at the percentile p, at least p99), plus the expected work of the waiting
    requests due first, shared by the slots, plus the spread of that many waits
    (about sqrt(n) times one request's spread above its mean). Tighter classes
    arriving meanwhile go ahead too: the wait is inflated by 1 / (1 - rho)^2,
    rho the share of the slots their work takes. On a backend other gateways send to,
    their requests sent since its last load report are ahead too, as many as their
    recent rate brings at the percentile, and the gateways' latency probes as many as
    theirs brings on average (`BackendState.unseen_ms`), free slot or not.
    """
    wait = 0.0
    if state.in_flight >= state.slots:
        wait = state.wait_ms(mean_ms, service_ms, sla_ms, percentile, now_s)
    if state.others_rate > 0.0 or state.probes_rate > 0.0:  # after `wait_ms`, which drops
        wait += state.unseen_ms(mean_ms, now_s, percentile)  # a report whose work is done
    return wait


def predict_ms(
    route: Route, percentile: float, now_s: float, batch_size: int = 1, sla_ms: float = INF
) -> float:
    """Predicted latency of one more request on `route` now (the router's formula)."""
    state = route.state
    est = route.estimate
    service = est.quantile_ms(percentile)
    wait = queue_wait_ms(state, est.mean_ms, service, sla_ms, percentile, now_s)
    factor = batch_factor(batch_size, route.row_fraction)
    return predicted_ms(state.network.rtt_ms, service, factor, wait)


def hedge_after_ms(route: Route, policy: Policy, now_s: float, batch_size: int = 1) -> float:
    """How long an attempt on `route` may run before it is hedged: its predicted p95."""
    return predict_ms(route, 95.0, now_s, batch_size, policy.budget_ms)


def cost_usd(route: Route, batch_size: int = 1) -> float:
    factor = batch_factor(batch_size, route.row_fraction)
    return per_request(route.state.usd_per_busy_ms, route.estimate.mean_ms, factor)


def carbon_g(route: Route, batch_size: int = 1) -> float | None:
    per_ms = route.state.g_co2_per_busy_ms
    if per_ms is None:
        return None
    return per_request(per_ms, route.estimate.mean_ms, batch_factor(batch_size, route.row_fraction))


def choose(
    request: RouteRequest, routes: Sequence[Route], policy: Policy, now_s: float
) -> Decision:
    """Chooses the route for `request` among `routes` (unavailable ones are skipped)."""
    return _choose(request, routes, policy, now_s, None)


def _choose(
    request: RouteRequest,
    routes: Sequence[Route],
    policy: Policy,
    now_s: float,
    ranked: list[tuple[tuple[float, ...], Route]] | None,
) -> Decision:
    """`choose`; with `ranked`, also every available route with its rank key there."""
    sla = policy.budget_ms
    pct = policy.percentile
    objective = policy.objective
    extra_rows = request.batch_size - 1
    cap = INF
    if policy.max_cost_usd_per_1m is not None:
        cap = policy.max_cost_usd_per_1m / 1e6 * request.batch_size
    asked = (request, routes, policy)
    best: Route | None = None
    best_key: tuple[float, ...] = (INF,)
    best_pred = best_cost = 0.0
    fastest: Route | None = None
    fastest_pred = fastest_cost = INF
    p99 = pct == 99.0
    full: Route | None = None
    for route in routes:
        state = route.state
        if not state.available:
            continue
        est = route.estimate
        mean = est.mean_ms
        # batch_factor(request.batch_size, route.row_fraction), inlined as below
        factor = 1.0 + route.row_fraction * extra_rows if extra_rows > 0 else 1.0
        service = est.p99_ms if p99 else est.quantile_ms(pct)
        if state.in_flight >= state.slots:
            if state.in_flight - state.slots >= state.queue_limit:
                full = route  # its queue is at its limit: no more work goes there
                continue
            wait = state.wait_ms(mean, service, sla, pct, now_s)
        else:
            wait = 0.0
        if state.others_rate > 0.0 or state.probes_rate > 0.0:  # others' requests and probes
            wait += state.unseen_ms(mean, now_s, pct)  # sent since their last report
        pred = predicted_ms(state.network.rtt_ms, service, factor, wait)
        cost = per_request(state.usd_per_busy_ms, mean, factor)
        if pred <= sla and cost <= cap:
            if objective == "cost":
                key: tuple[float, ...] = (0.0, cost, pred, 0.0 if route.default else 1.0)
            elif objective == "latency":
                key = (0.0, pred, cost)
            else:
                per_ms = state.g_co2_per_busy_ms
                carbon = INF if per_ms is None else per_request(per_ms, mean, factor)
                key = (0.0, carbon, cost, pred)
            if key < best_key:
                best, best_key, best_pred, best_cost = route, key, pred, cost
            if ranked is not None:
                ranked.append((key, route))
        elif ranked is not None:
            ranked.append(((1.0, pred, cost), route))
        if pred < fastest_pred:
            fastest, fastest_pred, fastest_cost = route, pred, cost
    if best is not None:
        return Decision(
            best, REASONS.get(objective, "cheapest-feasible"), best_pred, best_cost, "", asked
        )
    if fastest is None:
        if full is not None:
            state = full.state
            waiting = state.in_flight - state.slots
            message = (
                f"every route of model {request.model!r} is at its queue limit"
                f" ({state.name}: {waiting} waiting, limit {state.queue_limit})"
            )
            # predicted_ms: about when the queue has room again (its work, shared by its slots).
            drain_ms = (waiting + 1 - state.queue_limit) * full.estimate.mean_ms / state.slots
            return Decision(None, "queue-full", drain_ms, message=message)
        return Decision(None, "no-healthy-route", message=f"no healthy route for {request.model!r}")
    if policy.on_infeasible == "reject":
        if explores(fastest, pct, sla, request.batch_size, now_s):
            return Decision(fastest, "infeasible-explore", fastest_pred, fastest_cost, "", asked)
        message = (
            f"no route for model {request.model!r} meets p{pct:g} <= {policy.latency_ms:g} ms"
            + (f" (less {policy.overhead_ms:g} ms overhead)" if policy.overhead_ms else "")
            + (f" within ${policy.max_cost_usd_per_1m:g}/1M" if cap < INF else "")
            + f": fastest is {fastest.backend}/{fastest.variant} at {fastest_pred:.2f} ms predicted"
        )
        return Decision(None, "infeasible-reject", fastest_pred, fastest_cost, message, asked)
    return Decision(fastest, "infeasible-fallback", fastest_pred, fastest_cost, "", asked)


def explores(
    route: Route, percentile: float, budget_ms: float, batch_size: int, now_s: float
) -> bool:
    """Under a reject policy with no feasible route: whether the fastest, `route`, gets
    the request anyway, so that its estimate is measured again rather than left to
    decay (one slow answer among a few samples would rule a route out for as long as
    it takes to fade under its percentile's share of the weight: about 50 s at p99).
    It does when its estimate, not its queue, rules it out (a slot is free), only its
    tail misses (its median meets the budget: an outlier's mark), and it rests on live
    samples too few to tell the percentile from one outlier (a decayed weight under
    1 / (1 - p), 100 at p99). Each answer adds a sample, so it stops by itself."""
    state = route.state
    est = route.estimate
    if state.in_flight >= state.slots or est.samples == 0:
        return False
    if est.weight(now_s) >= 100.0 / max(100.0 - percentile, 0.01):
        return False
    median = predicted_ms(
        state.network.rtt_ms, est.p50_ms, batch_factor(batch_size, route.row_fraction), 0.0
    )
    return median <= budget_ms


def retry_hint_ms(decision: Decision, policy: Policy) -> int:
    """When a request refused for load may succeed if sent again (ms, at least 1): a
    full queue's drain time; under a reject policy, how far the fastest route's
    prediction is over the SLA (its queue's excess work)."""
    if decision.reason == "queue-full":
        wait = decision.predicted_ms
    else:
        wait = decision.predicted_ms - policy.budget_ms
    if not math.isfinite(wait):
        return 1000
    return max(1, math.ceil(wait))


# ---- explain: the same rule, with every route's verdict, for SREs ----------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    route: Route
    status: str
    """ready, unhealthy, drained, ejected."""
    predicted_ms: float
    cost_usd_per_1m: float
    carbon_g_per_1m: float | None
    feasible: bool
    chosen: bool
    why: str


def explain(
    request: RouteRequest, routes: Sequence[Route], policy: Policy, now_s: float
) -> tuple[Decision, list[Verdict]]:
    """The decision `choose` makes now, and for every route why it was or was not chosen."""
    decision = choose(request, routes, policy, now_s)
    rows = request.batch_size
    verdicts = []
    chosen_cost = decision.cost_usd / rows * 1e6 if decision.route is not None else None
    for route in routes:
        state = route.state
        pred = predict_ms(route, policy.percentile, now_s, rows, policy.budget_ms)
        cost_1m = cost_usd(route, rows) / rows * 1e6
        carbon = carbon_g(route, rows)
        carbon_1m = None if carbon is None else carbon / rows * 1e6
        over_sla = pred > policy.budget_ms
        over_cap = policy.max_cost_usd_per_1m is not None and cost_1m > policy.max_cost_usd_per_1m
        feasible = state.available and not over_sla and not over_cap
        chosen = route is decision.route
        if not state.available:
            why = state.status + (f": {state.last_error}" if state.last_error else "")
        elif chosen:
            why = f"chosen: {decision.reason}"
        elif over_sla:
            why = (
                f"predicted p{policy.percentile:g} {pred:.2f} ms > SLA {policy.latency_ms:g} ms"
                + (f" less {policy.overhead_ms:g} ms overhead" if policy.overhead_ms else "")
            )
        elif over_cap:
            why = f"${cost_1m:.4f}/1M over the cap ${policy.max_cost_usd_per_1m:g}/1M"
        elif chosen_cost is not None and decision.reason == "cheapest-feasible":
            why = f"feasible, ${cost_1m - chosen_cost:.4f}/1M dearer than the chosen route"
        else:
            why = f"feasible, not best by objective {policy.objective}"
        verdicts.append(
            Verdict(route, state.status, pred, cost_1m, carbon_1m, feasible, chosen, why)
        )
    return decision, verdicts


# ---- baselines: simple rules the router is measured against -------------------------

Chooser = Callable[[RouteRequest, Sequence[Route], Policy, float], Decision]


def _available(routes: Sequence[Route]) -> list[Route]:
    return [r for r in routes if r.state.available]


def fastest_only(
    request: RouteRequest, routes: Sequence[Route], policy: Policy, now_s: float
) -> Decision:
    """Always the route with the lowest unloaded service time, whatever it costs."""
    live = _available(routes)
    if not live:
        return Decision(None, "no-healthy-route")
    route = min(live, key=lambda r: (r.estimate.p50_ms, r.backend))
    return Decision(route, "fastest-only", cost_usd=cost_usd(route, request.batch_size))


def cheapest_only(
    request: RouteRequest, routes: Sequence[Route], policy: Policy, now_s: float
) -> Decision:
    """Always the route with the lowest cost per inference, whatever its latency."""
    live = _available(routes)
    if not live:
        return Decision(None, "no-healthy-route")
    route = min(live, key=lambda r: (cost_usd(r), r.backend))
    return Decision(route, "cheapest-only", cost_usd=cost_usd(route, request.batch_size))


def least_loaded(
    request: RouteRequest, routes: Sequence[Route], policy: Policy, now_s: float
) -> Decision:
    """The route whose backend has the fewest requests in flight per slot; ties cheapest."""
    live = _available(routes)
    if not live:
        return Decision(None, "no-healthy-route")
    route = min(live, key=lambda r: (r.state.in_flight / r.state.slots, cost_usd(r), r.backend))
    return Decision(route, "least-loaded", cost_usd=cost_usd(route, request.batch_size))


class RoundRobin:
    """Each available route in turn (per model)."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def __call__(
        self, request: RouteRequest, routes: Sequence[Route], policy: Policy, now_s: float
    ) -> Decision:
        live = _available(routes)
        if not live:
            return Decision(None, "no-healthy-route")
        turn = self._next.get(request.model, 0)
        self._next[request.model] = turn + 1
        route = live[turn % len(live)]
        return Decision(route, "round-robin", cost_usd=cost_usd(route, request.batch_size))


ROUTING = ("switchyard", "fastest-only", "cheapest-only", "round-robin", "least-loaded")
"""The choosers by name: the SLA router (`switchyard`) and the baselines it is measured
against, for the simulator and for the live gateway's routing (admin API)."""


def chooser_for(name: str) -> Chooser:
    """A fresh chooser for `name` (round-robin keeps state, so one per run); a name
    not in ROUTING is a ValueError naming them."""
    if name == "switchyard":
        return choose
    if name == "fastest-only":
        return fastest_only
    if name == "cheapest-only":
        return cheapest_only
    if name == "round-robin":
        return RoundRobin()
    if name == "least-loaded":
        return least_loaded
    raise ValueError(f"unknown routing {name!r} (routing: {', '.join(ROUTING)})")
