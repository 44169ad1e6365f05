"""`python -m gateway.bench.dispatch`: both transports run every request to its answer,
and only the inline one spares the first attempt a task of its own."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from gateway.bench import dispatch
from gateway.serving.dispatch import Attempt


async def test_each_transport_answers_every_request_and_only_one_makes_tasks() -> None:
    made: dict[str, int] = {}
    for name, transport in (
        ("task", dispatch.TaskTransport()),
        ("inline", dispatch.InlineTransport()),
    ):
        sent = 0
        send = transport.send

        def counting(attempt: Attempt, send: Callable[[Attempt], None] = send) -> None:
            nonlocal sent
            sent += 1
            send(attempt)

        transport.send = counting  # type: ignore[method-assign]
        assert await dispatch.per_request_us(transport, 50) > 0
        made[name] = sent
    assert made == {"task": 50, "inline": 0}


def test_the_command_prints_both_figures(capsys: pytest.CaptureFixture[str]) -> None:
    assert dispatch.main(["--requests", "20", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "first attempt in its own task:" in out
    assert "first attempt in its request's task:" in out
