"""DNS discovery without a network: backend names from addresses, the membership diff
(a failure keeps the last known set, an empty answer only once it lasts), and the
control plane taking discovered backends in and out (with what the admin API set for
their names). A fake resolver and a fake clock; the real Control and fleet state."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.config import BackendSettings, FleetConfig, parse_fleet
from gateway.control.discovery import (
    Answer,
    Discovery,
    DiscoveryMetrics,
    GroupMembers,
    Resolver,
    Step,
    backend_name,
    discovery_group,
    group_tls,
    host_port,
)
from gateway.control.plane import Control
from gateway.control.state import ControlState, MemoryStateStore, PriceOverride
from gateway.routing.fleet import BackendState, FleetState
from gateway.routing.policy import PolicyBook
from gateway.serving.metrics import GatewayMetrics
from tests.waiting import wait_until

FLEET = """
backends:
  - {name: static, address: 127.0.0.1:9101, price_usd_per_hour: 0.5}
  - name: workers
    hardware_class: cpu-x86-64-v4-2c
    price_usd_per_hour: 0.08
    carbon_g_per_kwh: 300
    power_w: 25
    slots: 2
    models: [digits]
    tls: {ca_file: /etc/ca.pem}
    discovery: {dns: workers.ns.svc.cluster.local., port: 9000, empty_after_s: 10}
"""


def fleet() -> FleetConfig:
    return parse_fleet(FLEET, Path("/"))


def test_names_follow_the_group_and_the_address() -> None:
    assert backend_name("workers", "10.1.2.3") == "workers-10-1-2-3"
    assert backend_name("workers", "fd00::1") == "workers-fd00--1"
    backends = fleet().backends
    assert discovery_group(backends, "workers-10-1-2-3") is backends[1]
    assert discovery_group(backends, "workers-fd00--1") is backends[1]
    assert discovery_group(backends, "static") is None
    assert discovery_group(backends, "workers-blue") is None
    assert discovery_group(backends, "workers") is None
    BackendSettings(name=backend_name("workers", "fd00::1"), address="127.0.0.1:1")


def test_addresses_take_the_port_ipv6_in_brackets() -> None:
    assert host_port("10.1.2.3", 9000) == "10.1.2.3:9000"
    assert host_port("fd00::1", 9000) == "[fd00::1]:9000"


def test_group_tls_checks_the_dns_name_unless_a_server_name_is_set() -> None:
    group = fleet().backends[1]
    tls = group_tls(group)
    assert tls is not None and tls.server_name == "workers.ns.svc.cluster.local"
    named = group.model_copy(
        update={"tls": group.tls.model_copy(update={"server_name": "w.example"})}  # type: ignore[union-attr]
    )
    assert group_tls(named) is named.tls
    assert group_tls(fleet().backends[0]) is None


A = frozenset({"10.0.0.1", "10.0.0.2"})


def test_the_first_answer_joins_every_address_then_only_the_difference() -> None:
    members = GroupMembers(empty_after_s=10)
    assert members.observe(Answer(A), 0.0) == Step(joined=A)
    assert members.up
    step = members.observe(Answer(frozenset({"10.0.0.2", "10.0.0.3"})), 1.0)
    assert step == Step(joined=frozenset({"10.0.0.3"}), left=frozenset({"10.0.0.1"}))
    assert members.observe(Answer(frozenset({"10.0.0.2", "10.0.0.3"})), 2.0) == Step()


def test_a_failed_resolution_keeps_the_last_known_set() -> None:
    members = GroupMembers(empty_after_s=10)
    assert members.observe(Answer(frozenset(), "A: timed out"), 0.0) == Step()
    assert not members.up
    members.observe(Answer(A), 1.0)
    for now in (2.0, 100.0, 1000.0):
        step = members.observe(Answer(frozenset(), "A: NoNameservers (SERVFAIL)"), now)
        assert step.joined == step.left == frozenset()
        assert "SERVFAIL" in step.kept
        assert not members.up
    assert members.known == A
    assert members.observe(Answer(A), 1001.0) == Step()
    assert members.up


def test_no_records_empty_the_group_only_once_they_last() -> None:
    members = GroupMembers(empty_after_s=10)
    members.observe(Answer(A), 0.0)
    for now in (1.0, 5.0, 10.9):
        step = members.observe(Answer(frozenset()), now)
        assert step.left == frozenset() and "no records" in step.kept
        assert members.up
    assert members.observe(Answer(frozenset()), 11.0) == Step(left=A)
    assert members.known == frozenset()
    assert members.observe(Answer(frozenset()), 12.0) == Step()


def test_records_back_before_the_wait_ends_start_it_again() -> None:
    members = GroupMembers(empty_after_s=10)
    members.observe(Answer(A), 0.0)
    members.observe(Answer(frozenset()), 1.0)
    assert members.observe(Answer(A), 5.0) == Step()
    members.observe(Answer(frozenset()), 6.0)
    assert members.observe(Answer(frozenset()), 15.0).left == frozenset()
    assert members.observe(Answer(frozenset()), 16.0).left == A


def test_empty_after_zero_empties_the_group_at_the_first_empty_answer() -> None:
    members = GroupMembers(empty_after_s=0)
    members.observe(Answer(A), 0.0)
    assert members.observe(Answer(frozenset()), 1.0) == Step(left=A)


class FakeResolver:
    """Answers what the test sets; counts the questions."""

    def __init__(self) -> None:
        self.answer = Answer(frozenset())
        self.asked: list[tuple[str, float]] = []

    async def resolve(self, name: str, timeout_s: float) -> Answer:
        self.asked.append((name, timeout_s))
        return self.answer


class Gateway:
    """The real Control and fleet state, with a Discovery over a fake resolver."""

    def __init__(self, state: ControlState | None = None) -> None:
        self.config = fleet()
        self.fleet = FleetState(
            [BackendState("static", "127.0.0.1:9101", "cpu", 0.5)],
        )
        self.metrics = GatewayMetrics(CollectorRegistry())
        self.store = MemoryStateStore()
        if state is not None:
            self.store.save(state)
        self.control = Control(
            self.fleet,
            self.metrics,
            lambda: PolicyBook(self.config.policies),
            lambda book: None,
            set_chooser=lambda chooser: None,
            config=self.config,
            wall_clock=lambda: 1000.0,
            store=self.store,
        )
        self.control.restore()
        self.resolver = FakeResolver()
        self.registry = CollectorRegistry()
        self.now_s = 0.0
        self.probed: list[str] = []
        self.released: list[BackendState] = []

        def resolver(nameserver: str | None) -> Resolver:
            return self.resolver

        async def probe(name: str) -> None:
            self.probed.append(name)

        async def release(state: BackendState) -> None:
            self.released.append(state)

        self.discovery = Discovery(
            self.config.backends,
            self.config.gateway,
            self.control,
            DiscoveryMetrics(self.registry),
            lambda: self.now_s,
            probe=probe,
            release=release,
            resolver=resolver,
            wall_clock=lambda: 1000.0 + self.now_s,
            sleep=self.drain_pause,
            drain_timeout_s=1e9,  # a drain here ends when its requests do, never by time
        )
        self.drain_counts = 0
        """How many times a drain has found requests in flight and waited."""

    async def drain_pause(self, seconds: float) -> None:
        self.drain_counts += 1
        await asyncio.sleep(0)

    async def answer(self, *addresses: str, error: str = "") -> Step:
        self.resolver.answer = Answer(frozenset(addresses), error)
        step = await self.discovery.resolve("workers")
        await self.discovery.settled()
        return step

    def gauge(self, name: str) -> float | None:
        return self.registry.get_sample_value(name, {"group": "workers"})


async def test_discovered_backends_join_with_the_groups_settings_unready() -> None:
    gw = Gateway()
    await gw.answer("10.0.0.1", "10.0.0.2")
    assert gw.resolver.asked == [("workers.ns.svc.cluster.local.", 2.0)]
    assert sorted(gw.fleet.backends) == ["static", "workers-10-0-0-1", "workers-10-0-0-2"]
    state = gw.fleet.backends["workers-10-0-0-1"]
    assert state.address == "10.0.0.1:9000"
    assert (state.hardware_class, state.price_usd_per_hour, state.slots) == (
        "cpu-x86-64-v4-2c",
        0.08,
        2,
    )
    assert (state.carbon_g_per_kwh, state.power_w, state.expected_models) == (
        300,
        25,
        ("digits",),
    )
    assert not state.healthy and not state.available  # until its readiness probe passes
    assert sorted(gw.probed) == ["workers-10-0-0-1", "workers-10-0-0-2"]
    assert gw.gauge("switchyard_discovery_up") == 1
    assert gw.gauge("switchyard_discovery_backends") == 2


async def test_a_vanished_address_leaves_the_routes_at_once_and_is_released_when_drained() -> None:
    gw = Gateway()
    await gw.answer("10.0.0.1", "10.0.0.2")
    leaving = gw.fleet.backends["workers-10-0-0-1"]
    leaving.in_flight = 1  # a request still out on it
    gw.resolver.answer = Answer(frozenset({"10.0.0.2"}))
    await gw.discovery.resolve("workers")
    assert "workers-10-0-0-1" not in gw.fleet.backends
    await wait_until(lambda: gw.drain_counts >= 3, what="the drain counting its request")
    assert gw.released == []  # still draining
    leaving.in_flight = 0
    await gw.discovery.settled()
    assert gw.released == [leaving]
    assert gw.gauge("switchyard_discovery_backends") == 1


async def test_a_failure_keeps_the_backends_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    gw = Gateway()
    await gw.answer("10.0.0.1")
    gw.now_s = 5.0
    assert gw.gauge("switchyard_discovery_last_success_timestamp_seconds") == 1000.0
    for _ in range(3):
        step = await gw.answer(error="A: no answer within 2 s")
    assert "no answer" in step.kept
    assert "workers-10-0-0-1" in gw.fleet.backends
    assert gw.gauge("switchyard_discovery_up") == 0
    assert gw.gauge("switchyard_discovery_backends") == 1
    failures = [r for r in caplog.records if "resolving" in r.getMessage()]
    assert len(failures) == 1  # logged once, not every round
    assert "keeping the last known 1 backends" in failures[0].getMessage()
    await gw.answer("10.0.0.1")
    assert gw.gauge("switchyard_discovery_up") == 1
    assert gw.gauge("switchyard_discovery_last_success_timestamp_seconds") == 1005.0


async def test_an_address_already_a_backend_is_left_out() -> None:
    gw = Gateway()
    gw.fleet.add_backend(BackendState("workers-10-0-0-9", "127.0.0.1:1", "cpu", 0.0))
    await gw.answer("10.0.0.9")
    assert gw.fleet.backends["workers-10-0-0-9"].address == "127.0.0.1:1"
    assert gw.probed == []


async def test_admin_changes_for_a_discovered_name_wait_for_it_and_apply_when_it_joins() -> None:
    kept = ControlState(
        prices={"workers-10-0-0-1": PriceOverride(0.02, 0.08, 900.0)},
        drained=frozenset({"workers-10-0-0-2", "gone"}),
    )
    gw = Gateway(kept)
    # Restored before discovery ran: the discovered names are kept, only `gone` dropped.
    assert gw.control.state.prices == kept.prices
    assert gw.control.state.drained == frozenset({"workers-10-0-0-2"})
    await gw.answer("10.0.0.1", "10.0.0.2")
    assert gw.fleet.backends["workers-10-0-0-1"].price_usd_per_hour == 0.02
    assert gw.fleet.backends["workers-10-0-0-2"].drained


async def test_a_vanished_names_admin_changes_are_forgotten_once_it_has_drained() -> None:
    gw = Gateway()
    await gw.answer("10.0.0.1", "10.0.0.2")
    gw.control.set_drained("workers-10-0-0-1", True)
    gw.control.override_price("workers-10-0-0-1", 0.01)
    gw.control.set_drained("workers-10-0-0-2", True)
    # Back while it drains: the same backend, as it was.
    leaving = gw.fleet.backends["workers-10-0-0-1"]
    leaving.in_flight = 1
    gw.resolver.answer = Answer(frozenset({"10.0.0.2"}))
    await gw.discovery.resolve("workers")
    gw.resolver.answer = Answer(frozenset({"10.0.0.1", "10.0.0.2"}))
    await gw.discovery.resolve("workers")
    leaving.in_flight = 0
    await gw.discovery.settled()
    assert gw.released == [leaving]
    back = gw.fleet.backends["workers-10-0-0-1"]
    assert back.drained and back.price_usd_per_hour == 0.01
    # Gone and drained: forgotten, in the store too; a pod that takes the address later
    # is a new backend at the group's price, undrained. The other name keeps its drain.
    await gw.answer("10.0.0.2")
    kept = gw.store.load()
    assert "workers-10-0-0-1" not in kept.backends()
    assert kept.drained == frozenset({"workers-10-0-0-2"})
    await gw.answer("10.0.0.1", "10.0.0.2")
    new = gw.fleet.backends["workers-10-0-0-1"]
    assert not new.drained and new.price_usd_per_hour == 0.08


async def test_shared_state_applies_to_discovered_backends() -> None:
    gw = Gateway()
    await gw.answer("10.0.0.1")
    gw.control.apply_state(
        ControlState(
            prices={"workers-10-0-0-1": PriceOverride(0.01, 0.08, 900.0)},
            drained=frozenset({"workers-10-0-0-1"}),
        )
    )
    state = gw.fleet.backends["workers-10-0-0-1"]
    assert state.price_usd_per_hour == 0.01 and state.drained
    gw.control.apply_state(ControlState())
    assert state.price_usd_per_hour == 0.08 and not state.drained


async def test_a_group_price_edit_in_the_fleet_file_reaches_its_members() -> None:
    gw = Gateway()
    await gw.answer("10.0.0.1", "10.0.0.2")
    edited = parse_fleet(FLEET.replace("0.08", "0.12"), Path("/"))
    gw.control.apply_fleet(gw.config, edited, "fleet file")
    assert [gw.fleet.backends[n].price_usd_per_hour for n in sorted(gw.fleet.backends)] == [
        0.5,
        0.12,
        0.12,
    ]
