"""The control plane over a state store: what the admin API changes is kept, what is
kept is restored over the fleet file, and the last change wins between the admin API,
the fleet file and the price schedule. A fake wall clock; the memory and file stores."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from backends.protocol.errors import InvalidInput, Unavailable
from gateway.config import BackendSettings, FleetConfig, PoliciesSettings, parse_fleet
from gateway.control.plane import Control, PriceChange, schedule_position
from gateway.control.state import (
    CarbonFigures,
    ControlState,
    FileStateStore,
    MemoryStateStore,
    PriceOverride,
    StateStore,
)
from gateway.routing.fleet import BackendState, FleetState
from gateway.routing.policy import PolicyBook
from gateway.routing.router import Chooser, choose
from gateway.serving.metrics import GatewayMetrics

FLEET = """
backends:
  - {name: a, address: 127.0.0.1:9101, price_usd_per_hour: 0.1}
  - {name: b, address: 127.0.0.1:9102, price_usd_per_hour: 0.3}
policies:
  default: {latency_ms: 100}
"""


class Clock:
    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def state_of(backend: BackendSettings) -> BackendState:
    assert backend.address is not None  # every backend here has an address
    return BackendState(
        backend.name, backend.address, backend.hardware_class, backend.price_usd_per_hour
    )


class Plane:
    """A Control over a fleet, with what it installs in the servicer in view."""

    def __init__(self, config: FleetConfig, store: StateStore, clock: Clock) -> None:
        self.fleet = FleetState(state_of(b) for b in config.backends)
        self.book = PolicyBook(config.policies)
        self.chooser: Chooser = choose
        self.control = Control(
            self.fleet,
            GatewayMetrics(CollectorRegistry()),
            lambda: self.book,
            self._set_book,
            set_chooser=self._set_chooser,
            config=config,
            wall_clock=clock,
            store=store,
        )

    def _set_book(self, book: PolicyBook) -> None:
        self.book = book

    def _set_chooser(self, chooser: Chooser) -> None:
        self.chooser = chooser

    def price(self, backend: str) -> float:
        return self.fleet.backends[backend].price_usd_per_hour


def fleet(text: str = FLEET) -> FleetConfig:
    return parse_fleet(text, Path("."))


def started(config: FleetConfig, store: StateStore, clock: Clock) -> Plane:
    plane = Plane(config, store, clock)
    plane.control.restore()
    return plane


def test_admin_changes_are_kept_and_restored_over_the_fleet_file(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    store = FileStateStore(tmp_path / "state.json")
    first = started(fleet(), store, clock)
    first.control.override_price("a", 0.9)
    first.control.set_drained("b", True)
    first.control.set_routing("least-loaded", "admin API")
    gold = PoliciesSettings.model_validate({"default": {"latency_ms": 5}})
    first.control.override_policies(gold)

    second = started(fleet(), FileStateStore(tmp_path / "state.json"), clock)
    assert second.price("a") == 0.9
    assert second.price("b") == 0.3
    assert second.fleet.backends["b"].drained
    assert not second.fleet.backends["a"].drained
    assert second.control.routing == "least-loaded"
    assert second.chooser is not choose
    assert second.book.settings == gold

    second.control.set_drained("b", False)
    second.control.set_routing("switchyard", "admin API")
    third = started(fleet(), store, clock)
    assert not third.fleet.backends["b"].drained
    assert third.chooser is choose


def test_a_fleet_file_edit_made_since_the_admin_change_wins_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="switchyard.control")
    clock = Clock(1000.0)
    store = MemoryStateStore()
    first = started(fleet(), store, clock)
    first.control.override_price("a", 0.9)
    first.control.override_price("b", 0.7)
    first.control.override_policies(PoliciesSettings.model_validate({"default": {"latency_ms": 5}}))
    edited = fleet(
        FLEET.replace("price_usd_per_hour: 0.1", "price_usd_per_hour: 0.2").replace(
            "latency_ms: 100", "latency_ms: 70"
        )
    )
    second = started(edited, store, clock)
    assert second.price("a") == 0.2
    assert second.price("b") == 0.7
    assert second.book.settings == edited.policies
    assert "the fleet file changed a's price since the admin API set it" in caplog.text
    assert "the fleet file changed its policies since the admin API set them" in caplog.text
    assert set(store.load().prices) == {"b"} and store.load().policies is None


def test_a_live_fleet_file_edit_replaces_the_admin_price_in_the_store() -> None:
    store = MemoryStateStore()
    plane = started(fleet(), store, Clock(1000.0))
    plane.control.override_price("a", 0.9)
    plane.control.override_price("b", 0.8)
    edited = fleet(FLEET.replace("price_usd_per_hour: 0.1", "price_usd_per_hour: 0.2"))
    plane.control.apply_fleet(plane.control.config, edited, "fleet file")
    assert (plane.price("a"), plane.price("b")) == (0.2, 0.8)
    assert set(store.load().prices) == {"b"}
    again = started(edited, store, Clock(2000.0))
    assert (again.price("a"), again.price("b")) == (0.2, 0.8)


def test_changes_for_backends_no_longer_in_the_fleet_are_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="switchyard.control")
    store = MemoryStateStore(
        ControlState(
            prices={"gone": PriceOverride(1.0, 0.5, 0.0), "a": PriceOverride(0.6, 0.1, 0.0)},
            drained=frozenset({"gone", "b"}),
            routing="no-such-rule",
        )
    )
    plane = started(fleet(), store, Clock(1000.0))
    assert plane.price("a") == 0.6 and plane.fleet.backends["b"].drained
    assert "dropping the changes for backends no longer in the fleet: gone" in caplog.text
    assert "routing 'no-such-rule' dropped" in caplog.text
    assert store.load() == ControlState(
        prices={"a": PriceOverride(0.6, 0.1, 0.0)}, drained=frozenset({"b"})
    )


def carbon(plane: Plane, backend: str) -> tuple[float | None, float | None]:
    state = plane.fleet.backends[backend]
    return state.carbon_g_per_kwh, state.power_w


def test_admin_carbon_figures_are_kept_in_the_file_until_a_later_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As an admin price: back after a restart; a carbon feed's figure (not kept: the
    feed is polled afresh at start) or a fleet file edit, live or made while down, is
    the later change and the admin API's figures go."""
    caplog.set_level(logging.WARNING, logger="switchyard.control")
    clock = Clock(1000.0)
    path = tmp_path / "state.json"
    first = started(fleet(), FileStateStore(path), clock)
    first.control.override_carbon("a", 50.0, 20.0)
    first.control.override_carbon("b", 70.0, 30.0)
    assert store_carbon(path) == {
        "a": CarbonFigures(50.0, 20.0, (None, None)),
        "b": CarbonFigures(70.0, 30.0, (None, None)),
    }

    second = started(fleet(), FileStateStore(path), clock)
    assert (carbon(second, "a"), carbon(second, "b")) == ((50.0, 20.0), (70.0, 30.0))
    second.control.set_carbon("b", 10.0, 30.0, "feed grid")
    assert carbon(second, "b") == (10.0, 30.0) and set(store_carbon(path)) == {"a"}

    third = started(fleet(), FileStateStore(path), clock)
    assert (carbon(third, "a"), carbon(third, "b")) == ((50.0, 20.0), (None, None))
    edited = fleet(FLEET.replace("0.1}", "0.1, carbon_g_per_kwh: 400, power_w: 25}"))
    fourth = started(edited, FileStateStore(path), clock)
    assert carbon(fourth, "a") != (50.0, 20.0) and store_carbon(path) == {}
    assert "the fleet file changed a's carbon figures since the admin API set them" in caplog.text

    fourth.control.override_carbon("b", 5.0, 10.0)
    fourth.control.apply_fleet(
        edited, fleet(FLEET.replace("0.3}", "0.3, carbon_g_per_kwh: 9, power_w: 9}")), "fleet"
    )
    assert carbon(fourth, "b") == (9.0, 9.0) and store_carbon(path) == {}


def store_carbon(path: Path) -> dict[str, CarbonFigures]:
    return dict(FileStateStore(path).load().carbon)


class SharedMemory(MemoryStateStore):
    @property
    def shared(self) -> bool:
        return True


def test_a_shared_stores_admin_carbon_figures_carry_no_fleet_figures() -> None:
    """Their format in the store has no room for them (older gateways read it)."""
    store = SharedMemory()
    plane = started(fleet(), store, Clock(1000.0))
    plane.control.override_carbon("a", 50.0, 20.0)
    plane.control.set_carbon("b", 10.0, 30.0, "feed grid")
    assert store.load().carbon == {
        "a": CarbonFigures(50.0, 20.0),
        "b": CarbonFigures(10.0, 30.0),
    }


class BrokenStore(MemoryStateStore):
    def save(self, state: ControlState) -> None:
        raise Unavailable("cannot save the gateway's state file /x: read-only file system")


def test_an_admin_change_that_cannot_be_kept_is_not_made() -> None:
    plane = started(fleet(), BrokenStore(), Clock(1000.0))
    with pytest.raises(Unavailable, match="read-only file system; the change was not made"):
        plane.control.override_price("a", 0.9)
    with pytest.raises(Unavailable):
        plane.control.set_drained("a", True)
    with pytest.raises(Unavailable):
        plane.control.override_carbon("a", 5.0, 5.0)
    assert plane.price("a") == 0.1 and not plane.fleet.backends["a"].drained
    assert carbon(plane, "a") == (None, None)


@pytest.mark.parametrize("price", [float("nan"), float("inf"), float("-inf"), -0.5])
def test_a_price_that_is_not_finite_and_non_negative_is_refused(price: float) -> None:
    store = MemoryStateStore()
    plane = started(fleet(), store, Clock(1000.0))
    with pytest.raises(InvalidInput, match="usd_per_hour must"):
        plane.control.override_price("a", price)
    with pytest.raises(InvalidInput, match="usd_per_hour must"):
        plane.control.set_price("a", price, "price schedule")
    assert plane.price("a") == 0.1 and store.load() == ControlState()


SCHEDULE = [
    PriceChange(0.0, "a", 0.5),
    PriceChange(10.0, "b", 0.2),
    PriceChange(20.0, "a", 0.9),
    PriceChange(30.0, "b", 0.4),
]


@pytest.mark.parametrize(
    ("elapsed_s", "loop", "within_s", "due", "in_force"),
    [
        (0.0, False, 0.0, 1, {"a": (0.5, 0.0)}),
        (15.0, False, 15.0, 2, {"a": (0.5, 15.0), "b": (0.2, 5.0)}),
        (1000.0, False, 1000.0, 4, {"a": (0.9, 980.0), "b": (0.4, 970.0)}),
        # Looping: a pass lasts the last offset (30 s); 65 s is 5 s into the third.
        (65.0, True, 5.0, 1, {"a": (0.5, 5.0), "b": (0.4, 5.0)}),
        (75.0, True, 15.0, 2, {"a": (0.5, 15.0), "b": (0.2, 5.0)}),
        (29.0, True, 29.0, 3, {"a": (0.9, 9.0), "b": (0.2, 19.0)}),
    ],
)
def test_schedule_position(
    elapsed_s: float,
    loop: bool,
    within_s: float,
    due: int,
    in_force: dict[str, tuple[float, float]],
) -> None:
    position = schedule_position(SCHEDULE, elapsed_s, loop)
    assert position.pass_elapsed_s == within_s
    assert position.due == due
    assert {b: (c.usd_per_hour, ago) for b, (c, ago) in position.in_force.items()} == in_force


def test_the_schedule_resumes_at_its_wall_clock_offset_after_a_restart() -> None:
    clock = Clock(1000.0)
    store = MemoryStateStore()
    config = fleet(FLEET + "gateway: {price_schedule: prices.csv}\n")
    first = started(config, store, clock)
    assert first.control.schedule_elapsed_s() == 0.0
    assert store.load().schedule_start_s == 1000.0

    clock.now_s = 1025.0
    second = started(config, store, clock)
    elapsed = second.control.schedule_elapsed_s()
    assert elapsed == 25.0
    second.control.resume_prices(schedule_position(SCHEDULE, elapsed, False))
    assert (second.price("a"), second.price("b")) == (0.9, 0.2)


def test_an_admin_price_set_after_the_step_in_force_survives_the_resume() -> None:
    """a's step came due at 20 s (1020), b's at 10 s (1010); a was set through the
    admin API at 1022 and b at 1005: a keeps its admin price, b takes the schedule's."""
    clock = Clock(1000.0)
    config = fleet(FLEET + "gateway: {price_schedule: prices.csv}\n")
    store = MemoryStateStore()
    started(config, store, clock).control.schedule_elapsed_s()
    clock.now_s = 1005.0
    started(config, store, clock).control.override_price("b", 0.05)
    clock.now_s = 1022.0
    started(config, store, clock).control.override_price("a", 0.01)
    clock.now_s = 1025.0
    plane = started(config, store, clock)
    plane.control.resume_prices(
        schedule_position(SCHEDULE, plane.control.schedule_elapsed_s(), False)
    )
    assert (plane.price("a"), plane.price("b")) == (0.01, 0.2)
    assert set(store.load().prices) == {"a"}


def test_a_fleet_without_a_schedule_forgets_its_start() -> None:
    store = MemoryStateStore(replace(ControlState(), schedule_start_s=5.0))
    started(fleet(), store, Clock(1000.0))
    assert store.load().schedule_start_s is None


def test_a_kept_start_in_the_future_starts_the_schedule_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="switchyard.control")
    config = fleet(FLEET + "gateway: {price_schedule: prices.csv}\n")
    store = MemoryStateStore(replace(ControlState(), schedule_start_s=5000.0))
    plane = started(config, store, Clock(1000.0))
    assert plane.control.schedule_elapsed_s() == 0.0
    assert store.load().schedule_start_s == 1000.0
    assert "starting it again now" in caplog.text
