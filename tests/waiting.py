"""Waiting for a state, not for a time: a test polls what it can observe until it holds,
and fails naming what never came. How long something takes on a busy machine is then
never what a test asserts."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

DEFAULT_TIMEOUT_S = 10.0


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    what: str = "the condition",
    interval_s: float = 0.01,
) -> None:
    """Returns once `predicate()` (a plain or an async callable) is true; AssertionError
    naming `what` when it is still false after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"still waiting after {timeout_s:g} s for {what}")
        await asyncio.sleep(interval_s)


def wait_until_blocking(
    predicate: Callable[[], bool],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    what: str = "the condition",
    interval_s: float = 0.05,
) -> None:
    """`wait_until` for tests without an event loop (driving processes from threads)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {timeout_s:g} s for {what}")
        time.sleep(interval_s)
