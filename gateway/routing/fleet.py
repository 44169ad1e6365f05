"""Fleet state: what each backend is and costs, whether it may take traffic
(healthy, not drained, not ejected), which models and variants it holds, what
is in flight on it, and each route's live latency estimate. Updated by the
prober, the servicer (attempt outcomes), the admin API and price schedules;
read by the router.

Pure state: no I/O, no clock. Every method that depends on time takes `now_s`.
Routes are long-lived objects (their estimates persist), rebuilt only when a
backend's models or variants change; the router reads them without copying.

A backend that reports its load (a Switchyard worker: backends.protocol.load) has the
other gateways' requests there stand in its queue as tickets of their own beside this
gateway's (`record_report`).

Imports the estimates, the formulas and the protocol's tensor specs and load reports: no
grpc, protobuf, clock, event loop or randomness.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from math import exp, sqrt

from backends.protocol.load import DUE_EDGES_MS, PROBE_MODULUS, LoadReport
from backends.protocol.tensors import TensorSpec
from gateway.routing.estimates import LatencyEstimate, NetworkEstimate
from gateway.routing.figures import g_co2_per_busy_ms, usd_per_busy_ms

DEFAULT_ROW_FRACTION = 0.5
"""A route's extra service time per extra row of a batch, as a fraction of one row's,
until its profile says otherwise."""
DEFAULT_SERVICE_MS = 1.0
"""The service-time guess for a route with neither profile nor samples."""


WORK_RATE_TAU_S = 1.0
"""The time constant of a backend's decayed rate of work per SLA budget (what the
router reads as the load of tighter classes arriving while a request waits)."""
_PER_TAU = 1.0 / WORK_RATE_TAU_S

TIGHTER_LOAD_CAP = 0.95
"""Past this share of the slots taken by tighter classes, a looser request's wait is
inflated by a fixed 400x (the 1 / (1 - rho)^2 of the cap) rather than without bound."""
CAPPED_INFLATION = 1.0 / (1.0 - TIGHTER_LOAD_CAP) ** 2


def first_of_n_level(percentile: float, n: int) -> float:
    """The percentile level at which each of `n` requests in service must be read for
    the first of them to end by then at `percentile` (at least p99)."""
    return float(100.0 * (1.0 - (1.0 - max(percentile, 99.0) / 100.0) ** (1.0 / max(1, n))))


REPORT_MAX_AGE_S = 0.5
"""The longest a backend's load report stands: past it (or sooner, once the work it
reported would be done: `BackendState.record_report`) the gateway's own view of that
backend is all it goes by until the next report; and a report with a lower sequence
number than the standing one is taken only once that one is this old (the worker
restarted)."""

OTHERS = object()
"""The `attempt` of a ticket that stands for other gateways' requests on a backend, as
its load report gave them."""


OTHERS_RATE_TAU_S = 1.0
"""The time constant of a backend's rate of other callers' requests, as its load
reports' sequence numbers count them; and of that rate's fade once reports stop."""

SHARED_WINDOW_S = 1.0
"""How long after a load report last showed other callers' requests on a backend this
gateway takes it to be shared (`BackendState.shared`)."""

SHARE_WINDOW_S = 10.0
"""The time constant of a route's recent traffic (its share in `switchyard admin routes`)."""


def poisson_quantile(mean: float, q: float) -> float:
    """The least count of a Poisson variable of `mean` whose cumulative probability
    reaches `q` (0 < q < 1): how many arrivals a window expecting `mean` holds at that
    percentile. Where the mean is large its own value stands (the tail adds little, and
    the sum would be long)."""
    if mean <= 0.0:
        return 0.0
    if mean > 50.0:
        return mean
    term = cumulative = exp(-mean)
    count = 0
    while cumulative < q:
        count += 1
        term *= mean / count
        cumulative += term
    return float(count)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model as a backend reports it (metadata and configuration, as domain types)."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    variant: str
    """The variant the backend serves it with by default (`remote` when it does not say)."""
    variants: tuple[str, ...] = ()
    """Every variant the backend can serve it with (a request may name one)."""
    profile: tuple[tuple[str, float, float, float | None], ...] = ()
    """(variant, p50 ms, p99 ms, row fraction or None) on the backend's hardware, as
    profiled: p50 and p99 at batch 1; the row fraction is what each extra row of a
    batch adds, as a fraction of one row's time."""

    deadlines: bool = False
    """Its queue takes requests earliest deadline first, by `switchyard_due_us` (a
    Switchyard worker's): the gateway tells it when each request is due."""

    def all_variants(self) -> tuple[str, ...]:
        return self.variants or (self.variant,)


_Derived = tuple[float, float, float, float, float, list[float], list[float], int, int]


class Ticket:
    """A request on a backend from its send to its answer: when it is due (its
    arrival plus its SLA), what its route expects it to take, and when it took a
    slot (None while it waits)."""

    __slots__ = ("attempt", "count", "due_s", "expected_ms", "route", "started_s", "timed")

    def __init__(
        self, route: Route | None, expected_ms: float, due_s: float, count: int = 1
    ) -> None:
        self.route = route
        self.expected_ms = expected_ms
        self.due_s = due_s
        self.count = count
        """The requests it stands for (several: other gateways' waiting requests due
        within one bucket of a load report, `expected_ms` their work together)."""
        self.attempt: object = None
        """Whose request it is (the dispatcher's attempt; OTHERS: other gateways')."""
        self.started_s: float | None = None
        self.timed = True
        """Whether `started_s` is when the backend took it up, as near as this gateway
        can tell: False for a waiting request given its slot as other gateways'
        reported requests left the model, or while they stood in it (the backend may
        have served any gateway's request next), so its answer measures no route."""


@dataclass(slots=True)
class BackendState:
    name: str
    address: str
    hardware_class: str
    price_usd_per_hour: float
    slots: int = 1
    """How many requests it runs at once (its threads), for queue-wait predictions."""
    queue_limit: int = 2**62
    """Requests that may wait for a slot (sent beyond `slots`) before the router sends
    it no more: past it, work is shed at the gateway, not queued without end."""
    expected_models: tuple[str, ...] = ()
    """Models configured for v2 servers that cannot list their own."""
    carbon_g_per_kwh: float | None = None
    power_w: float | None = None
    healthy: bool = False
    drained: bool = False
    ejected_until_s: float | None = None
    """Set while passive outlier detection keeps it out of the routes."""
    ejections: int = 0
    """Ejections in a row without a clean spell: the back-off doubles with each."""
    ejection_why: str = ""
    """What ejected it last (the failures and the last error)."""
    attempt_failures: int = 0
    """Consecutive failed or timed-out attempts (passive outlier detection)."""
    window_start_s: float = 0.0
    window_attempts: int = 0
    window_failures: int = 0
    """Attempts, and those that failed, since `window_start_s` (success-rate ejection)."""
    retry_tokens: float = 10.0
    """gRPC retry throttling: retries and hedges come here while this is above half
    its most (see RetryThrottle)."""
    available: bool = False
    """Healthy, not drained, not ejected: the router's one check."""
    models: dict[str, ModelInfo] = field(default_factory=dict)
    in_flight: int = 0
    serving: list[Ticket] = field(default_factory=list)
    """The requests in flight that hold a slot (at most `slots`)."""
    _waiting: list[Ticket | None] = field(default_factory=list)
    """The rest, earliest deadline first (the order they take slots in), from index
    `_head` on: taking the first only moves the head, so a long queue is not shifted
    on every answer (it is compacted once the head is past half of it)."""
    _waiting_due: list[float] = field(default_factory=list)
    """Their deadlines (s), in the same order, for bisection."""
    _head: int = 0
    work_rates: dict[float, list[float]] = field(default_factory=dict)
    """SLA budget (ms) -> [ms of expected work sent per second, decayed with
    WORK_RATE_TAU_S, as of time s]."""
    _stale: bool = True
    """Set by every admit, finish and clear: the figures below, which the router reads
    for every route of every request, are derived again from the queue when next read
    (`_by_budget` is emptied at once, so what it holds is always current)."""
    _prefix_ms: list[float] = field(default_factory=list)
    """The waiting requests' expected work, cumulated in deadline order."""
    _first_end_ms: dict[float, float] = field(default_factory=dict)
    """Percentile -> when (ms on the clock) the first request in service ends at it."""
    _tighter: dict[float, float] = field(default_factory=dict)
    """SLA budget (ms) -> share of the slots tighter classes' work takes, as of
    `_rates_at_s`."""
    _rates_at_s: float = 0.0
    _by_budget: dict[float, _Derived] = field(default_factory=dict)
    """SLA budget (ms) -> what `wait_ms` reads for a request's policy, in one lookup:
    (percentile, first end at it, tighter share, its inflation, `_rates_at_s`,
    `_waiting_due`, `_prefix_ms`, `_head`, `slots`)."""
    last_probe_s: float | None = None
    last_error: str = ""
    consecutive_failures: int = 0
    network: NetworkEstimate = field(default_factory=NetworkEstimate)
    usd_per_busy_ms: float = 0.0
    """Price per millisecond of one slot's time: cost of a request = this x service ms."""
    g_co2_per_busy_ms: float | None = None
    report_seq: int = -1
    """The standing load report's sequence number (-1: none yet)."""
    report_at_s: float | None = None
    """When the standing load report came."""
    report_until_s: float = math.inf
    """When the other gateways' tickets it placed leave the queue (inf: none there)."""
    others: list[Ticket] = field(default_factory=list)
    """The tickets the standing report placed (counted in `in_flight`)."""
    others_seen_s: float = -math.inf
    """When a load report last showed other callers' requests here."""
    foreign_seen_s: float = -math.inf
    """When a load report last showed requests here of callers outside this gateway's
    group (`--processes`): every other caller's, where the report does not tell."""
    others_rate: float = 0.0
    """Other callers' requests answered here per second, recently: the reports the
    backend sent between two of this gateway's, less its own and the latency probes'
    (`unseen_ms`)."""
    probes_rate: float = 0.0
    """Latency probes answered here per second, recently, as the reports' probe counts
    tell (every gateway's, this one's own among them; 0 where the backend does not say,
    its probes then counted in `others_rate`)."""
    report_probes: int | None = None
    """The standing load report's probe count (None: none told)."""
    report_work_ms: float = 0.0
    """The others' work the standing report holds (its running batches' rest and its
    waiting work, shared by the slots)."""

    def __post_init__(self) -> None:
        self.set_price(self.price_usd_per_hour)
        self.set_carbon(self.carbon_g_per_kwh, self.power_w)
        self.refresh()

    def set_price(self, usd_per_hour: float) -> None:
        self.price_usd_per_hour = usd_per_hour
        self.usd_per_busy_ms = usd_per_busy_ms(usd_per_hour, self.slots)

    def set_carbon(self, g_per_kwh: float | None, power_w: float | None) -> None:
        self.carbon_g_per_kwh, self.power_w = g_per_kwh, power_w
        if g_per_kwh is None or power_w is None:
            self.g_co2_per_busy_ms = None
        else:
            self.g_co2_per_busy_ms = g_co2_per_busy_ms(power_w, g_per_kwh, self.slots)

    def admit(
        self,
        route: Route | None,
        expected_ms: float,
        due_s: float,
        now_s: float,
        budget_ms: float | None = None,
    ) -> Ticket:
        """A request sent to this backend at `now_s`, expected to take `expected_ms`,
        due at `due_s`: it takes a free slot, or waits behind the requests due before
        it. `budget_ms` (its SLA) counts its work in the rate of its class."""
        if now_s >= self.report_until_s:
            self._drop_others(now_s)
        self.in_flight += 1
        self._changed()
        if budget_ms is not None:
            rate = self.work_rates.get(budget_ms)
            if rate is None:
                self.work_rates[budget_ms] = [expected_ms / WORK_RATE_TAU_S, now_s]
            else:
                if now_s > rate[1]:
                    rate[0] *= exp((rate[1] - now_s) * _PER_TAU)
                    rate[1] = now_s
                rate[0] += expected_ms / WORK_RATE_TAU_S
        return self._place(Ticket(route, expected_ms, due_s), now_s)

    def _place(self, ticket: Ticket, now_s: float) -> Ticket:
        """`ticket` takes a free slot, or waits behind the tickets due before it."""
        if len(self.serving) < self.slots:
            ticket.started_s = now_s
            self.serving.append(ticket)
        else:
            due_s = ticket.due_s
            at = bisect_right(self._waiting_due, due_s, self._head)
            self._waiting_due.insert(at, due_s)
            self._waiting.insert(at, ticket)
        return ticket

    def record_report(self, report: LoadReport, now_s: float) -> bool:
        """The backend's load report (its queue less this gateway's requests), come
        with an answer at `now_s`: the other gateways' requests it holds replace those of
        the standing report in this backend's queue, beside this gateway's own tickets.
        So the queue the router reads is the report's, plus what this gateway sent since,
        less what of its own was answered since, whatever of its own was in transit.

        The batches running for others take free slots (as requests started now, ending
        in the report's `rest_us`), else wait ahead of everything; the others' waiting
        requests of each deadline bucket wait as one ticket, due at the bucket's edge,
        with their work together. They leave when the next report comes, or once the
        work they stand for would be done (the slots' share of it), or REPORT_MAX_AGE_S
        after the report, whichever is first; the gateway then goes by its own view.

        A report whose sequence number is not above the standing one's (overtaken on
        another stream) is ignored, unless the standing one is REPORT_MAX_AGE_S old.
        Returns whether it was taken."""
        at_s = self.report_at_s
        if report.seq <= self.report_seq and at_s is not None and now_s - at_s < REPORT_MAX_AGE_S:
            return False
        if at_s is not None and report.seq > self.report_seq and now_s > at_s:
            # The reports sent to others since this gateway's last: their answers.
            gap_s = now_s - at_s
            weight = 1.0 - exp(-gap_s / OTHERS_RATE_TAU_S)
            answered = report.seq - self.report_seq - 1
            probes = 0
            if report.probes is not None and self.report_probes is not None:
                probes = min(answered, (report.probes - self.report_probes) % PROBE_MODULUS)
                self.probes_rate += weight * (probes / gap_s - self.probes_rate)
            rate = (answered - probes) / gap_s
            self.others_rate += weight * (rate - self.others_rate)
        self._drop_others(now_s)
        self.report_seq, self.report_at_s = report.seq, now_s
        self.report_probes = report.probes
        self.report_work_ms = 0.0
        if report.in_service or report.waiting_requests:
            self.others_seen_s = now_s
            if report.foreign is None or report.foreign:
                self.foreign_seen_s = now_s
        others = self.others
        work_ms = 0.0
        running = min(report.in_service, self.slots)
        if running:
            rest_ms = report.rest_us / 1000.0
            work_ms = rest_ms
            for _ in range(running):
                others.append(self._place(Ticket(None, rest_ms, now_s), now_s))
        for edge_ms, (count, us) in zip((*DUE_EDGES_MS, math.inf), report.waiting, strict=False):
            if count > 0:
                ticket = Ticket(None, us / 1000.0, now_s + edge_ms * 0.001, count)
                others.append(self._place(ticket, now_s))
                work_ms += ticket.expected_ms / self.slots
        if not others:
            return True
        for ticket in others:
            ticket.attempt = OTHERS
            self.in_flight += ticket.count
        # The others' waiting requests run in their turn, after this gateway's requests
        # due before them and those in service: the others' tickets stand until the
        # work of the whole queue as it now stands would be done.
        # (The others' running batches count once: in service, or waiting ahead of
        # everything where this gateway's own requests hold the slots in its view.)
        queue_ms = sum(t.expected_ms for t in self._waiting[self._head :] if t is not None)
        for ticket in self.serving:
            if ticket.started_s is not None:
                queue_ms += max(0.0, ticket.expected_ms - (now_s - ticket.started_s) * 1000.0)
        work_ms = max(work_ms, queue_ms / self.slots)
        self.report_until_s = now_s + min(REPORT_MAX_AGE_S, work_ms * 0.001)
        self.report_work_ms = work_ms
        self._changed()
        return True

    def unseen_ms(self, mean_ms: float, now_s: float, percentile: float | None = None) -> float:
        """The wait (ms) of one more request behind other callers' requests that reached
        the backend after its standing load report was made, which no report has shown
        yet: their recent rate (faded as the report ages) over the time since the report
        (plus a round trip: the report was made half of one before it came, the request
        arrives half of one after it leaves), up to the report's work and one request's
        more (those that came earlier have been served), less the slots free in this
        gateway's view, each taking `mean_ms` of a slot. With `percentile` (the router's:
        its SLA is met at a percentile, not on average), the count of requests is the
        Poisson quantile of that expectation there (`poisson_quantile`): a window
        expecting 0.3 of them holds one more than one time in four. The gateways'
        latency probes, periodic and few (one a route every few seconds, where it gets
        no traffic), count at their expected number: at the percentile, a probe a
        second would stand a whole request ahead of every request on a one-slot backend
        that an idle gateway probes. 0 unless the backend is `shared` (its reports
        showed other callers' requests lately): a lone gateway's reports skip numbers
        too, for its latency probes' answers and for reports overtaken on another
        stream, which are its own."""
        at_s = self.report_at_s
        if at_s is None or not self.shared(now_s):
            return 0.0
        age_s = now_s - at_s
        window_s = min(age_s + self.network.rtt_ms * 0.001, (self.report_work_ms + mean_ms) * 0.001)
        fade = window_s * exp(-age_s / OTHERS_RATE_TAU_S)
        expected = self.others_rate * fade
        if percentile is not None:
            expected = poisson_quantile(expected, percentile / 100.0)
        ahead = expected + self.probes_rate * fade - max(0, self.slots - self.in_flight)
        return ahead * mean_ms / self.slots if ahead > 0.0 else 0.0

    def shared(self, now_s: float) -> bool:
        """Whether other callers (other gateways) send here too, as this gateway's load
        reports said within SHARED_WINDOW_S: its requests then go at once, never held
        at the gateway behind its own call in flight (`gateway.serving.coalescer`),
        where the others' requests reaching the backend meanwhile would go first."""
        return now_s - self.others_seen_s < SHARED_WINDOW_S

    def shared_outside_group(self, now_s: float) -> bool:
        """Whether gateways other than this one's process group (`switchyard serve
        --processes N`) send here too, as its load reports said within SHARED_WINDOW_S;
        `shared` where the reports do not tell the group's processes apart (no group,
        or a worker that knows none). The group's processes split one gateway's traffic
        by connection: each holds a request behind its own call in flight and merges
        what waits (`gateway.serving.coalescer`), as the one process would, rather than
        send every request at once as it must where other gateways' requests would
        take the backend's queue meanwhile."""
        return now_s - self.foreign_seen_s < SHARED_WINDOW_S

    def expire_report(self, now_s: float) -> None:
        """The other gateways' tickets leave the queue if their time is up (see
        `record_report`)."""
        if now_s >= self.report_until_s:
            self._drop_others(now_s)

    def _drop_others(self, now_s: float) -> None:
        """The standing report's tickets leave the queue; this gateway's own waiting
        tickets take the slots they held."""
        self.report_until_s = math.inf
        if not self.others:
            return
        self.in_flight -= sum(t.count for t in self.others)
        self.others = []
        self.serving = [t for t in self.serving if t.attempt is not OTHERS]
        head = self._head
        kept = [
            (t, due)
            for t, due in zip(self._waiting[head:], self._waiting_due[head:], strict=True)
            if t is not None and t.attempt is not OTHERS
        ]
        self._waiting = [t for t, _ in kept]
        self._waiting_due = [due for _, due in kept]
        self._head = 0
        while self._waiting and len(self.serving) < self.slots:
            ticket = self._waiting.pop(0)
            del self._waiting_due[0]
            assert ticket is not None
            ticket.started_s = now_s
            ticket.timed = False
            self.serving.append(ticket)
        self._changed()

    @property
    def queued(self) -> int:
        """Requests in flight that wait for a slot."""
        return len(self._waiting) - self._head

    def latest_due_s(self, now_s: float) -> float:
        """When the latest-due of the requests waiting here in this gateway's view is due
        (`now_s` where none waits, or none gives a due time): the due time of a request
        that is to go after every one of them (a latency probe of a busy backend)."""
        latest = now_s
        for due in reversed(self._waiting_due[self._head :]):
            if due < math.inf:
                latest = max(latest, due)
                break
        return latest

    def due_before(self, due_s: float) -> tuple[int, float]:
        """How many waiting requests are due by `due_s`, and the work (ms) they are
        expected to take: what is ahead of a request due then."""
        if self._stale:
            self._derive()
        k = bisect_right(self._waiting_due, due_s, self._head) - self._head
        return k, self._prefix_ms[k]

    def finish(self, ticket: Ticket, now_s: float) -> Ticket | None:
        """`ticket`'s request answered (or given up) at `now_s`; returns the waiting
        request that takes its slot, if any."""
        self._changed()
        if ticket.started_s is None:
            # Answered while it was modelled waiting (it travelled in a merged call).
            waiting = self._waiting
            at = bisect_left(self._waiting_due, ticket.due_s, self._head)
            while at < len(waiting) and waiting[at] is not ticket:
                at += 1
            if at == len(waiting):
                return None  # already gone (the backend's state was cleared)
            del waiting[at]
            del self._waiting_due[at]
            self.in_flight -= 1
            return None
        try:
            self.serving.remove(ticket)
        except ValueError:
            return None  # already gone (the backend's state was cleared)
        self.in_flight -= 1
        head = self._head
        if head == len(self._waiting) or len(self.serving) >= self.slots:
            return None
        nxt = self._waiting[head]
        assert nxt is not None
        self._waiting[head] = None
        head += 1
        if head > 32 and head * 2 > len(self._waiting):
            del self._waiting[:head]
            del self._waiting_due[:head]
            head = 0
        self._head = head
        nxt.started_s = now_s
        nxt.timed = not self.others
        self.serving.append(nxt)
        return nxt

    def clear(self) -> list[Ticket]:
        """Every request in flight is lost (the backend died): returns this gateway's
        (the standing load report is forgotten)."""
        lost = self.serving + [t for t in self._waiting[self._head :] if t is not None]
        self.serving, self._waiting, self._waiting_due, self._head = [], [], [], 0
        self.in_flight = 0
        self.others, self.report_until_s, self.report_seq, self.report_at_s = [], math.inf, -1, None
        self.others_seen_s, self.others_rate, self.report_work_ms = -math.inf, 0.0, 0.0
        self.foreign_seen_s, self.probes_rate, self.report_probes = -math.inf, 0.0, None
        self._changed()
        return [t for t in lost if t.attempt is not OTHERS]

    def tighter_load(self, budget_ms: float, now_s: float) -> float:
        """The share of this backend's slots that the work of classes with SLAs
        tighter than `budget_ms` takes now (their decayed rate of work)."""
        if self._stale:
            self._derive()
        share = self._tighter.get(budget_ms)
        if share is None:
            share = self._tighter_share(budget_ms)
        at_s = self._rates_at_s
        return share * exp((at_s - now_s) * _PER_TAU) if now_s > at_s else share

    def wait_ms(
        self, mean_ms: float, service_ms: float, sla_ms: float, percentile: float, now_s: float
    ) -> float:
        """The router's predicted queue wait (see `gateway.routing.router.queue_wait_ms`) of one
        more request on this backend while all its slots are busy, due in `sla_ms`,
        whose route's service time is `service_ms` at `percentile` and `mean_ms` on
        average. Runs for every busy route of every request: what it derives from the
        queue is kept until the queue changes."""
        if now_s >= self.report_until_s:
            self._drop_others(now_s)  # other gateways' load as reported is done by now
            if self.in_flight < self.slots:
                return 0.0
        derived = self._by_budget.get(sla_ms)
        if derived is None or derived[0] != percentile:
            derived = self._derive_budget(sla_ms, percentile)
        _, end, share, inflation, rates_at_s, dues, prefix, head, slots = derived
        # Waiting requests due before this one: their work is ahead of it.
        k = bisect_right(dues, now_s + sla_ms * 0.001, head) - head if len(prefix) > 1 else 0
        wait = prefix[k] / slots
        end -= now_s * 1000.0  # until the first slot frees
        if end > 0.0:
            wait += end
        if service_ms > mean_ms:
            wait += (service_ms - mean_ms) * sqrt((k + 1) / slots)
        if share > 0.0:
            if now_s > rates_at_s:  # the share decays from when it was last derived
                rho = share * exp((rates_at_s - now_s) * _PER_TAU)
                if rho < TIGHTER_LOAD_CAP:
                    free = 1.0 - rho
                    return wait / (free * free)
                return wait * CAPPED_INFLATION
            return wait * inflation
        return wait

    def _changed(self) -> None:
        """The queue changed: what was derived from it is derived again when next read."""
        self._stale = True
        self._by_budget.clear()

    def _derive(self) -> None:
        self._stale = False
        prefix = [0.0]
        total = 0.0
        for ticket in self._waiting[self._head :]:
            assert ticket is not None
            total += ticket.expected_ms
            prefix.append(total)
        self._prefix_ms = prefix
        self._first_end_ms = {}
        self._tighter = {}
        self._rates_at_s = max((at_s for _, at_s in self.work_rates.values()), default=0.0)

    def _first_end(self, percentile: float) -> float:
        """When (ms on the clock) the first of the N requests in service ends, at
        `percentile` (at least p99): each read at its route's quantile at level
        1 - (1 - p)^(1/N), from its start."""
        level = first_of_n_level(percentile, len(self.serving))
        end = math.inf
        for ticket in self.serving:
            route = ticket.route
            service = route.estimate.quantile_ms(level) if route is not None else ticket.expected_ms
            started = ticket.started_s if ticket.started_s is not None else 0.0
            end = min(end, started * 1000.0 + service)
        self._first_end_ms[percentile] = end
        return end

    def _derive_budget(self, sla_ms: float, percentile: float) -> _Derived:
        if self._stale:
            self._derive()
        end = self._first_end_ms.get(percentile)
        if end is None:
            end = self._first_end(percentile)
        share = self._tighter.get(sla_ms)
        if share is None:
            share = self._tighter_share(sla_ms)
        inflation = 1.0 / (1.0 - share) ** 2 if share < TIGHTER_LOAD_CAP else CAPPED_INFLATION
        derived = self._by_budget[sla_ms] = (
            percentile,
            end,
            share,
            inflation,
            self._rates_at_s,
            self._waiting_due,
            self._prefix_ms,
            self._head,
            self.slots,
        )
        return derived

    def _tighter_share(self, budget_ms: float) -> float:
        at_s = self._rates_at_s
        total = 0.0
        for budget, (rate, rate_at_s) in self.work_rates.items():
            if budget < budget_ms:
                total += rate * exp((rate_at_s - at_s) * _PER_TAU)
        share = total / (1000.0 * self.slots)
        self._tighter[budget_ms] = share
        return share

    def refresh(self) -> None:
        self.available = self.healthy and not self.drained and self.ejected_until_s is None

    @property
    def status(self) -> str:
        if not self.healthy:
            return "unhealthy"
        if self.drained:
            return "drained"
        if self.ejected_until_s is not None:
            return "ejected"
        return "ready"


class Route:
    """A (backend, variant) pair that can serve a model, with its live estimates.

    `state` is the backend's shared state (price, health, in-flight); the
    estimates are the route's own. `observed` tracks end-to-end latency as the
    gateway saw it (for SREs); `estimate` the service time the router predicts with.
    """

    __slots__ = (
        "backend",
        "deadlines",
        "default",
        "estimate",
        "failures",
        "model",
        "observed",
        "recent",
        "recent_at_s",
        "requests",
        "row_fraction",
        "state",
        "variant",
    )

    def __init__(self, state: BackendState, model: str, variant: str, default: bool) -> None:
        self.backend = state.name
        self.model = model
        self.variant = variant
        self.default = default
        """The variant the backend serves when a request names none."""
        self.state = state
        self.estimate = LatencyEstimate(DEFAULT_SERVICE_MS)
        self.observed = LatencyEstimate(DEFAULT_SERVICE_MS)
        self.deadlines = False
        """The backend takes `switchyard_due_us` (see ModelInfo.deadlines)."""
        self.row_fraction = DEFAULT_ROW_FRACTION
        """What each extra row of a batch adds to a request's service time, as a
        fraction of one row's (from the backend's profile of this variant)."""
        self.requests = 0
        self.failures = 0
        self.recent = 0.0
        """Attempts, decayed with SHARE_WINDOW_S (the traffic share SREs see)."""
        self.recent_at_s = 0.0

    def count(self, now_s: float) -> None:
        """One more attempt on this route at `now_s`."""
        self.requests += 1
        self.recent = self.recent_requests(now_s) + 1.0
        self.recent_at_s = now_s

    def recent_requests(self, now_s: float) -> float:
        """Attempts over about the last SHARE_WINDOW_S seconds (exponentially decayed)."""
        if self.recent == 0.0:
            return 0.0
        return self.recent * math.exp(-max(0.0, now_s - self.recent_at_s) / SHARE_WINDOW_S)

    @property
    def address(self) -> str:
        return self.state.address

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.backend, self.model, self.variant)

    def __repr__(self) -> str:
        return f"Route({self.backend}/{self.model}/{self.variant})"


@dataclass(frozen=True, slots=True)
class Ejection:
    """Passive outlier detection settings (after Envoy's): only failures that originate
    at the backend count (errors it returned, attempts that ran past their timeout),
    never a caller's cancellation, a caller's expired deadline or a hedge that lost."""

    after_failures: int = 3
    """Consecutive failed attempts that eject a backend."""
    base_s: float = 1.0
    """First ejection's length; each ejection in a row doubles it."""
    max_s: float = 30.0
    max_share: float = 0.5
    """Most backends out by ejection at once, as a share of the fleet: past it a
    failing backend stays in the routes (the panic threshold), so a fault that is
    not the backends' own (a poisoned request, the gateway's own network) cannot
    empty the fleet. A fleet of one backend never ejects it."""
    success_rate_below: float = 0.8
    """Success-rate ejection: a backend whose attempts over the last `window_s`
    succeeded less often than this (with at least `min_requests` of them) is
    ejected, though its failures were not consecutive; 0: off."""
    window_s: float = 10.0
    min_requests: int = 20


@dataclass(frozen=True, slots=True)
class RetryThrottle:
    """gRPC's retry throttling, per backend: each fault takes a token, each success
    gives back `token_ratio`; retries and hedges go to a backend only while it holds
    more than half of `max_tokens`."""

    max_tokens: float = 10.0
    token_ratio: float = 0.1


class FleetState:
    """All backends, keyed by name, and the routes of each model."""

    def __init__(
        self,
        backends: Iterable[BackendState],
        ejection: Ejection = Ejection(),
        throttle: RetryThrottle = RetryThrottle(),
        load_reports: bool = True,
    ) -> None:
        self.backends = {b.name: b for b in backends}
        self.ejection = ejection
        self.throttle = throttle
        self.load_reports = load_reports
        """Whether backends' load reports count (`BackendState.record_report`), or
        only this gateway's own view of each backend's queue."""
        for state in self.backends.values():
            state.retry_tokens = throttle.max_tokens
        self._routes: dict[str, list[Route]] = {}
        self._by_key: dict[tuple[str, str, str], Route] = {}
        self.warming = False
        """Set while the gateway's routes take their warm-up measurements (the prober
        sets and clears it): the gateway is not ready meanwhile."""
        self.on_ejection: Callable[[BackendState], None] | None = None
        """Told (by the data plane's observer, after `record_attempt`) of each ejection
        this gateway's outlier detection makes and of each clean spell that ends a run
        of them (`ejections` back to 0): the control plane shares them with the other
        gateways over a shared store. None: nobody listens."""

    # ---- updates (prober, pool, supervisor, admin) ----

    def add_backend(self, state: BackendState) -> None:
        """A backend that joins the running fleet (found by discovery): out of the
        routes until a probe finds it ready. ValueError when the name is taken."""
        if state.name in self.backends:
            raise ValueError(f"backend {state.name!r} is already in the fleet")
        state.retry_tokens = self.throttle.max_tokens
        self.backends[state.name] = state
        if state.models:
            self._rebuild()

    def remove_backend(self, backend: str) -> BackendState:
        """Takes a backend out of the fleet and its routes at once: no new requests go
        to it, while those in flight hold their routes and finish."""
        state = self.backends.pop(backend)
        if state.models:
            self._rebuild()
        return state

    def set_address(self, backend: str, address: str) -> None:
        self.backends[backend].address = address

    def record_probe(
        self, backend: str, now_s: float, models: dict[str, ModelInfo], rtt_ms: float | None = None
    ) -> None:
        """A successful probe: the backend is ready with exactly these models. An
        ejected backend whose back-off has passed is re-admitted."""
        state = self.backends[backend]
        changed = state.models != models
        state.expire_report(now_s)
        state.healthy = True
        state.models = dict(models)
        state.last_probe_s = now_s
        state.last_error = ""
        state.consecutive_failures = 0
        if rtt_ms is not None:
            state.network.observe(rtt_ms)
        if state.ejected_until_s is not None and now_s >= state.ejected_until_s:
            state.ejected_until_s = None
            state.attempt_failures = 0
        state.refresh()
        if changed:
            self._rebuild()

    def record_failure(
        self, backend: str, now_s: float, error: str, confirm_after: int = 1
    ) -> None:
        """A failed probe or a refused connection: once `confirm_after` in a row, the
        backend leaves the routes until a probe finds it ready again. A backend no
        longer in the fleet (an attempt that outlived its removal) is passed over."""
        state = self.backends.get(backend)
        if state is None:
            return
        state.last_probe_s = now_s
        state.last_error = error
        state.consecutive_failures += 1
        if state.consecutive_failures >= confirm_after:
            state.healthy = False
        state.refresh()

    def record_attempt(self, route: Route, ok: bool | None, now_s: float, error: str = "") -> bool:
        """An attempt's outcome for passive outlier detection: `ok` True (answered,
        whatever its status, unless the backend failed it), False (a failure that
        originated at the backend), None (no verdict: the caller left, its deadline
        passed, or a hedge won). True when this failure ejected the backend."""
        state = route.state
        route.count(now_s)
        if ok is None:
            return False
        throttle = self.throttle
        window = self.ejection.window_s
        if now_s - state.window_start_s >= window:
            state.window_start_s, state.window_attempts, state.window_failures = now_s, 0, 0
        state.window_attempts += 1
        if ok:
            state.attempt_failures = 0
            if state.ejected_until_s is None:
                state.ejections = 0
            state.retry_tokens = min(throttle.max_tokens, state.retry_tokens + throttle.token_ratio)
            return False
        route.failures += 1
        state.attempt_failures += 1
        state.window_failures += 1
        state.retry_tokens = max(0.0, state.retry_tokens - 1.0)
        if state.ejected_until_s is not None:
            return False
        ejection = self.ejection
        if state.attempt_failures >= ejection.after_failures:
            why = f"{state.attempt_failures} failures in a row"
        elif (
            ejection.success_rate_below > 0.0
            and state.window_attempts >= ejection.min_requests
            and state.window_attempts - state.window_failures
            < ejection.success_rate_below * state.window_attempts
        ):
            why = (
                f"{state.window_failures} of {state.window_attempts} attempts failed"
                f" since {now_s - state.window_start_s:.1f} s ago"
            )
        else:
            return False
        if not self._may_eject():
            state.last_error = f"not ejected ({why}): the most the fleet may eject are out"
            return False
        backoff = min(ejection.max_s, ejection.base_s * 2**state.ejections)
        state.ejections += 1
        state.ejected_until_s = now_s + backoff
        state.window_start_s, state.window_attempts, state.window_failures = now_s, 0, 0
        state.ejection_why = f"{why}: {error}"
        state.last_error = f"ejected for {backoff:g} s after {state.ejection_why}"
        state.refresh()
        return True

    def apply_ejection(
        self, backend: str, count: int, until_s: float | None, now_s: float, detail: str
    ) -> bool:
        """Another gateway's ejection of `backend`, the `count`-th of its run, lasting
        until `until_s` (on this gateway's clock; None: over). The run's count is taken
        here (this gateway's next ejection of the backend backs off from it); an ejection
        not over yet takes the backend out of the routes until `until_s` as one made here
        would (a probe re-admits it after that, not before), or keeps it out until then
        if it was out already for less long, unless one more ejection would pass the
        fleet's maximum share (`detail` says so then, as routes show `last_error`).
        Returns whether the backend left the routes. An unknown backend is passed over."""
        state = self.backends.get(backend)
        if state is None:
            return False
        state.ejections = max(state.ejections, count)
        if until_s is None or until_s <= now_s:
            return False
        if state.ejected_until_s is not None:
            if until_s > state.ejected_until_s:
                state.ejected_until_s = until_s
                state.last_error = detail
            return False
        if not self._may_eject():
            state.last_error = f"not {detail}: the most the fleet may eject are out"
            return False
        state.ejected_until_s = until_s
        state.window_start_s, state.window_attempts, state.window_failures = now_s, 0, 0
        state.last_error = detail
        state.refresh()
        return True

    def _may_eject(self) -> bool:
        """Whether one more ejection keeps within the fleet's maximum ejection share."""
        out = sum(1 for b in self.backends.values() if b.ejected_until_s is not None)
        return out + 1 <= self.ejection.max_share * len(self.backends)

    def may_retry_on(self, state: BackendState) -> bool:
        """gRPC retry throttling: whether a retry or a hedge may go to `state`."""
        return state.retry_tokens > self.throttle.max_tokens * 0.5

    def set_drained(self, backend: str, drained: bool) -> BackendState:
        state = self.backends[backend]
        state.drained = drained
        state.refresh()
        return state

    def set_price(self, backend: str, usd_per_hour: float) -> None:
        self.backends[backend].set_price(usd_per_hour)

    def _rebuild(self) -> None:
        routes: dict[str, list[Route]] = {}
        by_key: dict[tuple[str, str, str], Route] = {}
        for state in self.backends.values():
            for model, info in state.models.items():
                profile = {v: (p50, p99, rows) for v, p50, p99, rows in info.profile}
                for variant in info.all_variants():
                    key = (state.name, model, variant)
                    route = self._by_key.get(key)
                    if route is None or route.state is not state:
                        route = Route(state, model, variant, variant == info.variant)
                        prior = profile.get(variant)
                        if prior is not None:
                            route.estimate.seed(prior[0], prior[1])
                            if prior[2] is not None:
                                route.row_fraction = prior[2]
                    route.default = variant == info.variant
                    route.deadlines = info.deadlines
                    by_key[key] = route
                    routes.setdefault(model, []).append(route)
        self._routes, self._by_key = routes, by_key

    # ---- reads ----

    def routes(self, model: str) -> list[Route]:
        """Every route of `model` (available or not), in configuration order.
        Shared, long-lived objects: do not modify the list."""
        return self._routes.get(model, [])

    def available_routes(self, model: str) -> list[Route]:
        return [r for r in self.routes(model) if r.state.available]

    def all_routes(self) -> list[Route]:
        return list(self._by_key.values())

    def model_info(self, model: str) -> ModelInfo | None:
        """The model's metadata from a healthy backend, else from any backend that had it."""
        fallback = None
        for b in self.backends.values():
            info = b.models.get(model)
            if info is not None:
                if b.healthy:
                    return info
                fallback = fallback or info
        return fallback

    def known_models(self) -> list[str]:
        names: set[str] = set()
        for b in self.backends.values():
            names.update(b.models)
            names.update(b.expected_models)
        return sorted(names)

    def model_ready(self, model: str) -> bool:
        return any(b.available and model in b.models for b in self.backends.values())

    def any_ready(self) -> bool:
        """Whether the gateway may say it is ready: warmed up, and some backend is
        available with models."""
        if self.warming:
            return False
        return any(b.available and b.models for b in self.backends.values())

    def variants(self, model: str) -> list[str]:
        return sorted({r.variant for r in self.routes(model)})
