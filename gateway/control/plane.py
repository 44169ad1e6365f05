"""The control plane: every change an SRE or a schedule makes to a running
gateway goes through here (prices, carbon figures, policies, drains, routing, killing
and restarting launched workers), from the admin API, the fleet file when it changes
on disk, and price schedules replayed against the clock. Routing reads the
result on the next request.

The admin API's changes are kept in a `StateStore` (gateway.control.state) and
restored at start (`Control.restore`); the fleet file and the price schedule replace
them when they change the same value later (the last change wins). A store shared by
several gateways (gateway.control.shared_state) hands each one the others' changes
(`Control.apply_state`), and carries each gateway's ejections to the others
(`Control.share_ejection`).

Imports no grpc and no generated protobuf: the admin API converts at its edge.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from backends.protocol.errors import InvalidInput, NotFound, Unavailable
from gateway.config import ConfigError, FleetConfig, PoliciesSettings, parse_fleet
from gateway.control.discovery import discovery_group
from gateway.control.state import (
    CarbonFigures,
    ControlState,
    MemoryStateStore,
    PoliciesOverride,
    PriceOverride,
    SharedEjection,
    StateStore,
)
from gateway.control.supervisor import NotSupervised, Supervised, Supervisor
from gateway.routing.fleet import BackendState, FleetState
from gateway.routing.policy import PolicyBook
from gateway.routing.router import ROUTING, Chooser, RouteRequest, chooser_for
from gateway.serving.metrics import GatewayMetrics, SlaTarget

log = logging.getLogger("switchyard.control")


class UnknownBackend(NotFound):
    """The fleet has no backend of that name."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown backend {name!r} (backends: {', '.join(known)})")


@dataclass(frozen=True, slots=True)
class BackendProcess:
    """A backend's state with its worker process, when the gateway launches it."""

    state: BackendState
    worker: Supervised | None
    """None: not launched by the gateway (an external address)."""


@dataclass(frozen=True, slots=True)
class PriceChange:
    offset_s: float
    backend: str
    usd_per_hour: float


def read_price_schedule(path: Path) -> list[PriceChange]:
    """A price schedule: CSV rows `offset_s,backend,usd_per_hour` (a header row is
    allowed), offsets in seconds from the start, in any order."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read price schedule {path}: {exc}") from exc
    changes = []
    for number, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or row[0].strip().startswith("#"):
            continue
        if number == 1 and row[0].strip() == "offset_s":
            continue
        if len(row) != 3:
            raise ConfigError(f"{path}:{number}: expected offset_s,backend,usd_per_hour")
        try:
            offset, price = float(row[0]), float(row[2])
        except ValueError as exc:
            raise ConfigError(f"{path}:{number}: {exc}") from exc
        for name, value in (("offset_s", offset), ("usd_per_hour", price)):
            if not math.isfinite(value):
                raise ConfigError(f"{path}:{number}: {name} must be a finite number, not {value}")
        if offset < 0 or price < 0:
            raise ConfigError(f"{path}:{number}: offset and price must not be negative")
        changes.append(PriceChange(offset, row[1].strip(), price))
    return sorted(changes, key=lambda c: c.offset_s)


def check_price(usd_per_hour: float, field: str = "usd_per_hour") -> None:
    """InvalidInput naming `field` unless the price is a finite, non-negative number."""
    if not math.isfinite(usd_per_hour):
        raise InvalidInput(f"{field} must be a finite number, not {usd_per_hour}")
    if usd_per_hour < 0:
        raise InvalidInput(f"{field} must not be negative (got {usd_per_hour})")


def _same_policies(a: PoliciesSettings, b: PoliciesSettings) -> bool:
    return a.model_dump(exclude_none=True) == b.model_dump(exclude_none=True)


class Control:
    """Applies changes to the fleet and the policies, keeps metrics in step, and keeps
    the admin API's changes in the state store."""

    def __init__(
        self,
        fleet: FleetState,
        metrics: GatewayMetrics,
        policies: Callable[[], PolicyBook],
        set_policies: Callable[[PolicyBook], None],
        *,
        set_chooser: Callable[[Chooser], None],
        config: FleetConfig,
        wall_clock: Callable[[], float],
        store: StateStore | None = None,
        supervisor: Supervisor | None = None,
        probe: Callable[[str], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        gateway_id: str | None = None,
    ) -> None:
        """`set_chooser` installs the servicer's chooser; `config` is the fleet file in
        force; `wall_clock` gives seconds since the epoch (when an admin change was
        made, where the price schedule stands, when a shared ejection ends); `store`
        keeps the admin API's changes (None: in memory only); `supervisor` runs the
        launched workers (None: none are); `probe` health-probes one backend now;
        `clock` is the fleet's clock (monotonic seconds, as its ejections' ends are);
        `gateway_id` names this gateway in the ejections it shares (default:
        host:pid:token)."""
        self.fleet = fleet
        self.metrics = metrics
        self._policies = policies
        self._set_policies = set_policies
        self._set_chooser = set_chooser
        self.config = config
        self._wall_clock = wall_clock
        self.store: StateStore = MemoryStateStore() if store is None else store
        self.state = ControlState()
        """The admin API's changes in force, as last kept in `store`."""
        self.supervisor = supervisor
        self._probe = probe
        self.routing = "switchyard"
        """The name of the chooser in force (one of ROUTING)."""
        self._clock = clock
        self.gateway_id = (
            gateway_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        )
        if self.store.shared:
            fleet.on_ejection = self.share_ejection
        self.publish_sla_targets()

    def sla_targets(self) -> list[SlaTarget]:
        """The SLA target of each model the fleet knows (or the policies name), for the
        default class and each class of the policies in force."""
        book = self._policies()
        models = set(book.settings.models).union(self.fleet.known_models())
        targets = []
        for model in sorted(models):
            for sla_class in (None, *book.settings.classes):
                policy = book.resolve(RouteRequest(model, sla_class=sla_class))
                targets.append((model, policy.name, policy.latency_ms, policy.percentile))
        return targets

    def publish_sla_targets(self) -> None:
        """Puts the SLA targets in the metrics (switchyard_sla_target_*): at start, when
        the policies change, and at each refresh of the fleet's metrics (a model first
        learnt from a probe); nothing to do when they are unchanged."""
        self.metrics.publish_sla_targets(self.sla_targets())

    def backend(self, name: str) -> BackendState:
        state = self.fleet.backends.get(name)
        if state is None:
            raise UnknownBackend(name, sorted(self.fleet.backends))
        return state

    def fleet_price(self, backend: str) -> float | None:
        """The backend's price in the fleet file: its own entry's, or its discovery
        group's; None when the file has neither."""
        for b in self.config.backends:
            if b.name == backend and b.discovery is None:
                return b.price_usd_per_hour
        group = discovery_group(self.config.backends, backend)
        return None if group is None else group.price_usd_per_hour

    def fleet_carbon(self, backend: str) -> tuple[float | None, float | None] | None:
        """The backend's carbon intensity and power draw in the fleet file: its own
        entry's, or its discovery group's; None when the file has neither."""
        for b in self.config.backends:
            if b.name == backend and b.discovery is None:
                return b.carbon_g_per_kwh, b.power_w
        group = discovery_group(self.config.backends, backend)
        return None if group is None else (group.carbon_g_per_kwh, group.power_w)

    def add_backend(self, state: BackendState, source: str) -> bool:
        """A backend that joins the running fleet (found by discovery), out of the
        routes until a probe finds it ready, with the changes in force for its name
        (a price or a drain set through the admin API, on this gateway or, with a
        shared store, another). False when the name is taken (nothing is added)."""
        if state.name in self.fleet.backends:
            return False
        self.fleet.add_backend(state)
        log.info("backend %s at %s added (%s)", state.name, state.address, source)
        override = self.state.prices.get(state.name)
        if override is not None:
            self._apply_price(state.name, override.usd_per_hour, source)
        elif state.name in self.state.scheduled:
            self._apply_price(state.name, self.state.scheduled[state.name], source)
        carbon = self.state.carbon.get(state.name)
        if carbon is not None:
            self._apply_carbon(state.name, carbon.g_per_kwh, carbon.power_w, source)
        self.metrics.price.labels(state.name).set(state.price_usd_per_hour)
        self.metrics.healthy.labels(state.name).set(0)
        if state.name in self.state.drained:
            self._apply_drained(state.name, True)
        else:
            self.metrics.available.labels(state.name).set(0)
        return True

    def remove_backend(self, name: str, source: str) -> BackendState | None:
        """Takes a backend out of the running fleet and its routes at once (gone from
        discovery): no new requests go to it, those in flight finish. What the admin
        API set for it stays in the control state until `forget_backend`. None when
        the fleet has no backend of that name."""
        if name not in self.fleet.backends:
            return None
        state = self.fleet.remove_backend(name)
        log.info("backend %s at %s removed from the routes (%s)", name, state.address, source)
        return state

    def forget_backend(self, name: str, source: str) -> None:
        """Forgets what the admin API (or a schedule, or another gateway's ejection) set
        for `name`, a backend that left for good (gone from discovery and drained), in
        the store too: a backend that later takes its name starts afresh."""
        forgotten = self.state.without_backends(frozenset({name}))
        if forgotten != self.state:
            log.info("backend %s: its admin changes forgotten (%s)", name, source)
            self._keep(forgotten, required=False)

    def _keep(self, state: ControlState, *, required: bool) -> None:
        """Saves `state` in the store and makes it the state in force. `required`: a
        store that cannot save raises Unavailable (the change is not made); otherwise
        the failure is logged and the state is kept in memory."""
        if state == self.state:
            return
        try:
            self.store.save(state)
        except Unavailable as exc:
            if required:
                raise Unavailable(f"{exc}; the change was not made") from exc
            log.error("%s", exc)
        self.state = state

    def _apply_price(self, backend: str, usd_per_hour: float, source: str) -> BackendState:
        state = self.backend(backend)
        if state.price_usd_per_hour != usd_per_hour:
            log.info(
                "price of %s: %.4f -> %.4f USD/h (%s)",
                backend,
                state.price_usd_per_hour,
                usd_per_hour,
                source,
            )
        self.fleet.set_price(backend, usd_per_hour)
        self.metrics.price.labels(backend).set(usd_per_hour)
        return state

    def set_price(
        self, backend: str, usd_per_hour: float, source: str, *, scheduled: bool = False
    ) -> BackendState:
        """A price from the fleet file or (`scheduled`) a price schedule or feed: it
        replaces a price the admin API set for the backend (the last change wins). A
        shared store keeps the schedule's and feeds' prices, for the gateways that do
        not play them."""
        check_price(usd_per_hour)
        state = self._apply_price(backend, usd_per_hour, source)
        kept = self.state.with_price(backend, None)
        if self.store.shared:
            kept = kept.with_scheduled(backend, usd_per_hour if scheduled else None)
        self._keep(kept, required=False)
        return state

    def override_price(self, backend: str, usd_per_hour: float) -> BackendState:
        """A price set through the admin API: kept across restarts until the fleet file
        or the price schedule changes the backend's price."""
        check_price(usd_per_hour)
        self.backend(backend)
        fleet_price = self.fleet_price(backend)
        override = PriceOverride(
            usd_per_hour, usd_per_hour if fleet_price is None else fleet_price, self._wall_clock()
        )
        self._keep(self.state.with_price(backend, override), required=True)
        return self._apply_price(backend, usd_per_hour, "admin API")

    def _apply_carbon(
        self, backend: str, g_per_kwh: float | None, power_w: float | None, source: str
    ) -> BackendState:
        state = self.backend(backend)
        if (state.carbon_g_per_kwh, state.power_w) != (g_per_kwh, power_w):
            log.info(
                "carbon intensity of %s: %s -> %s g/kWh at %s W (%s)",
                backend,
                state.carbon_g_per_kwh,
                g_per_kwh,
                power_w,
                source,
            )
        state.set_carbon(g_per_kwh, power_w)
        return state

    def set_carbon(
        self,
        backend: str,
        g_per_kwh: float | None,
        power_w: float | None,
        source: str,
        *,
        listed: bool = False,
    ) -> BackendState:
        """A backend's carbon intensity (gCO2eq/kWh) and power draw (W), from a carbon
        feed, or (`listed`) the fleet file's figures back in force (an edit of the file,
        a stale feed). A shared store keeps them for the other gateways (the last change
        wins; the fleet file's are kept as none, so each gateway goes back to its own
        file's); a local store keeps none (a feed is polled afresh at start) and forgets
        the admin API's for the backend (the last change wins)."""
        state = self._apply_carbon(backend, g_per_kwh, power_w, source)
        shared = self.store.shared and not listed
        figures = CarbonFigures(g_per_kwh, power_w) if shared else None
        self._keep(self.state.with_carbon(backend, figures), required=False)
        return state

    def override_carbon(
        self, backend: str, g_per_kwh: float | None, power_w: float | None
    ) -> BackendState:
        """Carbon figures set through the admin API: on every gateway sharing the store,
        else kept in the state file across restarts (with the fleet file's figures of
        the time: a file edited since wins at start), until the fleet file or a carbon
        feed changes the backend's figures."""
        self.backend(backend)
        fleet = None if self.store.shared else self.fleet_carbon(backend)
        figures = CarbonFigures(g_per_kwh, power_w, fleet)
        self._keep(self.state.with_carbon(backend, figures), required=True)
        return self._apply_carbon(backend, g_per_kwh, power_w, "admin API")

    def set_drained(self, backend: str, drained: bool) -> BackendState:
        """Drains or undrains a backend (the admin API's), kept across restarts."""
        self.backend(backend)
        self._keep(self.state.with_drained(backend, drained), required=True)
        return self._apply_drained(backend, drained)

    def _apply_drained(self, backend: str, drained: bool) -> BackendState:
        state = self.fleet.set_drained(backend, drained)
        self.metrics.available.labels(backend).set(1 if state.available else 0)
        log.info("backend %s %s", backend, "drained" if drained else "undrained")
        return state

    def share_ejection(self, backend: BackendState) -> None:
        """This gateway's outlier detection ejected `backend`, or saw it answer after a
        run of ejections (a clean spell, `ejections` back to 0). An ejection goes to the
        shared store with its end by the wall clock, its count in the run and why, for
        the other gateways (`apply_state`); a clean spell takes the backend's ejection
        out of the store once it is over, so the next run starts from the base time
        again. Told only with a shared store: a file keeps no ejections."""
        name = backend.name
        wall_s = self._wall_clock()
        if backend.ejections == 0:
            known = self.state.ejections.get(name)
            if known is not None and known.until_s <= wall_s:
                self._keep(self.state.with_ejection(name, None), required=False)
            return
        if backend.ejected_until_s is None:
            return
        until_s = wall_s + backend.ejected_until_s - self._clock()
        ejection = SharedEjection(
            until_s, wall_s, backend.ejections, self.gateway_id, backend.ejection_why
        )
        self._keep(self.state.with_ejection(name, ejection), required=False)

    def _apply_ejections(self, state: ControlState, source: str) -> None:
        """Puts the other gateways' ejections in `state` in force here: each backend's
        count in its run of ejections (this gateway's next ejection backs off from it),
        and each ejection not over yet, the earliest made first, within the fleet's
        maximum ejected share (one past it is not applied: routes say so; it is tried
        again at the next change of the state). This gateway's own are in force
        already."""
        wall_s, now_s = self._wall_clock(), self._clock()
        for name, ejection in sorted(state.ejections.items(), key=lambda item: item[1].at_s):
            if ejection.by == self.gateway_id:
                continue
            left_s = ejection.until_s - wall_s
            until = _utc(ejection.until_s)
            detail = f"ejected until {until} by gateway {ejection.by} after {ejection.why}"
            if self.fleet.apply_ejection(
                name, ejection.count, now_s + left_s if left_s > 0 else None, now_s, detail
            ):
                self.metrics.ejections_shared.labels(name).inc()
                self.metrics.available.labels(name).set(0)
                log.warning(
                    "backend %s ejected until %s by gateway %s (%s): %s",
                    name,
                    until,
                    ejection.by,
                    source,
                    ejection.why,
                )

    def set_routing(self, name: str, source: str) -> str:
        """Puts the chooser called `name` in force for the next request, kept across
        restarts; an unknown name is InvalidInput naming the known ones."""
        try:
            chooser = chooser_for(name)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc
        self._keep(replace(self.state, routing=name), required=True)
        self._apply_routing(name, chooser, source)
        return name

    def _apply_routing(self, name: str, chooser: Chooser, source: str) -> None:
        self._set_chooser(chooser)
        if name != self.routing:
            log.info("routing: %s -> %s (%s)", self.routing, name, source)
        self.routing = name

    def processes(self) -> list[BackendProcess]:
        """Every backend, in fleet order, with its worker when launched."""
        workers = {} if self.supervisor is None else self.supervisor.workers
        return [BackendProcess(s, workers.get(s.name)) for s in self.fleet.backends.values()]

    def process(self, backend: str) -> BackendProcess:
        state = self.backend(backend)
        worker = None if self.supervisor is None else self.supervisor.workers.get(backend)
        return BackendProcess(state, worker)

    def _supervisor(self, backend: str) -> Supervisor:
        self.backend(backend)
        if self.supervisor is None or backend not in self.supervisor.workers:
            raise NotSupervised(
                f"backend {backend!r} has no worker process of this gateway's to kill or "
                "restart: it has no `launch` in the fleet file, or this is one process of "
                "`switchyard serve --processes N`, whose parent holds the workers"
            )
        return self.supervisor

    async def kill(self, backend: str) -> BackendProcess:
        """SIGKILLs a launched backend's worker and holds it down until `restart`.
        Routing learns of it as of a crash (the exit, then a probe at once). A failure
        drill: not kept across a restart of the gateway, which starts every worker."""
        await self._supervisor(backend).kill(backend)
        if self._probe is not None:
            await self._probe(backend)
        return self.process(backend)

    async def restart(self, backend: str) -> BackendProcess:
        """Releases a killed worker: it starts now, on its old port; a probe
        re-admits it once it is ready. A running worker is left alone."""
        await self._supervisor(backend).restart(backend)
        return self.process(backend)

    @property
    def policies(self) -> PolicyBook:
        return self._policies()

    def set_policies(self, settings: PoliciesSettings, source: str) -> None:
        """Policies from the fleet file: they replace those the admin API set."""
        self._apply_policies(settings, source)
        if self.state.policies is not None:
            self._keep(replace(self.state, policies=None), required=False)

    def override_policies(self, settings: PoliciesSettings) -> None:
        """Policies set through the admin API: kept across restarts until the fleet
        file changes its policies."""
        override = PoliciesOverride(settings, self.config.policies)
        self._keep(replace(self.state, policies=override), required=True)
        self._apply_policies(settings, "admin API")

    def _apply_policies(self, settings: PoliciesSettings, source: str) -> None:
        self._set_policies(PolicyBook(settings, self._policies().overhead_ms))
        self.publish_sla_targets()
        log.info("policies replaced (%s)", source)

    def apply_fleet(self, previous: FleetConfig, config: FleetConfig, source: str) -> None:
        """Applies what a fleet file edit changed and can change live: prices, carbon,
        policies (values the edit left alone keep what the admin API or a price
        schedule set since). Other changes (backends, addresses) need a restart."""
        self.config = config
        if {(b.name, b.address, b.discovery) for b in config.backends} != {
            (b.name, b.address, b.discovery) for b in previous.backends
        }:
            log.warning("%s: backends added or removed; restart the gateway to apply", source)
        before = {b.name: b for b in previous.backends}
        for b in config.backends:
            old = before.get(b.name)
            members = [b.name] if b.discovery is None else self._members(b.name)
            for name in members:
                state = self.fleet.backends.get(name)
                if state is None:
                    continue
                if old is None or old.price_usd_per_hour != b.price_usd_per_hour:
                    self.set_price(name, b.price_usd_per_hour, source)
                if old is None or (old.carbon_g_per_kwh, old.power_w) != (
                    b.carbon_g_per_kwh,
                    b.power_w,
                ):
                    self.set_carbon(name, b.carbon_g_per_kwh, b.power_w, source, listed=True)
        if config.policies != previous.policies:
            self.set_policies(config.policies, source)
        if config.feeds != previous.feeds:
            log.warning("%s: feeds changed; restart the gateway to apply", source)

    def _members(self, group: str) -> list[str]:
        """The backends in the fleet now that discovery group `group` found."""
        return [
            name
            for name in self.fleet.backends
            if (found := discovery_group(self.config.backends, name)) is not None
            and found.name == group
        ]

    def apply_state(self, state: ControlState, source: str = "shared state") -> None:
        """Puts `state` in force on the live fleet (from a shared store: the changes of
        every gateway), each value only where it differs from what is in force: each
        backend's price (the admin API's, else the price schedule's, else the fleet
        file's), its carbon figures (the admin API's or a carbon feed's, else the fleet
        file's), its drain, the other gateways' ejections (`_apply_ejections`), the
        policies (the admin API's, else the fleet file's) and the routing rule (the
        default when none). Backends this fleet does not have are passed over. Nothing
        is saved: the state comes from the store."""
        for name, backend in self.fleet.backends.items():
            override = state.prices.get(name)
            if override is not None:
                price = override.usd_per_hour
            else:
                fleet_price = self.fleet_price(name)
                price = state.scheduled.get(
                    name, backend.price_usd_per_hour if fleet_price is None else fleet_price
                )
            if price != backend.price_usd_per_hour:
                self._apply_price(name, price, source)
            figures = state.carbon.get(name)
            carbon = (
                self.fleet_carbon(name) if figures is None else (figures.g_per_kwh, figures.power_w)
            )
            if carbon is not None and carbon != (backend.carbon_g_per_kwh, backend.power_w):
                self._apply_carbon(name, *carbon, source)
            drained = name in state.drained
            if drained != backend.drained:
                self._apply_drained(name, drained)
        self._apply_ejections(state, source)
        if state.policies != self.state.policies:
            policies = self.config.policies if state.policies is None else state.policies.policies
            self._apply_policies(policies, source)
        routing = ROUTING[0] if state.routing is None else state.routing
        if routing != self.routing:
            try:
                self._apply_routing(routing, chooser_for(routing), source)
            except ValueError as exc:
                log.warning("%s: routing %r not applied: %s", source, routing, exc)
        self.state = state

    async def share(self) -> str | None:
        """Waits until the changes made so far are in the store: None once they are
        (at once for a local store), else why not yet (they stay in force here)."""
        return await self.store.flush()

    def restore(self) -> None:
        """Puts back the admin API's changes kept in the store, over the fleet file
        just loaded: prices, policies, drains, the routing rule and carbon figures.
        What no longer applies is dropped with a log line: changes for backends no
        longer in the fleet, a price, carbon figures or policies the fleet file changed
        since they were set (the file's edit is the later change), a routing rule that
        no longer exists."""
        stored = kept = self.store.load()
        where = self.store.where
        # Discovered backends are not in the fleet yet: what was set for them waits
        # for their names in the state (applied by add_backend).
        gone = {
            name
            for name in kept.backends() - set(self.fleet.backends)
            if discovery_group(self.config.backends, name) is None
        }
        if gone:
            log.warning(
                "%s: dropping the changes for backends no longer in the fleet: %s",
                where,
                ", ".join(sorted(gone)),
            )
            kept = kept.without_backends(frozenset(gone))
        for backend, price in sorted(kept.prices.items()):
            fleet_price = self.fleet_price(backend)
            if fleet_price is not None and fleet_price != price.fleet_usd_per_hour:
                log.warning(
                    "%s: the fleet file changed %s's price since the admin API set it "
                    "(%.4f -> %.4f USD/h), so the file's price applies, not %.4f",
                    where,
                    backend,
                    price.fleet_usd_per_hour,
                    fleet_price,
                    price.usd_per_hour,
                )
                kept = kept.with_price(backend, None)
            elif backend in self.fleet.backends:
                self._apply_price(backend, price.usd_per_hour, f"restored from {where}")
        if kept.policies is not None:
            if _same_policies(kept.policies.fleet_policies, self.config.policies):
                self._apply_policies(kept.policies.policies, f"restored from {where}")
            else:
                log.warning(
                    "%s: the fleet file changed its policies since the admin API set "
                    "them, so the file's policies apply",
                    where,
                )
                kept = replace(kept, policies=None)
        for backend in sorted(kept.drained & set(self.fleet.backends)):
            self._apply_drained(backend, True)
        for backend, figures in sorted(kept.carbon.items()):
            in_file = self.fleet_carbon(backend)
            if figures.fleet is not None and in_file is not None and in_file != figures.fleet:
                log.warning(
                    "%s: the fleet file changed %s's carbon figures since the admin API "
                    "set them (%s -> %s g/kWh, %s -> %s W), so the file's apply",
                    where,
                    backend,
                    figures.fleet[0],
                    in_file[0],
                    figures.fleet[1],
                    in_file[1],
                )
                kept = kept.with_carbon(backend, None)
            elif backend in self.fleet.backends:
                self._apply_carbon(
                    backend, figures.g_per_kwh, figures.power_w, f"restored from {where}"
                )
        self._apply_ejections(kept, f"restored from {where}")
        if kept.routing is not None:
            try:
                self._apply_routing(
                    kept.routing, chooser_for(kept.routing), f"restored from {where}"
                )
            except ValueError as exc:
                log.warning("%s: routing %r dropped: %s", where, kept.routing, exc)
                kept = replace(kept, routing=None)
        if self.config.gateway.price_schedule is None and kept.schedule_start_s is not None:
            kept = replace(kept, schedule_start_s=None)
        # What was dropped goes from the store too; nothing is written when nothing
        # was dropped.
        self.state = stored
        self._keep(kept, required=False)

    def schedule_elapsed_s(self) -> float:
        """Seconds since the price schedule's offset 0, by the wall clock: the start is
        kept in the store, so a restarted gateway resumes the schedule where the clock
        says it is. The first call of a fresh schedule (or one whose kept start lies in
        the future) starts it now."""
        now = self._wall_clock()
        start = self.state.schedule_start_s
        if start is not None and start <= now:
            return now - start
        if start is not None:
            log.warning(
                "price schedule: its kept start is %.0f s in the future (the clock went "
                "back?); starting it again now",
                start - now,
            )
        self._keep(replace(self.state, schedule_start_s=now), required=False)
        return 0.0

    def resume_prices(self, position: SchedulePosition) -> None:
        """Applies the price each backend has at `position` in the schedule, unless the
        admin API set the backend's price after that step came due."""
        now = self._wall_clock()
        for backend, (change, ago_s) in sorted(position.in_force.items()):
            override = self.state.prices.get(backend)
            if override is not None and override.set_at_s > now - ago_s:
                log.info(
                    "price schedule: %s keeps the price the admin API set after the "
                    "schedule's step at %.1f s",
                    backend,
                    change.offset_s,
                )
                continue
            try:
                self.set_price(backend, change.usd_per_hour, "price schedule", scheduled=True)
            except UnknownBackend as exc:
                log.error("price schedule: %s", exc)


def _utc(epoch_s: float) -> str:
    """A wall-clock time as routes show it (UTC, to the millisecond)."""
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class SchedulePosition:
    """Where a price schedule stands at some time after its start."""

    pass_elapsed_s: float
    """Seconds since the current pass began (the schedule's start, or its last loop)."""
    due: int
    """How many of the schedule's changes have come due in the current pass."""
    in_force: dict[str, tuple[PriceChange, float]]
    """Per backend, the change whose price holds now and how many seconds ago it came
    due (from an earlier pass when none has yet in this one)."""


def schedule_position(
    schedule: list[PriceChange], elapsed_s: float, loop_schedule: bool
) -> SchedulePosition:
    """Where `schedule` (sorted by offset) stands `elapsed_s` after its start; with
    `loop_schedule`, each pass lasts its last offset and the next begins then."""
    period = schedule[-1].offset_s if schedule else 0.0
    passes = 0
    within = elapsed_s
    if loop_schedule and period > 0 and elapsed_s >= period:
        passes = int(elapsed_s // period)
        within = elapsed_s - passes * period
    in_force: dict[str, tuple[PriceChange, float]] = {}
    if passes:
        for change in schedule:
            in_force[change.backend] = (change, within + period - change.offset_s)
    due = 0
    for change in schedule:
        if change.offset_s > within:
            break
        in_force[change.backend] = (change, within - change.offset_s)
        due += 1
    return SchedulePosition(within, due, in_force)


def file_stamp(path: Path) -> tuple[int, int] | None:
    """What tells a file changed: its modification time and size."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def _read_fleet(path: Path) -> tuple[bytes, FleetConfig | str]:
    """The fleet file's bytes and its config, or why it is not one."""
    data = path.read_bytes()
    try:
        return data, parse_fleet(data.decode("utf-8"), path.resolve().parent, str(path))
    except UnicodeDecodeError as exc:
        return data, f"{path}: not UTF-8 text: {exc}"
    except ConfigError as exc:
        return data, str(exc)
    except Exception as exc:  # whatever the content, the watcher goes on
        return data, f"{path}: cannot be read as a fleet file: {exc!r}"


async def watch_fleet_file(
    control: Control,
    path: Path,
    loaded: FleetConfig,
    interval_s: float,
    stop: asyncio.Event,
    seen: tuple[int, int] | None,
) -> None:
    """Re-reads the fleet file whenever it changes from `seen` (its stamp when it
    was loaded) and applies it. Whatever the file holds, the watcher goes on: bytes
    that are not UTF-8, YAML that does not parse, a config that does not validate or
    a file that is gone leave the running settings as they are, and each rejected
    version is logged once with the reason; a later good version applies."""
    rejected: bytes | None = None
    missing = False
    while not stop.is_set():
        try:
            async with asyncio.timeout(interval_s):
                await stop.wait()
            return
        except TimeoutError:
            pass
        current = file_stamp(path)
        if current is None:
            if not missing:
                log.warning("fleet file %s is gone; keeping the running settings", path)
            missing = True
            continue
        missing = False
        if current == seen:
            continue
        try:
            data, config = _read_fleet(path)
        except OSError as exc:
            log.warning("fleet file %s cannot be read now: %s", path, exc)
            continue
        seen = current
        digest = hashlib.sha256(data).digest()
        if isinstance(config, str):
            if digest != rejected:
                log.error(
                    "fleet file changed but is not valid, keeping the running settings: %s",
                    config,
                )
            rejected = digest
            continue
        rejected = None
        try:
            control.apply_fleet(loaded, config, f"fleet file {path}")
        except Exception:  # the watcher outlives one bad application
            log.exception("fleet file %s: applying the change failed", path)
        loaded = config


async def replay_prices(
    control: Control,
    schedule: list[PriceChange],
    clock: Callable[[], float],
    loop_schedule: bool,
    stop: asyncio.Event,
) -> None:
    """Applies each price change when its offset from the schedule's start comes
    round. The start is kept in the control plane's store: after a restart the
    schedule resumes where the wall clock says it is (each backend's price in force
    there applies at once), not from offset 0. `clock` (monotonic seconds) times the
    waits."""
    if not schedule:
        return
    period = schedule[-1].offset_s
    position = schedule_position(schedule, control.schedule_elapsed_s(), loop_schedule)
    control.resume_prices(position)
    start = clock() - position.pass_elapsed_s
    pending = schedule[position.due :]
    while not stop.is_set():
        for change in pending:
            delay = start + change.offset_s - clock()
            if delay > 0:
                try:
                    async with asyncio.timeout(delay):
                        await stop.wait()
                    return
                except TimeoutError:
                    pass
            try:
                control.set_price(
                    change.backend, change.usd_per_hour, "price schedule", scheduled=True
                )
            except UnknownBackend as exc:
                log.error("price schedule: %s", exc)
        if not loop_schedule or period <= 0:
            return
        start += period
        pending = schedule
