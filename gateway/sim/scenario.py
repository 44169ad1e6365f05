"""Scenario files: one YAML format for `switchyard simulate` (the router against
modelled backends) and `switchyard load` (open-loop load against a live gateway).

A scenario says which backends exist and how fast and dear they are, the SLA
policies, the traffic (per model and SLA class: a rate and an arrival process),
the events that happen during the run (prices, failures, drains, surges, policy
changes) and the thresholds a run must meet. Validated with pydantic; unknown
keys are errors. Files live under `scenarios/`.

```yaml
scenario: price-spike               # name (reports, file names)
description: the cheap routes' price jumps 10x for 20 s
duration_s: 60
seed: 1                             # arrivals and service times (simulate); arrivals (load)
backends:                           # simulate: the modelled backends; load: names to address
  - name: small-cpu                 # the live fleet's name (gateway/demo_fleet.yaml)
    hardware_class: cpu-x86-64-v4-1c
    price_usd_per_hour: 0.04
    carbon_g_per_kwh: 350           # optional, with power_w: for the carbon objective
    power_w: 20
    slots: 1                        # requests served at once; more wait, earliest deadline first
    network_ms: 0.2                 # round trip gateway <-> backend, added to each attempt
    models:                         # service time per model (and variant), batch 1
      resnet: {p50_ms: 8.0, p99_ms: 14.0}               # one variant (ort-cpu-fp32)
      # resnet: [{variant: a, p50_ms: ..}, {variant: b, ..}]  several; the first is default
policies:                           # as in the fleet file (gateway/config.py PoliciesSettings)
  default: {latency_ms: 100}
  classes: {gold: {latency_ms: 10}}
traffic:
  - {model: resnet, sla_class: gold, rate_per_s: 40, arrivals: poisson}
  # arrivals: poisson | constant | bursts (burst_every_s, burst_for_s, burst_factor)
  #           | trace (trace_file: one arrival time in seconds per line; rate_per_s unused)
  # optional: sla_ms (the request's own SLA), batch_size, start_s, end_s
events:                             # each has at_s and exactly one action
  - {at_s: 20, set_price: {backend: small-cpu, usd_per_hour: 0.4}}
  - {at_s: 25, set_carbon: {backend: small-cpu, g_per_kwh: 120}}   # needs its power_w
  - {at_s: 30, kill: big-cpu}       # in-flight requests fail and are retried elsewhere
  - {at_s: 45, restart: big-cpu}
  - {at_s: 10, drain: gpu}          # takes no new requests; in-flight ones finish
  - {at_s: 50, undrain: gpu}
  - {at_s: 20, multiply_rate: {factor: 5, for_s: 10}}   # optional model / sla_class filter
  - {at_s: 40, set_policy: {default: {latency_ms: 50}}} # replaces the policies whole
feeds:                              # recorded feeds, replayed as set_price (set_carbon) events
  - kind: aws-spot                  # aws-spot | gcp-billing | schedule | electricity-maps
    file: feeds/spot-history.json   # relative to the scenario's folder
    start: 2024-05-01T12:00:00Z     # the recorded time at the scenario's 0 s
    speedup: 60                     # recorded seconds per scenario second
    selectors: [{backends: [gpu], instance_type: g5.xlarge, availability_zone: us-east-1a}]
  # electricity-maps: Electricity Maps answers with a `datetime` each (a JSON list of
  # /v3/carbon-intensity/latest answers, or a /v3/carbon-intensity/history answer);
  # selectors name a `zone`; the backends they cover need power_w
thresholds:
  attainment_min: 0.995             # switchyard, every feasible class
  max_cost_vs_lower_bound: 1.10     # switchyard cost / offline optimum
  min_saving_vs_fastest_only: 0.40  # optional: 1 - switchyard / fastest-only cost
  cheapest_only_must_miss: true     # cheapest-only misses attainment_min in some class
  shares:                           # simulate: a backend's share of the SLA router's answers
    - {backend: small-cpu, sla_class: gold, from_s: 25, to_s: 40, min_share: 0.8}
  live:                             # what `load` checks against the live gateway
    classes: [silver, default]      # held to their SLA (default: all): p99 <= 10 ms means
                                    # 99% of the class's requests OK within 10 ms
    max_error_fraction: 0.001       # 0: not one error (planned maintenance)
    shares:                         # a backend's share of answers in a window
      - {backend: big-cpu, from_s: 22, to_s: 40, max_share: 0.05}
short: {duration_s: 10, rate_scale: 0.5}   # --short: for tests; event times scale too
live:                               # how `load` plays it on a live fleet
  fleet: fleets/three-tier.yaml     # the fleet tests and `make demo` start (default: demo fleet)
  models: {resnet: digits}          # the live model that stands for each scenario model
  rate_scale: 0.6                   # live rates = the scenario's x this
```

With `--short`, the run lasts `short.duration_s`, every rate is multiplied by
`short.rate_scale`, and event times (and surge lengths, burst periods) are
scaled by `short.duration_s / duration_s`, so the same story plays faster.

Imports only pydantic, gateway.config (which reads the YAML) and the feeds' formats
(pure functions of bytes, to replay recorded feeds): no router, no numpy.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal, Protocol, Self, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

from gateway.config import FeedSelector, FeedSettings, PoliciesSettings, validate_yaml
from gateway.control.feeds.formats import (
    CarbonIntensity,
    FeedError,
    evaluate,
    parse,
    parse_carbon_intensity,
    price_changes,
)

R = TypeVar("R", covariant=True)

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ServiceTime(_Strict):
    """A route's service time at batch 1, unloaded: simulate draws from a
    lognormal with this median and 99th percentile."""

    variant: Name = "ort-cpu-fp32"
    p50_ms: float = Field(gt=0)
    p99_ms: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> ServiceTime:
        if self.p99_ms < self.p50_ms:
            raise ValueError(f"p99_ms {self.p99_ms} is below p50_ms {self.p50_ms}")
        return self


class ModelledBackend(_Strict):
    name: Name
    """The backend's name in the live fleet, so `load` can address it."""
    hardware_class: str = "cpu"
    price_usd_per_hour: float = Field(ge=0)
    carbon_g_per_kwh: float | None = Field(None, ge=0)
    """Carbon intensity of its power (gCO2eq/kWh), for the carbon objective; with
    `power_w`, as in the fleet file."""
    power_w: float | None = Field(None, gt=0)
    """Power draw while busy (W), for the carbon objective; `set_carbon` events and
    carbon feeds need it."""
    slots: int = Field(1, ge=1)
    """Requests it serves at once; the rest wait, earliest deadline first (their
    arrival plus their SLA), as the live gateway and its workers queue them."""
    network_ms: float = Field(0.2, ge=0)
    """Round trip between the gateway and the backend, added to every attempt."""
    models: dict[Name, ServiceTime | list[ServiceTime]] = Field(min_length=1)
    """Service time per model; a list gives several variants, the first the default."""

    def variants(self, model: str) -> list[ServiceTime]:
        entry = self.models[model]
        return list(entry) if isinstance(entry, list) else [entry]


class Traffic(_Strict):
    """One stream of requests: a model, an SLA class and an arrival process."""

    model: Name
    sla_class: str | None = None
    sla_ms: float | None = Field(None, gt=0)
    """The request's own SLA (overrides the class's latency)."""
    batch_size: int = Field(1, ge=1)
    rate_per_s: float = Field(0.0, ge=0)
    arrivals: Literal["poisson", "constant", "bursts", "trace"] = "poisson"
    burst_every_s: float = Field(10.0, gt=0)
    """bursts: a burst starts every this many seconds (the first at burst_every_s / 2)."""
    burst_for_s: float = Field(1.0, gt=0)
    burst_factor: float = Field(4.0, gt=0)
    """bursts: the rate during a burst is rate_per_s x this (Poisson within)."""
    trace_file: Path | None = None
    """trace: arrival times in seconds, one per line (relative to the scenario's folder)."""
    start_s: float = Field(0.0, ge=0)
    end_s: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _trace(self) -> Traffic:
        if (self.arrivals == "trace") != (self.trace_file is not None):
            raise ValueError("trace_file is required with arrivals: trace, and only with it")
        return self

    @property
    def class_name(self) -> str:
        """The name attainment is reported under (as the gateway's SLA metrics)."""
        if self.sla_ms is not None:
            return "custom"
        return self.sla_class or "default"


class SetPrice(_Strict):
    backend: Name
    usd_per_hour: float = Field(ge=0)


class SetCarbon(_Strict):
    backend: Name
    g_per_kwh: float = Field(ge=0)
    """The backend's new carbon intensity (gCO2eq/kWh); its power draw stays."""


class MultiplyRate(_Strict):
    factor: float = Field(gt=0)
    for_s: float = Field(gt=0)
    model: str | None = None
    """Only this model's streams (default: all)."""
    sla_class: str | None = None
    """Only this class's streams (default: all)."""


class EventTarget(Protocol[R]):
    """What a scenario's events act on: the simulator's modelled fleet, the lower
    bound's segments, a live gateway's admin API. `Event.apply` calls the one method
    its action names; a surge (`multiply_rate`) is already in the arrivals."""

    def set_price(self, backend: str, usd_per_hour: float) -> R: ...

    def set_carbon(self, backend: str, g_per_kwh: float) -> R: ...

    def kill(self, backend: str) -> R: ...

    def restart(self, backend: str) -> R: ...

    def drain(self, backend: str, drained: bool) -> R: ...

    def set_policy(self, policies: PoliciesSettings) -> R: ...

    def multiply_rate(self, surge: MultiplyRate) -> R: ...


class _EventBase(_Strict):
    at_s: float = Field(ge=0)

    @property
    def backend(self) -> str | None:
        """The backend it acts on, if any."""
        return None

    def scaled(self, scale: float) -> Self:
        """The event in a run `scale` times as long (the short form)."""
        return self.model_copy(update={"at_s": self.at_s * scale})


class SetPriceEvent(_EventBase):
    set_price: SetPrice

    @property
    def backend(self) -> str:
        return self.set_price.backend

    def apply(self, target: EventTarget[R]) -> R:
        return target.set_price(self.set_price.backend, self.set_price.usd_per_hour)


class SetCarbonEvent(_EventBase):
    set_carbon: SetCarbon

    @property
    def backend(self) -> str:
        return self.set_carbon.backend

    def apply(self, target: EventTarget[R]) -> R:
        return target.set_carbon(self.set_carbon.backend, self.set_carbon.g_per_kwh)


class KillEvent(_EventBase):
    kill: Name

    @property
    def backend(self) -> str:
        return self.kill

    def apply(self, target: EventTarget[R]) -> R:
        return target.kill(self.kill)


class RestartEvent(_EventBase):
    restart: Name

    @property
    def backend(self) -> str:
        return self.restart

    def apply(self, target: EventTarget[R]) -> R:
        return target.restart(self.restart)


class DrainEvent(_EventBase):
    drain: Name

    @property
    def backend(self) -> str:
        return self.drain

    def apply(self, target: EventTarget[R]) -> R:
        return target.drain(self.drain, True)


class UndrainEvent(_EventBase):
    undrain: Name

    @property
    def backend(self) -> str:
        return self.undrain

    def apply(self, target: EventTarget[R]) -> R:
        return target.drain(self.undrain, False)


class MultiplyRateEvent(_EventBase):
    multiply_rate: MultiplyRate

    def apply(self, target: EventTarget[R]) -> R:
        return target.multiply_rate(self.multiply_rate)

    def scaled(self, scale: float) -> Self:
        surge = self.multiply_rate
        return self.model_copy(
            update={
                "at_s": self.at_s * scale,
                "multiply_rate": surge.model_copy(update={"for_s": surge.for_s * scale}),
            }
        )


class SetPolicyEvent(_EventBase):
    set_policy: PoliciesSettings

    def apply(self, target: EventTarget[R]) -> R:
        return target.set_policy(self.set_policy)


_EVENTS: dict[str, type[_EventBase]] = {
    "set_price": SetPriceEvent,
    "kill": KillEvent,
    "restart": RestartEvent,
    "drain": DrainEvent,
    "undrain": UndrainEvent,
    "multiply_rate": MultiplyRateEvent,
    "set_policy": SetPolicyEvent,
    "set_carbon": SetCarbonEvent,
}
ACTIONS = tuple(_EVENTS)


def _action(value: object) -> str | None:
    """Which action an event (a mapping from YAML, or an event) names: the one key of
    ACTIONS it has; None when it has none or several (pydantic then says so)."""
    if isinstance(value, _EventBase):
        return next(k for k, cls in _EVENTS.items() if isinstance(value, cls))
    if not isinstance(value, dict):
        return None
    named = [k for k in ACTIONS if k in value]
    return named[0] if len(named) == 1 else None


Event = Annotated[
    Annotated[SetPriceEvent, Tag("set_price")]
    | Annotated[SetCarbonEvent, Tag("set_carbon")]
    | Annotated[KillEvent, Tag("kill")]
    | Annotated[RestartEvent, Tag("restart")]
    | Annotated[DrainEvent, Tag("drain")]
    | Annotated[UndrainEvent, Tag("undrain")]
    | Annotated[MultiplyRateEvent, Tag("multiply_rate")]
    | Annotated[SetPolicyEvent, Tag("set_policy")],
    Discriminator(
        _action,
        custom_error_type="event_action",
        custom_error_message=f"an event has at_s and exactly one of {', '.join(ACTIONS)}",
    ),
]
"""A scenario event: at `at_s`, exactly one action (its key names it)."""


def action_of(event: Event) -> str:
    """The event's action: the key that names it in the scenario file."""
    action = _action(event)
    assert action is not None
    return action


class ShareCheck(_Strict):
    """A backend's share of the answers in a window of a run (scenario seconds, scaled
    with the short form): e.g. that traffic left a backend while its price spiked."""

    backend: Name
    sla_class: str | None = None
    """Only the answers to this class's requests (the class attainment is reported
    under: `default` for requests naming none); default: every answer."""
    from_s: float = Field(ge=0)
    to_s: float = Field(gt=0)
    min_share: float | None = Field(None, ge=0, le=1)
    max_share: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _window(self) -> ShareCheck:
        if self.to_s <= self.from_s:
            raise ValueError(f"share check on {self.backend}: to_s must be after from_s")
        if self.min_share is None and self.max_share is None:
            raise ValueError(f"share check on {self.backend}: give min_share or max_share")
        return self

    def scaled(self, scale: float) -> ShareCheck:
        """The check in a run `scale` times as long (the short form)."""
        return self.model_copy(update={"from_s": self.from_s * scale, "to_s": self.to_s * scale})


class LiveThresholds(_Strict):
    """What `switchyard load` checks against a live gateway."""

    classes: list[str] | None = None
    """The classes held to their SLA (default: every class in the traffic): each must
    have at least its policy's percentile of requests answered OK within its latency
    (errors and lost requests count as misses)."""
    max_error_fraction: float | None = Field(None, ge=0, le=1)
    """Errors (any non-OK status) over requests sent; 0 for planned maintenance."""
    shares: list[ShareCheck] = []


class Live(_Strict):
    """How `switchyard load` plays the scenario against a live gateway."""

    fleet: Path | None = None
    """The fleet file the gateway under test runs, relative to this file (tests and
    `make demo` start it); None: the embedded demo fleet."""
    models: dict[Name, Name] = {}
    """Scenario model -> the live fleet's model that stands for it."""
    rate_scale: float = Field(1.0, gt=0)
    """Live rates are the scenario's times this."""


class Thresholds(_Strict):
    attainment_min: float = Field(0.995, ge=0, le=1)
    """Switchyard's SLA attainment in every feasible class."""
    max_cost_vs_lower_bound: float | None = Field(None, ge=1)
    """Switchyard's cost per inference over the offline optimum's."""
    min_saving_vs_fastest_only: float | None = Field(None, lt=1)
    """1 - Switchyard's cost / fastest-only's cost."""
    cheapest_only_must_miss: bool = False
    """The cheapest-only baseline must miss attainment_min in some feasible class."""
    shares: list[ShareCheck] = []
    """A backend's share of the SLA router's answers in a window of the simulated run
    (e.g. that a carbon-objective class moved when carbon intensity changed)."""
    live: LiveThresholds = LiveThresholds()


class Short(_Strict):
    duration_s: float = Field(gt=0)
    rate_scale: float = Field(1.0, gt=0)


class FeedReplay(_Strict):
    """A recorded price or carbon feed (one answer of the fleet file's feed formats, e.g.
    a spot price history) replayed on the scenario's timeline: each change of a covered
    backend's price becomes a `set_price` event, of its carbon intensity a `set_carbon`
    event, the figures in force at `start` at 0 s."""

    kind: Literal["aws-spot", "gcp-billing", "schedule", "electricity-maps"]
    file: Path
    """The recorded answer, relative to the scenario's folder. electricity-maps: readings
    with their `datetime`, as a JSON list of `/v3/carbon-intensity/latest` answers or
    a `/v3/carbon-intensity/history` answer (`{"zone", "history": [...]}`, or a list of
    such answers, one per zone)."""
    start: datetime | float
    """The recorded time at the scenario's 0 s: ISO 8601 (no zone: UTC), or seconds since
    the epoch."""
    speedup: float = Field(1.0, gt=0)
    """Recorded seconds per scenario second (60: an hour of history in a minute)."""
    selectors: list[FeedSelector] = Field(min_length=1)
    """As in the fleet file's feeds; they cover the scenario's backends."""

    @model_validator(mode="after")
    def _selectors_fit_the_kind(self) -> FeedReplay:
        try:
            FeedSettings(name="replay", kind=self.kind, file=self.file, selectors=self.selectors)
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"]) from exc
        return self

    @property
    def start_s(self) -> float:
        if isinstance(self.start, datetime):
            start = self.start if self.start.tzinfo else self.start.replace(tzinfo=UTC)
            return start.timestamp()
        return self.start

    def events(
        self, backends: list[ModelledBackend], duration_s: float
    ) -> list[SetPriceEvent] | list[SetCarbonEvent]:
        """The feed's price (or carbon intensity) changes as events; ScenarioError
        saying why when the file cannot be read or covers no backend, or a carbon
        feed covers one with no power_w."""
        targets: dict[str, list[FeedSelector]] = {}
        for index, selector in enumerate(self.selectors):
            covered = [b for b in backends if selector.covers(b.name, b.hardware_class)]
            if not covered:
                raise ScenarioError(f"feed {self.file} selector {index} covers no backend")
            for backend in covered:
                if self.kind == "electricity-maps" and backend.power_w is None:
                    raise ScenarioError(
                        f"carbon feed {self.file} covers {backend.name}, which has no "
                        "power_w (carbon intensity alone gives no carbon per request)"
                    )
                targets.setdefault(backend.name, []).append(selector)
        start_s = self.start_s
        until_s = start_s + duration_s * self.speedup
        try:
            data = self.file.read_bytes()
            if self.kind == "electricity-maps":
                return [
                    SetCarbonEvent(
                        at_s=(moment - start_s) / self.speedup,
                        set_carbon=SetCarbon(backend=backend, g_per_kwh=g_per_kwh),
                    )
                    for moment, backend, g_per_kwh in carbon_changes(
                        recorded_carbon(data), targets, start_s, until_s
                    )
                ]
            readings = parse(self.kind, [data])
        except OSError as exc:
            raise ScenarioError(f"cannot read recorded feed {self.file}: {exc}") from exc
        except FeedError as exc:
            raise ScenarioError(f"recorded feed {self.file}: {exc}") from exc
        return [
            SetPriceEvent(
                at_s=(moment - start_s) / self.speedup,
                set_price=SetPrice(backend=backend, usd_per_hour=usd_per_hour),
            )
            for moment, backend, usd_per_hour in price_changes(
                self.kind, readings, targets, start_s, until_s
            )
        ]


def recorded_carbon(data: bytes) -> list[CarbonIntensity]:
    """A recorded Electricity Maps feed's readings, each with its time: a JSON list of
    `/v3/carbon-intensity/latest` answers, or `/v3/carbon-intensity/history` answers
    (`{"zone", "history": [{"carbonIntensity", "datetime", ...}]}`, alone or in a
    list); FeedError when a reading has no `datetime` (it cannot be placed in time)."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        document = None  # the feed's parser says what is wrong
    answers = document if isinstance(document, list) else [document]
    if document is not None and any(isinstance(a, dict) and "history" in a for a in answers):
        flat: list[object] = []
        for index, answer in enumerate(answers):
            history = answer.get("history") if isinstance(answer, dict) else None
            if not isinstance(history, list):
                raise FeedError(f"answer {index}: history missing or not a list")
            zone = answer.get("zone") if isinstance(answer, dict) else None
            flat += [
                {"zone": zone, **entry} if isinstance(entry, dict) and zone else entry
                for entry in history
            ]
        data = json.dumps(flat).encode()
    readings = parse_carbon_intensity(data)
    for reading in readings:
        if reading.at_s is None:
            raise FeedError(f"a reading of {reading.zone} has no datetime, so no place in time")
    return readings


def carbon_changes(
    readings: list[CarbonIntensity],
    targets: dict[str, list[FeedSelector]],
    start_s: float,
    until_s: float,
) -> list[tuple[float, str, float]]:
    """A recorded carbon feed as a timeline: (time, backend, gCO2eq/kWh) each time a
    covered backend's intensity changes from `start_s` to `until_s` (seconds since the
    epoch), those in force at `start_s` first; per zone, the latest reading at or
    before a time is in force (a zone with none yet gives its backends none)."""
    times = sorted(
        {start_s} | {r.at_s for r in readings if r.at_s is not None and start_s < r.at_s <= until_s}
    )
    last: dict[str, float] = {}
    changes = []
    for moment in times:
        in_force: dict[str, CarbonIntensity] = {}
        for reading in readings:
            at_s = reading.at_s if reading.at_s is not None else -math.inf
            best = in_force.get(reading.zone)
            if at_s <= moment and (best is None or at_s >= (best.at_s or -math.inf)):
                in_force[reading.zone] = reading
        values = evaluate("electricity-maps", list(in_force.values()), targets, moment).values
        for backend, value in sorted(values.items()):
            if last.get(backend) != value:
                changes.append((moment, backend, value))
                last[backend] = value
    return changes


class Scenario(_Strict):
    scenario: Name
    description: str = ""
    duration_s: float = Field(gt=0)
    seed: int = 0
    backends: list[ModelledBackend] = Field(min_length=1)
    policies: PoliciesSettings = PoliciesSettings()
    traffic: list[Traffic] = Field(min_length=1)
    events: list[Event] = []
    feeds: list[FeedReplay] = []
    """Recorded price and carbon feeds, replayed as `set_price` and `set_carbon` events
    (added to `events` when the file is loaded)."""
    thresholds: Thresholds = Thresholds()
    short: Short | None = None
    live: Live = Live()

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        names = [b.name for b in self.backends]
        if len(set(names)) != len(names):
            raise ValueError(f"backend names must be unique: {names}")
        served = {m for b in self.backends for m in b.models}
        for event in self.events:
            if event.backend is not None and event.backend not in names:
                raise ValueError(f"event at {event.at_s:g} s: unknown backend {event.backend!r}")
            if event.at_s > self.duration_s:
                raise ValueError(f"event at {event.at_s:g} s is after the end ({self.duration_s})")
            if (
                isinstance(event, SetCarbonEvent)
                and self.backend_named(event.backend).power_w is None
            ):
                raise ValueError(
                    f"set_carbon at {event.at_s:g} s: backend {event.backend!r} has no power_w "
                    "(carbon intensity alone gives no carbon per request)"
                )
        classes = {t.class_name for t in self.traffic}
        for share in self.thresholds.shares + self.thresholds.live.shares:
            if share.backend not in names:
                raise ValueError(f"share check on unknown backend {share.backend!r}")
            if share.sla_class is not None and share.sla_class not in classes:
                raise ValueError(
                    f"share check on {share.backend}: no traffic of class {share.sla_class!r} "
                    f"(classes: {', '.join(sorted(classes))})"
                )
        for stream in self.traffic:
            if stream.model not in served:
                raise ValueError(f"traffic for {stream.model!r}, which no backend serves")
            if stream.sla_class is not None and stream.sla_class not in self.policies.classes:
                raise ValueError(f"traffic for unknown sla_class {stream.sla_class!r}")
        return self

    def backend_named(self, name: str) -> ModelledBackend:
        return next(b for b in self.backends if b.name == name)

    def shortened(self) -> Scenario:
        """The short form (`--short`): shorter, optionally lighter, same story."""
        if self.short is None:
            return self
        scale = self.short.duration_s / self.duration_s
        rate = self.short.rate_scale
        traffic = [
            t.model_copy(
                update={
                    "rate_per_s": t.rate_per_s * rate,
                    "burst_every_s": t.burst_every_s * scale,
                    "burst_for_s": t.burst_for_s * scale,
                    "start_s": t.start_s * scale,
                    "end_s": None if t.end_s is None else t.end_s * scale,
                }
            )
            for t in self.traffic
        ]
        events = [e.scaled(scale) for e in self.events]
        live = self.thresholds.live
        shares = [c.scaled(scale) for c in live.shares]
        thresholds = self.thresholds.model_copy(
            update={
                "live": live.model_copy(update={"shares": shares}),
                "shares": [c.scaled(scale) for c in self.thresholds.shares],
            }
        )
        return self.model_copy(
            update={
                "duration_s": self.short.duration_s,
                "traffic": traffic,
                "events": events,
                "thresholds": thresholds,
                "short": None,
            }
        )


class ScenarioError(Exception):
    """The scenario file cannot be read or is not valid."""


def parse_scenario(text: str, base_dir: Path, source: str = "scenario") -> Scenario:
    scenario = validate_yaml(text, Scenario, ScenarioError, source)
    traffic = [
        t.model_copy(update={"trace_file": base_dir / t.trace_file})
        if t.trace_file is not None and not t.trace_file.is_absolute()
        else t
        for t in scenario.traffic
    ]
    live = scenario.live
    if live.fleet is not None and not live.fleet.is_absolute():
        live = live.model_copy(update={"fleet": base_dir / live.fleet})
    feeds = [
        f if f.file.is_absolute() else f.model_copy(update={"file": base_dir / f.file})
        for f in scenario.feeds
    ]
    events = list(scenario.events)
    for feed in feeds:
        events += feed.events(scenario.backends, scenario.duration_s)
    return scenario.model_copy(
        update={"traffic": traffic, "live": live, "feeds": feeds, "events": events}
    )


def load_scenario(path: Path) -> Scenario:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc}") from exc
    return parse_scenario(text, path.resolve().parent, str(path))
