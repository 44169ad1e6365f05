"""The live share checks: a backend's share of the OK answers in a window, held to the
scenario's bounds; a check that should fail does, and an empty window fails."""

from __future__ import annotations

import pytest

from gateway.loadtest.load import backend_share, share_checks
from gateway.sim.scenario import ShareCheck
from tests.unit.loadtest.test_loadreport import price_change_records


def test_backend_share_counts_ok_answers_of_every_route_of_the_backend() -> None:
    records = price_change_records()  # small only for 5 s, then 4 in 5 on big
    assert backend_share(records, "big-cpu", 0.0, 5.0) == 0.0
    assert backend_share(records, "big-cpu", 5.0, 7.0) == pytest.approx(0.8)
    assert backend_share(records, "small-cpu", 5.0, 7.0) == pytest.approx(0.2)
    assert backend_share(records, "big-cpu", 7.0, 8.0) is None  # every answer failed


@pytest.mark.parametrize(
    ("check", "passed", "detail"),
    [
        (ShareCheck(backend="big-cpu", from_s=0, to_s=5, max_share=0.0), True, "0.0%"),
        (ShareCheck(backend="big-cpu", from_s=0, to_s=5, min_share=0.03), False, "0.0%"),
        (ShareCheck(backend="big-cpu", from_s=5, to_s=7, min_share=0.5), True, "80.0%"),
        (ShareCheck(backend="big-cpu", from_s=5, to_s=7, max_share=0.5), False, "80.0%"),
        (
            ShareCheck(backend="big-cpu", from_s=5, to_s=7, min_share=0.1, max_share=0.7),
            False,
            "80.0%",
        ),
        (
            ShareCheck(backend="big-cpu", from_s=7, to_s=8, min_share=0.1),
            False,
            "no answers in the window",
        ),
    ],
)
def test_share_checks(check: ShareCheck, passed: bool, detail: str) -> None:
    ((name, ok, said),) = share_checks(price_change_records(), [check])
    assert name.startswith(f"big-cpu share {check.from_s:g}-{check.to_s:g} s")
    assert (ok, said) == (passed, detail)
