"""The control plane: every change an SRE or a schedule makes to a running
gateway goes through here (prices, policies, drains, routing, killing and
restarting launched workers), from the admin API, the fleet file when it changes
on disk, and price schedules replayed against the clock. Routing reads the
result on the next request.

Imports no grpc and no generated protobuf: the admin API converts at its edge.
"""

from __future__ import annotations

import asyncio
import csv
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from backends.protocol.errors import InvalidInput, NotFound
from gateway.config import ConfigError, FleetConfig, PoliciesSettings, load_fleet
from gateway.control.supervisor import NotSupervised, Supervised, Supervisor
from gateway.routing.fleet import BackendState, FleetState
from gateway.routing.policy import PolicyBook
from gateway.routing.router import Chooser, chooser_for
from gateway.serving.metrics import GatewayMetrics

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
        if offset < 0 or price < 0:
            raise ConfigError(f"{path}:{number}: offset and price must not be negative")
        changes.append(PriceChange(offset, row[1].strip(), price))
    return sorted(changes, key=lambda c: c.offset_s)


class Control:
    """Applies changes to the fleet and the policies, and keeps metrics in step."""

    def __init__(
        self,
        fleet: FleetState,
        metrics: GatewayMetrics,
        policies: Callable[[], PolicyBook],
        set_policies: Callable[[PolicyBook], None],
        *,
        set_chooser: Callable[[Chooser], None],
        supervisor: Supervisor | None = None,
        probe: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        """`set_chooser` installs the servicer's chooser; `supervisor` runs the
        launched workers (None: none are); `probe` health-probes one backend now."""
        self.fleet = fleet
        self.metrics = metrics
        self._policies = policies
        self._set_policies = set_policies
        self._set_chooser = set_chooser
        self.supervisor = supervisor
        self._probe = probe
        self.routing = "switchyard"
        """The name of the chooser in force (one of ROUTING)."""

    def backend(self, name: str) -> BackendState:
        state = self.fleet.backends.get(name)
        if state is None:
            raise UnknownBackend(name, sorted(self.fleet.backends))
        return state

    def set_price(self, backend: str, usd_per_hour: float, source: str) -> BackendState:
        if usd_per_hour < 0:
            raise InvalidInput("a price must not be negative")
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

    def set_drained(self, backend: str, drained: bool) -> BackendState:
        self.backend(backend)
        state = self.fleet.set_drained(backend, drained)
        self.metrics.available.labels(backend).set(1 if state.available else 0)
        log.info("backend %s %s", backend, "drained" if drained else "undrained")
        return state

    def set_routing(self, name: str, source: str) -> str:
        """Puts the chooser called `name` in force for the next request; an unknown
        name is InvalidInput naming the known ones."""
        try:
            chooser = chooser_for(name)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc
        self._set_chooser(chooser)
        if name != self.routing:
            log.info("routing: %s -> %s (%s)", self.routing, name, source)
        self.routing = name
        return name

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
                f"backend {backend!r} is not launched by the gateway (no `launch` in the "
                "fleet file), so it has no worker process to kill or restart"
            )
        return self.supervisor

    async def kill(self, backend: str) -> BackendProcess:
        """SIGKILLs a launched backend's worker and holds it down until `restart`.
        Routing learns of it as of a crash (the exit, then a probe at once)."""
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
        self._set_policies(PolicyBook(settings, self._policies().overhead_ms))
        log.info("policies replaced (%s)", source)

    def apply_fleet(self, previous: FleetConfig, config: FleetConfig, source: str) -> None:
        """Applies what a fleet file edit changed and can change live: prices, carbon,
        policies (values the edit left alone keep what the admin API or a price
        schedule set since). Other changes (backends, addresses) need a restart."""
        names = {b.name for b in config.backends}
        if names != set(self.fleet.backends):
            log.warning("%s: backends added or removed; restart the gateway to apply", source)
        before = {b.name: b for b in previous.backends}
        for b in config.backends:
            state = self.fleet.backends.get(b.name)
            old = before.get(b.name)
            if state is None:
                continue
            if old is None or old.price_usd_per_hour != b.price_usd_per_hour:
                self.set_price(b.name, b.price_usd_per_hour, source)
            if old is None or (old.carbon_g_per_kwh, old.power_w) != (
                b.carbon_g_per_kwh,
                b.power_w,
            ):
                state.set_carbon(b.carbon_g_per_kwh, b.power_w)
        if config.policies != previous.policies:
            self.set_policies(config.policies, source)


def file_stamp(path: Path) -> tuple[int, int] | None:
    """What tells a file changed: its modification time and size."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


async def watch_fleet_file(
    control: Control,
    path: Path,
    loaded: FleetConfig,
    interval_s: float,
    stop: asyncio.Event,
    seen: tuple[int, int] | None,
) -> None:
    """Re-reads the fleet file whenever it changes from `seen` (its stamp when it
    was loaded) and applies it; a file that does not validate is logged and
    ignored (the running settings stay)."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
            return
        except TimeoutError:
            pass
        current = file_stamp(path)
        if current is None or current == seen:
            continue
        seen = current
        try:
            config = load_fleet(path)
        except ConfigError as exc:
            log.error("fleet file changed but is not valid, keeping the running settings: %s", exc)
            continue
        control.apply_fleet(loaded, config, f"fleet file {path}")
        loaded = config


async def replay_prices(
    control: Control,
    schedule: list[PriceChange],
    clock: Callable[[], float],
    loop_schedule: bool,
    stop: asyncio.Event,
) -> None:
    """Applies each price change when its offset from the start comes round."""
    if not schedule:
        return
    period = schedule[-1].offset_s
    start = clock()
    while not stop.is_set():
        for change in schedule:
            delay = start + change.offset_s - clock()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    return
                except TimeoutError:
                    pass
            try:
                control.set_price(change.backend, change.usd_per_hour, "price schedule")
            except UnknownBackend as exc:
                log.error("price schedule: %s", exc)
        if not loop_schedule or period <= 0:
            return
        start += period
