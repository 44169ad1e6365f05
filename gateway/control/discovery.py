"""DNS discovery of backend groups (a fleet file entry with `discovery:`): every A and
AAAA record of the group's name is one backend at that address and the group's port,
with the group's hardware class, price, carbon, slots, models and TLS (a Kubernetes
headless Service: one record per ready pod).

Each gateway resolves the names itself, every `interval_s`. What an answer changes
goes through the control plane (`Members`: `Control.add_backend` and
`Control.remove_backend`), the one path that adds and removes backends live:

- a new address joins the fleet unhealthy, out of the routes, and is probed at once:
  it takes traffic once its readiness probe passes (as any backend that comes up);
- an address gone from the answer leaves the routes at once (no new requests) while
  the requests in flight on it finish; then its channel is closed and its metric series
  removed (`release`), and what the admin API set for its name (a price, a drain) is
  forgotten (`Members.forget_backend`): a pod that later takes the address is a new
  backend, which starts from the group's settings;
- a failed resolution (a timeout, SERVFAIL, a refused query, no server) keeps the last
  known set, with a log line and `switchyard_discovery_up{group} 0`;
- NXDOMAIN or an answer with no records is taken for an empty group only once it has
  lasted `empty_after_s`; until then the last known set keeps serving.

`GroupMembers` is the pure part (an answer in, the change out, the time passed in);
`Discovery` runs it against a `Resolver` (dnspython's asynchronous resolver in
service, a fake in unit tests) with an injected clock.

Imports the fleet file's settings, the routing core's fleet state, dnspython and
prometheus_client: no grpc, no protobuf, nothing of the serving plane.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.resolver
from prometheus_client import CollectorRegistry, Gauge

from gateway.config import BackendSettings, BackendTLS, GatewaySettings
from gateway.routing.fleet import BackendState

log = logging.getLogger("switchyard.discovery")

DRAIN_POLL_S = 0.05
"""How often a leaving backend's requests in flight are counted while it drains."""
DRAIN_TIMEOUT_S = 60.0
"""The longest a leaving backend's requests in flight are waited for; then its channel
closes and those still out fail over to other routes."""

_ADDRESS_PART = re.compile(r"^[0-9A-Fa-f]+(-[0-9A-Fa-f]*)*$")


def backend_name(group: str, address: str) -> str:
    """The backend a group's address stands for: the group's name, a dash, and the
    address with `.` and `:` as `-` (`workers-10-1-2-3`, `workers-fd00--1`)."""
    return f"{group}-{address.replace('.', '-').replace(':', '-')}"


def discovery_group(backends: Iterable[BackendSettings], name: str) -> BackendSettings | None:
    """The discovery group whose naming `name` follows (`backend_name`), if any; the
    longest group name wins where several would."""
    found = None
    for b in backends:
        if b.discovery is None or not name.startswith(f"{b.name}-"):
            continue
        if _ADDRESS_PART.match(name[len(b.name) + 1 :]) and (
            found is None or len(b.name) > len(found.name)
        ):
            found = b
    return found


def group_tls(group: BackendSettings) -> BackendTLS | None:
    """The group's TLS, with its certificates checked against `tls.server_name`, else
    the DNS name (the records' addresses are not in the certificate)."""
    if group.tls is None or group.discovery is None or group.tls.server_name is not None:
        return group.tls
    return group.tls.model_copy(update={"server_name": group.discovery.dns.rstrip(".")})


def backend_state(
    backend: BackendSettings, address: str, gateway: GatewaySettings, name: str | None = None
) -> BackendState:
    """The routing core's state of a backend with `backend`'s settings at `address`
    (named `name`, default the entry's), out of the routes until a probe finds it ready."""
    return BackendState(
        name=backend.name if name is None else name,
        address=address,
        hardware_class=backend.hardware_class,
        price_usd_per_hour=backend.price_usd_per_hour,
        slots=backend.slots or (backend.launch.threads if backend.launch else 1),
        queue_limit=(
            gateway.backend_queue_limit if backend.queue_limit is None else backend.queue_limit
        ),
        expected_models=tuple(backend.models or ()),
        carbon_g_per_kwh=backend.carbon_g_per_kwh,
        power_w=backend.power_w,
    )


def own_in_flight(state: BackendState) -> int:
    """This gateway's requests in flight on the backend: its `in_flight` less the other
    gateways' requests that their load reports stand for (a report's tickets leave only
    as the fleet ages them, which it no longer does for a backend that left)."""
    return state.in_flight - sum(ticket.count for ticket in state.others)


def host_port(address: str, port: int) -> str:
    """`address:port`, an IPv6 address in brackets."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@dataclass(frozen=True, slots=True)
class Answer:
    """What one resolution of a name gave."""

    addresses: frozenset[str]
    """Its A and AAAA records (empty: NXDOMAIN or no records)."""
    error: str = ""
    """Why the resolution failed (a timeout, SERVFAIL, no server); empty: it answered."""


@dataclass(frozen=True, slots=True)
class Step:
    """What one answer changes in a group."""

    joined: frozenset[str] = frozenset()
    left: frozenset[str] = frozenset()
    kept: str = ""
    """Why the last known set was kept though the answer differs (empty: it was not)."""


@dataclass(slots=True)
class GroupMembers:
    """A group's known addresses, moved along by each answer (pure: the time is passed)."""

    empty_after_s: float
    known: frozenset[str] = frozenset()
    up: bool = False
    """Whether the last resolution answered (NXDOMAIN and no records count as answers)."""
    empty_since_s: float | None = None
    """Since when the name has answered NXDOMAIN or no records, while addresses are known."""

    def observe(self, answer: Answer, now_s: float) -> Step:
        if answer.error:
            self.up = False
            if not self.known:
                return Step()
            return Step(kept=f"resolution failed ({answer.error})")
        self.up = True
        if answer.addresses:
            self.empty_since_s = None
            joined, left = answer.addresses - self.known, self.known - answer.addresses
            self.known = answer.addresses
            return Step(joined, left)
        if not self.known:
            return Step()
        if self.empty_since_s is None:
            self.empty_since_s = now_s
        waited_s = now_s - self.empty_since_s
        if waited_s < self.empty_after_s:
            return Step(
                kept=f"no records for {waited_s:.1f} s, taken for an empty group after "
                f"{self.empty_after_s:g} s"
            )
        left, self.known, self.empty_since_s = self.known, frozenset(), None
        return Step(left=left)


class Resolver(Protocol):
    async def resolve(self, name: str, timeout_s: float) -> Answer:
        """`name`'s A and AAAA records; a failure is an Answer with its error."""
        ...


class DnsResolver:
    """A and AAAA records by dnspython's asynchronous resolver, asked side by side, from
    `nameserver` (`HOST:PORT`) or the system's resolver (/etc/resolv.conf)."""

    def __init__(self, nameserver: str | None = None) -> None:
        if nameserver is None:
            self._resolver = dns.asyncresolver.Resolver()
        else:
            host, port = nameserver.rsplit(":", 1)
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [host.strip("[]")]
            self._resolver.port = int(port)

    async def resolve(self, name: str, timeout_s: float) -> Answer:
        results = await asyncio.gather(
            self._records(name, "A", timeout_s), self._records(name, "AAAA", timeout_s)
        )
        errors = [r for r in results if isinstance(r, str)]
        if errors:
            return Answer(frozenset(), "; ".join(errors))
        return Answer(frozenset().union(*(r for r in results if not isinstance(r, str))))

    async def _records(self, name: str, rdtype: str, timeout_s: float) -> frozenset[str] | str:
        """The records' addresses, or why there are none to be had."""
        try:
            answer = await self._resolver.resolve(
                name, rdtype, lifetime=timeout_s, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            return frozenset()
        except dns.resolver.LifetimeTimeout:
            return f"{rdtype}: no answer within {timeout_s:g} s"
        except dns.exception.DNSException as exc:
            return f"{rdtype}: {type(exc).__name__}: {exc}"
        return frozenset(str(record.address) for record in answer)


class Members(Protocol):
    """Where discovered backends join and leave the fleet (the control plane)."""

    def add_backend(self, state: BackendState, source: str) -> bool:
        """Adds `state` to the fleet, out of the routes until probed ready; False when
        a backend of that name is already there (nothing is added)."""
        ...

    def remove_backend(self, name: str, source: str) -> BackendState | None:
        """Takes the backend out of the fleet and its routes (its requests in flight
        finish); None when there is none of that name."""
        ...

    def forget_backend(self, name: str, source: str) -> None:
        """Forgets what the admin API set for the backend `name` (its price, its drain;
        with a shared store, for every gateway): it has left for good."""
        ...


class DiscoveryMetrics:
    """The discovery gauges, on the gateway's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge(
            "switchyard_discovery_up",
            "1 while the group's DNS name answers (NXDOMAIN and no records count), 0 while "
            "its resolution fails and the last known backends are kept",
            ["group"],
            registry=registry,
        )
        self.backends = Gauge(
            "switchyard_discovery_backends",
            "Addresses the group's DNS name last gave (kept while resolution fails)",
            ["group"],
            registry=registry,
        )
        self.last_success = Gauge(
            "switchyard_discovery_last_success_timestamp_seconds",
            "When the group's DNS name last answered (seconds since the epoch)",
            ["group"],
            registry=registry,
        )


@dataclass(slots=True)
class _Group:
    settings: BackendSettings
    resolver: Resolver
    members: GroupMembers
    names: dict[str, str] = field(default_factory=dict)
    """Address -> the name of the backend that stands for it in the fleet."""
    failing: bool = False
    """Whether the last resolution failed (its failure is logged once)."""


class Discovery:
    """Resolves each discovery group's name every `interval_s` and puts what changed
    through `members`. `probe(name)` probes a joining backend at once; `release(state)`
    is told once a leaving backend has drained (its requests in flight finished, or
    DRAIN_TIMEOUT_S passed), to close its channel. `clock` gives monotonic seconds."""

    def __init__(
        self,
        groups: Iterable[BackendSettings],
        gateway: GatewaySettings,
        members: Members,
        metrics: DiscoveryMetrics,
        clock: Callable[[], float],
        *,
        probe: Callable[[str], Awaitable[None]],
        release: Callable[[BackendState], Awaitable[None]],
        resolver: Callable[[str | None], Resolver] = DnsResolver,
        wall_clock: Callable[[], float] = time.time,
        drain_poll_s: float = DRAIN_POLL_S,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`resolver(nameserver)` makes a group's resolver (`nameserver` None: the
        system's); `wall_clock` (seconds since the epoch) stamps the last answer's gauge;
        `sleep` waits between a draining backend's counts of its requests in flight."""
        self.gateway = gateway
        self.members = members
        self.metrics = metrics
        self.clock = clock
        self.wall_clock = wall_clock
        self._probe = probe
        self._release = release
        self.drain_poll_s = drain_poll_s
        self.drain_timeout_s = drain_timeout_s
        self._sleep = sleep
        self.groups: dict[str, _Group] = {}
        for g in groups:
            if g.discovery is None:
                continue
            self.groups[g.name] = _Group(
                g, resolver(g.discovery.nameserver), GroupMembers(g.discovery.empty_after_s)
            )
        self._drains: set[asyncio.Task[None]] = set()
        self._probes: set[asyncio.Task[None]] = set()

    async def resolve_all(self) -> None:
        """One resolution of every group, side by side (at the gateway's start)."""
        await asyncio.gather(*(self.resolve(name) for name in self.groups))

    async def resolve(self, group: str) -> Step:
        """Resolves `group`'s name once and applies what changed."""
        g = self.groups[group]
        settings = g.settings.discovery
        assert settings is not None
        answer = await g.resolver.resolve(settings.dns, settings.timeout_s)
        now = self.clock()
        step = g.members.observe(answer, now)
        self._report(g, answer, step, now)
        for address in sorted(step.left):
            self._leave(g, address)
        for address in sorted(step.joined):
            self._join(g, address)
        return step

    def _report(self, g: _Group, answer: Answer, step: Step, now: float) -> None:
        group = g.settings.name
        settings = g.settings.discovery
        assert settings is not None
        if answer.error:
            if not g.failing:
                log.warning(
                    "discovery %s: resolving %s failed, keeping the last known %d backends: %s",
                    group,
                    settings.dns,
                    len(g.members.known),
                    answer.error,
                )
            g.failing = True
        else:
            if g.failing:
                log.info("discovery %s: %s answers again", group, settings.dns)
            g.failing = False
            self.metrics.last_success.labels(group).set(self.wall_clock())
            if step.kept:
                log.warning(
                    "discovery %s: %s: %s; keeping the last known %d backends",
                    group,
                    settings.dns,
                    step.kept,
                    len(g.members.known),
                )
        self.metrics.up.labels(group).set(1 if g.members.up else 0)
        self.metrics.backends.labels(group).set(len(g.members.known))

    def _join(self, g: _Group, address: str) -> None:
        settings = g.settings.discovery
        assert settings is not None
        name = backend_name(g.settings.name, address)
        state = backend_state(g.settings, host_port(address, settings.port), self.gateway, name)
        source = f"discovery {g.settings.name} ({settings.dns})"
        if not self.members.add_backend(state, source):
            log.error(
                "discovery %s: %s is already a backend of the fleet; address %s left out",
                g.settings.name,
                name,
                address,
            )
            return
        g.names[address] = name
        log.info("discovery %s: %s joins at %s once probed ready", g.settings.name, name, address)
        self._spawn(self._probes, self._first_probe(g, state))

    async def _first_probe(self, g: _Group, state: BackendState) -> None:
        """Probes a joining backend; says why when it is not ready (a handshake that
        fails on the group's TLS settings, a port where nothing listens), as the
        prober says nothing of a backend that was never healthy."""
        await self._probe(state.name)
        if not state.healthy and state.last_error:
            log.warning(
                "discovery %s: %s at %s is not ready yet: %s",
                g.settings.name,
                state.name,
                state.address,
                state.last_error,
            )

    def _leave(self, g: _Group, address: str) -> None:
        name = g.names.pop(address, None)
        if name is None:
            return
        settings = g.settings.discovery
        assert settings is not None
        state = self.members.remove_backend(name, f"discovery {g.settings.name} ({settings.dns})")
        if state is None:
            return
        log.info(
            "discovery %s: %s left %s: out of the routes, %d requests in flight to finish",
            g.settings.name,
            name,
            settings.dns,
            own_in_flight(state),
        )
        self._spawn(self._drains, self._drain(g, state))

    async def _drain(self, g: _Group, state: BackendState) -> None:
        # Counted, not waited on: the routing core's state has no event to await. Only
        # this gateway's own requests: the others' (from load reports on a backend
        # gateways share) are not for it to wait on.
        for _ in range(max(1, round(self.drain_timeout_s / self.drain_poll_s))):
            if own_in_flight(state) <= 0:
                break
            await self._sleep(self.drain_poll_s)
        if (left := own_in_flight(state)) > 0:
            log.warning(
                "backend %s: %d requests still in flight %g s after it left; closing "
                "its channel (they fail over)",
                state.name,
                left,
                self.drain_timeout_s,
            )
        await self._release(state)
        if state.name in g.names.values():
            # Its address came back while it drained: the same backend, as it was.
            log.info("backend %s drained; its address is back", state.name)
            return
        settings = g.settings.discovery
        assert settings is not None
        self.members.forget_backend(state.name, f"discovery {g.settings.name} ({settings.dns})")
        log.info("backend %s drained and removed", state.name)

    def _spawn(self, tasks: set[asyncio.Task[None]], work: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await work
            except Exception:  # one backend's probe or drain never stops the others
                log.exception("discovery: a background step failed")

        task = asyncio.get_running_loop().create_task(run())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def settled(self) -> None:
        """Waits for the joining backends' first probes and the leaving ones' drains."""
        while self._probes or self._drains:
            await asyncio.gather(*self._probes, *self._drains)

    async def stop(self) -> None:
        """Cancels the joining backends' probes and the leaving ones' drains."""
        tasks = [*self._probes, *self._drains]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def run(self, stop: asyncio.Event) -> None:
        """Resolves every group again each `interval_s` until `stop` is set."""
        await asyncio.gather(*(self._loop(name, stop) for name in self.groups))

    async def _loop(self, group: str, stop: asyncio.Event) -> None:
        settings = self.groups[group].settings.discovery
        assert settings is not None
        while not stop.is_set():
            try:
                async with asyncio.timeout(settings.interval_s):
                    await stop.wait()
                return
            except TimeoutError:
                pass
            try:
                await self.resolve(group)
            except Exception:  # the loop outlives one bad round
                log.exception("discovery %s: resolution round failed", group)
