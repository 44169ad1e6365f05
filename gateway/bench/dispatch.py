"""The dispatcher's own cost a request, its first attempt awaited in the request's task
against sent in a task of its own, side by side on one event loop (uvloop):

    python -m gateway.bench.dispatch [--requests 20000] [--rounds 7]

Each request is routed on one route, run by `Dispatcher.run` and answered by a transport
whose call answers one turn of the loop later (as the stream reader's answer comes); the
two transports differ only in whether they offer `inline`. Prints the median microseconds
a request over the rounds, which take turns. What it leaves out: gRPC, the router's
choice among routes, metrics: the rest of a request's way through the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Coroutine, Sequence
from typing import Any

import uvloop

from gateway.routing.fleet import BackendState, Route
from gateway.routing.router import RouteRequest, choose
from gateway.routing.sla import Policy
from gateway.serving.dispatch import Attempt, Dispatcher, Job, LoopTimers


class TaskTransport:
    """Each attempt's call in a task of its own; it answers a loop turn later."""

    def __init__(self) -> None:
        self.dispatcher: Dispatcher | None = None

    def send(self, attempt: Attempt) -> None:
        attempt.call = asyncio.ensure_future(self._call(attempt))

    def cancel(self, attempt: Attempt) -> None:
        call: asyncio.Future[None] | None = attempt.call
        if call is not None:
            call.cancel()

    async def _call(self, attempt: Attempt) -> None:
        assert self.dispatcher is not None
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[bytes] = loop.create_future()
        loop.call_soon(answer.set_result, b"answer")
        reply = await answer
        self.dispatcher.answered(attempt, reply, 1.0, self.dispatcher.timers.now())


class InlineTransport(TaskTransport):
    """The same call, offered to run in the request's own task."""

    def inline(self, attempt: Attempt) -> Coroutine[Any, Any, None]:
        return self._call(attempt)


def one_route() -> Route:
    state = BackendState("bench", "127.0.0.1:1", "cpu", 0.1, slots=1_000_000)
    state.healthy = True
    state.refresh()
    route = Route(state, "m", "v", True)
    route.estimate.seed(1.0, 2.0)
    return route


async def per_request_us(transport: TaskTransport, requests: int) -> float:
    timers = LoopTimers(time.monotonic)
    dispatcher = Dispatcher(transport, timers)
    transport.dispatcher = dispatcher
    route = one_route()
    request = RouteRequest("m")
    policy = Policy(latency_ms=10)
    started = time.perf_counter()
    for _ in range(requests):
        now = timers.now()
        decision = choose(request, [route], policy, now)
        job = Job(decision, policy, request, [route], choose, now)
        await dispatcher.run(job, now)
    return (time.perf_counter() - started) / requests * 1e6


async def measure(requests: int, rounds: int) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {"own task": [], "request's task": []}
    for _ in range(rounds):
        figures["own task"].append(await per_request_us(TaskTransport(), requests))
        figures["request's task"].append(await per_request_us(InlineTransport(), requests))
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    figures = uvloop.run(measure(args.requests, args.rounds))
    for name, values in figures.items():
        shown = ", ".join(f"{v:.1f}" for v in values)
        print(f"first attempt in its {name}: {statistics.median(values):.1f} us ({shown})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
