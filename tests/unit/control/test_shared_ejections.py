"""Ejections shared over the control state: the record (wall-clock end, count in the
run, who, why) and how it merges and encodes; the fleet applying another gateway's
ejection (until its end, the run's count, the maximum ejected share); two control
planes over one shared state, each with its own monotonic clock, handing each other
their ejections and ending a run at a clean spell. Fake clocks; no store."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.config import FleetConfig, parse_fleet
from gateway.control.plane import Control
from gateway.control.state import (
    ControlState,
    MemoryStateStore,
    SharedEjection,
    StateError,
    decode_state,
    encode_state,
    merge_state,
)
from gateway.routing.fleet import BackendState, Ejection, FleetState, Route
from gateway.routing.policy import PolicyBook
from gateway.serving.metrics import GatewayMetrics
from tests.unit.routing.builders import INFO


def ejection(until_s: float, count: int = 1, by: str = "gw-a", at_s: float = 0.0) -> SharedEjection:
    return SharedEjection(until_s, at_s, count, by, "3 failures in a row: INTERNAL: boom")


# ---- the record: merge and format ------------------------------------------------------

BASE = ControlState(drained=frozenset({"x"}), ejections={"a": ejection(100.0)})

MERGES = [
    # (what, stored now, mine (BASE with my change), expected)
    (
        "my ejection beside their drain",
        BASE.with_drained("y", True),
        BASE.with_ejection("b", ejection(50.0)),
        BASE.with_drained("y", True).with_ejection("b", ejection(50.0)),
    ),
    (
        "their ejection of another backend stands beside mine",
        BASE.with_ejection("c", ejection(60.0, by="gw-b")),
        BASE.with_ejection("b", ejection(50.0)),
        BASE.with_ejection("c", ejection(60.0, by="gw-b")).with_ejection("b", ejection(50.0)),
    ),
    (
        "the same backend at once: the one further in its run wins, though written first",
        BASE.with_ejection("a", ejection(130.0, count=3, by="gw-b")),
        BASE.with_ejection("a", ejection(140.0, count=2)),
        BASE.with_ejection("a", ejection(130.0, count=3, by="gw-b")),
    ),
    (
        "the same backend, the same count: the one that ends later wins",
        BASE.with_ejection("a", ejection(130.0, count=2, by="gw-b")),
        BASE.with_ejection("a", ejection(140.0, count=2)),
        BASE.with_ejection("a", ejection(140.0, count=2)),
    ),
    (
        "my end of the run removes the ejection nobody changed since",
        BASE.with_drained("y", True),
        BASE.with_ejection("a", None),
        BASE.with_drained("y", True).with_ejection("a", None),
    ),
    (
        "my end of the run leaves an ejection made again since",
        BASE.with_ejection("a", ejection(200.0, count=2, by="gw-b")),
        BASE.with_ejection("a", None),
        BASE.with_ejection("a", ejection(200.0, count=2, by="gw-b")),
    ),
    (
        "their ejection left alone when I changed only a drain",
        BASE.with_ejection("a", ejection(200.0, count=2, by="gw-b")),
        BASE.with_drained("x", False),
        BASE.with_ejection("a", ejection(200.0, count=2, by="gw-b")).with_drained("x", False),
    ),
]


@pytest.mark.parametrize(
    ("stored", "mine", "expected"), [c[1:] for c in MERGES], ids=[c[0] for c in MERGES]
)
def test_ejections_merge_by_meaning(
    stored: ControlState, mine: ControlState, expected: ControlState
) -> None:
    assert merge_state(stored, BASE, mine) == expected


def test_the_record_round_trips_and_a_state_without_ejections_reads_as_before() -> None:
    state = BASE.with_ejection("b", ejection(1_700_000_000.25, count=4, at_s=1_699_999_990.0))
    assert decode_state(encode_state(state), "test") == state
    # No ejections, no key: a file (which never holds them) reads as it always did.
    assert "ejections" not in encode_state(ControlState(drained=frozenset({"x"})))
    text = encode_state(state).replace('"count": 4', '"count": 0')
    with pytest.raises(StateError, match="count"):
        decode_state(text, "store")
    text = encode_state(state).replace('"why"', '"reason"')
    with pytest.raises(StateError, match="reason"):
        decode_state(text, "store")
    assert state.without_backends(frozenset({"a", "b"})).ejections == {}
    assert state.backends() == {"x", "a", "b"}


# ---- the fleet applying another gateway's ejection --------------------------------------


def fleet_of(*names: str, max_share: float = 0.5) -> FleetState:
    fleet = FleetState(
        [BackendState(n, f"127.0.0.1:{9100 + i}", "cpu", 0.1) for i, n in enumerate(names)],
        Ejection(after_failures=2, base_s=1.0, max_s=30.0, max_share=max_share),
    )
    for name in names:
        fleet.record_probe(name, 0.0, {"m": INFO})
    return fleet


def route_of(fleet: FleetState, backend: str) -> Route:
    return next(r for r in fleet.routes("m") if r.backend == backend)


def test_an_applied_ejection_lasts_until_its_end_and_carries_the_runs_count() -> None:
    fleet = fleet_of("a", "b", "c", "d")
    assert fleet.apply_ejection("a", 2, 14.0, 10.0, "ejected until T by gateway gw-b")
    a = fleet.backends["a"]
    assert a.status == "ejected" and a.last_error == "ejected until T by gateway gw-b"
    # As a local ejection: a probe before its end does not re-admit it, one after does.
    fleet.record_probe("a", 13.9, {"m": INFO})
    assert not a.available
    fleet.record_probe("a", 14.0, {"m": INFO})
    assert a.available
    # This gateway's next ejection of it backs off from the run's count: 1 s x 2^2.
    fleet.record_attempt(route_of(fleet, "a"), False, 15.0)
    assert fleet.record_attempt(route_of(fleet, "a"), False, 15.0)
    assert a.ejected_until_s == pytest.approx(19.0) and a.ejections == 3


def test_an_ejection_over_already_takes_only_the_count_and_a_longer_one_extends() -> None:
    fleet = fleet_of("a", "b", "c", "d")
    assert not fleet.apply_ejection("a", 3, None, 10.0, "over")
    assert fleet.backends["a"].available and fleet.backends["a"].ejections == 3
    assert not fleet.apply_ejection("b", 1, 9.0, 10.0, "ended before now")
    assert fleet.backends["b"].available
    # Out already here: kept out until the later end, and not counted again.
    assert fleet.apply_ejection("c", 1, 12.0, 10.0, "first")
    assert not fleet.apply_ejection("c", 2, 16.0, 10.0, "again, longer")
    assert fleet.backends["c"].ejected_until_s == 16.0
    assert not fleet.apply_ejection("c", 1, 11.0, 10.0, "shorter")
    assert fleet.backends["c"].ejected_until_s == 16.0
    assert fleet.backends["c"].last_error == "again, longer"
    assert not fleet.apply_ejection("gone", 1, 20.0, 10.0, "no such backend")


def test_applied_ejections_keep_within_the_maximum_share() -> None:
    fleet = fleet_of("a", "b", "c", "d")
    # This gateway's own ejection counts: two of four may be out.
    fleet.record_attempt(route_of(fleet, "a"), False, 1.0)
    assert fleet.record_attempt(route_of(fleet, "a"), False, 1.0)
    assert fleet.apply_ejection("b", 1, 20.0, 10.0, "ejected by gw-b")
    assert not fleet.apply_ejection("c", 1, 20.0, 10.0, "ejected by gw-c")
    c = fleet.backends["c"]
    assert c.available
    assert c.last_error == "not ejected by gw-c: the most the fleet may eject are out"
    # A fleet of one never ejects its backend, whoever asks.
    single = fleet_of("only")
    assert not single.apply_ejection("only", 1, 20.0, 10.0, "ejected by gw-b")
    assert single.backends["only"].available


# ---- two control planes over one shared state ------------------------------------------

FLEET = """
backends:
  - {name: a, address: 127.0.0.1:9101, price_usd_per_hour: 0.1}
  - {name: b, address: 127.0.0.1:9102, price_usd_per_hour: 0.2}
  - {name: c, address: 127.0.0.1:9103, price_usd_per_hour: 0.3}
  - {name: d, address: 127.0.0.1:9104, price_usd_per_hour: 0.4}
gateway:
  eject_after_failures: 2
  eject_base_s: 1.0
"""


class Clock:
    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


class SharedMemoryStore(MemoryStateStore):
    """A store that says it is shared, holding what was saved in memory: what a
    shared store's `load` and `save` are, without the store behind it."""

    @property
    def shared(self) -> bool:
        return True


class Gateway:
    """A control plane over a fleet with its own monotonic clock, the wall clock in
    common, ejecting as the data plane's observer does."""

    def __init__(
        self, name: str, wall: Clock, mono_s: float, store: MemoryStateStore | None = None
    ) -> None:
        config: FleetConfig = parse_fleet(FLEET, Path("."))
        settings = config.gateway
        self.fleet = FleetState(
            [
                BackendState(b.name, b.fixed_address, b.hardware_class, b.price_usd_per_hour)
                for b in config.backends
            ],
            Ejection(settings.eject_after_failures, settings.eject_base_s, settings.eject_max_s),
        )
        self.clock = Clock(mono_s)
        self.registry = CollectorRegistry()
        book = PolicyBook(config.policies)
        self.store = SharedMemoryStore() if store is None else store
        self.control = Control(
            self.fleet,
            GatewayMetrics(self.registry),
            lambda: book,
            lambda _: None,
            set_chooser=lambda _: None,
            config=config,
            wall_clock=wall,
            store=self.store,
            clock=self.clock,
            gateway_id=name,
        )
        self.control.restore()
        for backend in self.fleet.backends:
            self.fleet.record_probe(backend, self.clock(), {"m": INFO})

    def attempt(self, backend: str, ok: bool) -> None:
        """One attempt's outcome, as GatewayObserver.outcome reports it."""
        state = self.fleet.backends[backend]
        run = state.ejections
        ejected = self.fleet.record_attempt(route_of(self.fleet, backend), ok, self.clock())
        if (ejected or (run and not state.ejections)) and self.fleet.on_ejection is not None:
            self.fleet.on_ejection(state)

    def shared(self, backend: str) -> float | None:
        return self.registry.get_sample_value(
            "switchyard_backend_ejections_shared_total", {"backend": backend}
        )


def test_one_gateways_ejection_is_in_force_on_the_other_until_its_wall_clock_end() -> None:
    wall = Clock(1_700_000_000.0)
    one = Gateway("gw-1", wall, mono_s=50.0)
    two = Gateway("gw-2", wall, mono_s=9_000.0)  # another host's monotonic clock
    one.attempt("a", False)
    one.attempt("a", False)
    record = one.store.load().ejections["a"]
    assert (record.until_s, record.at_s, record.count, record.by) == (
        wall.now_s + 1.0,
        wall.now_s,
        1,
        "gw-1",
    )
    assert "2 failures in a row" in record.why

    wall.now_s += 0.25
    two.clock.now_s += 0.25
    two.control.apply_state(one.store.load())
    a = two.fleet.backends["a"]
    assert a.status == "ejected" and a.ejected_until_s == pytest.approx(9_001.0)
    assert "ejected until 2023-11-14T22:13:21.000+00:00 by gateway gw-1 after 2 failures" in (
        a.last_error
    )
    assert two.shared("a") == 1.0 and one.shared("a") is None
    # Applied again (another change of the state): no second count.
    two.control.apply_state(one.store.load().with_drained("d", True))
    assert two.shared("a") == 1.0
    # Its own record is not applied back to the gateway that made it.
    one.control.apply_state(one.store.load())
    assert one.shared("a") is None

    # Its end: each gateway's probe re-admits it on its own clock.
    wall.now_s += 0.75
    two.clock.now_s += 0.75
    two.fleet.record_probe("a", two.clock(), {"m": INFO})
    assert a.available


def test_a_backend_ejected_again_by_the_other_gateway_backs_off_longer() -> None:
    wall = Clock(1_700_000_000.0)
    one = Gateway("gw-1", wall, mono_s=50.0)
    two = Gateway("gw-2", wall, mono_s=9_000.0)
    one.attempt("a", False)
    one.attempt("a", False)
    two.control.apply_state(one.store.load())
    for gw in (one, two):
        gw.clock.now_s += 1.5
    wall.now_s += 1.5
    two.fleet.record_probe("a", two.clock(), {"m": INFO})
    # Still failing: the second gateway ejects it, for twice the base time.
    two.attempt("a", False)
    two.attempt("a", False)
    stored = merge_state(one.store.load(), one.store.load(), two.store.load())
    record = stored.ejections["a"]
    assert (record.count, record.by) == (2, "gw-2")
    assert record.until_s == pytest.approx(wall.now_s + 2.0)
    # A gateway that never saw the first ejection backs off from the stored count too.
    three = Gateway("gw-3", wall, mono_s=0.0, store=SharedMemoryStore(one.store.load()))
    assert three.fleet.backends["a"].ejections == 1 and three.fleet.backends["a"].available
    three.attempt("a", False)
    three.attempt("a", False)
    assert three.fleet.backends["a"].ejected_until_s == pytest.approx(2.0)


def test_a_clean_spell_after_the_end_removes_the_ejection_from_the_store() -> None:
    wall = Clock(1_700_000_000.0)
    one = Gateway("gw-1", wall, mono_s=50.0)
    two = Gateway("gw-2", wall, mono_s=9_000.0)
    one.attempt("a", False)
    one.attempt("a", False)
    two.store.save(one.store.load())
    two.control.apply_state(one.store.load())
    # An answer while it is still out (a call sent before) ends no run.
    two.attempt("a", True)
    assert "a" in two.store.load().ejections
    for gw in (one, two):
        gw.clock.now_s += 1.0
    wall.now_s += 1.0
    two.fleet.record_probe("a", two.clock(), {"m": INFO})
    two.attempt("a", True)
    assert two.fleet.backends["a"].ejections == 0
    assert "a" not in two.store.load().ejections
    # The next run starts from the base time again, on either gateway.
    one.control.apply_state(two.store.load())
    one.fleet.record_probe("a", one.clock(), {"m": INFO})
    one.attempt("a", True)
    one.attempt("a", False)
    one.attempt("a", False)
    assert one.store.load().ejections["a"].count == 1


def test_past_the_maximum_share_the_earliest_made_ejections_apply() -> None:
    wall = Clock(1_700_000_000.0)
    two = Gateway("gw-2", wall, mono_s=0.0)
    state = ControlState(
        ejections={
            "c": ejection(wall.now_s + 5.0, by="gw-3", at_s=wall.now_s - 0.1),
            "a": ejection(wall.now_s + 9.0, by="gw-1", at_s=wall.now_s - 0.3),
            "b": ejection(wall.now_s + 1.0, by="gw-1", at_s=wall.now_s - 0.2),
        }
    )
    two.control.apply_state(state)
    out = {n for n, b in two.fleet.backends.items() if b.status == "ejected"}
    assert out == {"a", "b"}
    assert "the most the fleet may eject are out" in two.fleet.backends["c"].last_error
    # Once one has ended and its backend is back, the next change of the state applies it.
    wall.now_s += 1.0
    two.clock.now_s += 1.0
    two.fleet.record_probe("b", two.clock(), {"m": INFO})
    two.control.apply_state(state.with_drained("d", True))
    assert two.fleet.backends["c"].status == "ejected"


def test_a_local_store_shares_nothing() -> None:
    wall = Clock(1_700_000_000.0)
    alone = Gateway("gw-1", wall, mono_s=0.0, store=MemoryStateStore())
    alone.attempt("a", False)
    alone.attempt("a", False)
    assert alone.fleet.backends["a"].status == "ejected"
    assert alone.fleet.on_ejection is None and alone.store.load().ejections == {}
