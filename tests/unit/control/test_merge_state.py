"""merge_state: a gateway's changes from the state it last read, made on the state
stored now, value by value (a price, a drain, the policies, the routing rule), so that
another gateway's change of something else stands."""

from __future__ import annotations

import pytest

from gateway.config import PoliciesSettings
from gateway.control.state import (
    ControlState,
    PoliciesOverride,
    PriceOverride,
    decode_state,
    encode_state,
    merge_state,
)


def price(usd: float) -> PriceOverride:
    return PriceOverride(usd, 0.04, 100.0)


BASE = ControlState(prices={"a": price(1.0)}, drained=frozenset({"x"}), routing="switchyard")
POLICIES = PoliciesOverride(
    PoliciesSettings.model_validate({"default": {"latency_ms": 5}}), PoliciesSettings()
)

CASES = [
    # (what, stored now, mine (BASE with my change), expected)
    (
        "my price beside their drain",
        BASE.with_drained("y", True),
        BASE.with_price("b", price(2.0)),
        BASE.with_drained("y", True).with_price("b", price(2.0)),
    ),
    (
        "my removed price beside their new one",
        BASE.with_price("c", price(3.0)),
        BASE.with_price("a", None),
        ControlState(prices={"c": price(3.0)}, drained=frozenset({"x"}), routing="switchyard"),
    ),
    (
        "my undrain beside their drain",
        BASE.with_drained("y", True),
        BASE.with_drained("x", False),
        BASE.with_drained("y", True).with_drained("x", False),
    ),
    (
        "the same price: mine, written later, wins",
        BASE.with_price("a", price(5.0)),
        BASE.with_price("a", price(7.0)),
        BASE.with_price("a", price(7.0)),
    ),
    (
        "their price left alone when I changed only the routing",
        BASE.with_price("a", price(5.0)),
        ControlState(prices=BASE.prices, drained=BASE.drained, routing="cheapest-only"),
        ControlState(prices={"a": price(5.0)}, drained=BASE.drained, routing="cheapest-only"),
    ),
    (
        "my policies beside their schedule price",
        BASE.with_scheduled("a", 0.5),
        ControlState(
            prices=BASE.prices, drained=BASE.drained, routing="switchyard", policies=POLICIES
        ),
        ControlState(
            prices=BASE.prices,
            drained=BASE.drained,
            routing="switchyard",
            policies=POLICIES,
            scheduled={"a": 0.5},
        ),
    ),
    (
        "no change of mine: theirs as stored",
        BASE.with_drained("z", True),
        BASE,
        BASE.with_drained("z", True),
    ),
    (
        "a store that lost everything gets my change only",
        ControlState(),
        BASE.with_price("b", price(2.0)),
        ControlState(prices={"b": price(2.0)}),
    ),
]


@pytest.mark.parametrize(("what", "stored", "mine", "expected"), CASES, ids=[c[0] for c in CASES])
def test_merge(what: str, stored: ControlState, mine: ControlState, expected: ControlState) -> None:
    assert merge_state(stored, BASE, mine) == expected


def test_against_an_empty_base_everything_known_is_written() -> None:
    mine = BASE.with_scheduled("b", 0.3)
    assert merge_state(ControlState(), ControlState(), mine) == mine


def test_schedule_prices_survive_encoding() -> None:
    state = BASE.with_scheduled("b", 0.25)
    assert decode_state(encode_state(state), "test") == state
    assert "scheduled" not in encode_state(BASE)
