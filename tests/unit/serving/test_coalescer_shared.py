"""The coalescer on a backend other gateways send to as well (`BackendState.shared`):
each request goes at once, beside this gateway's call in flight, rather than held here
to merge while the others' requests reach the backend's queue first. On an unshared
backend the second request still waits for the call in flight and merges with the
third. A fake `send`, held by an asyncio Event; the clock is the test's."""

from __future__ import annotations

import asyncio

import numpy as np

from backends.protocol.load import BUCKETS, LoadReport
from gateway.routing.fleet import SHARED_WINDOW_S, BackendState, Route
from gateway.serving.coalescer import Coalescer
from protos import inference_pb2 as pb
from tests.unit.serving.test_coalescer import INFO, header, request


class Backend:
    """A fake `send`: records each call's request ids and rows, holds every call until
    `release` is set, answers each row with its first input value."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls: list[tuple[str, int]] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def send(self, _route: Route, raw: bytes, _timeout_s: float | None) -> bytes:
        parsed = pb.ModelInferRequest.FromString(raw)
        rows = parsed.inputs[0].shape[0]
        self.calls.append((parsed.id, rows))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.release.wait()
        finally:
            self.in_flight -= 1
        values = np.frombuffer(parsed.raw_input_contents[0], np.float32)[::2].astype(np.int64)
        reply = pb.ModelInferResponse(model_name="m", id=parsed.id)
        reply.outputs.add(name="y", datatype="INT64", shape=[rows])
        reply.raw_output_contents.append(values.tobytes())
        return reply.SerializeToString()


class Clock:
    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def backend_route() -> Route:
    return Route(BackendState("b", "addr", "cpu", 1.0), "m", "v", True)


def others_waiting(seq: int) -> LoadReport:
    """A load report showing one other caller's request waiting (2 ms of work)."""
    return LoadReport(seq, 1, 0, 0, ((0, 0),) * (BUCKETS - 1) + ((1, 2000),))


async def three_requests(route: Route, clock: Clock) -> tuple[Backend, Coalescer, list[int]]:
    """Three one-row requests on `route` (limit 1 call in flight): the calls the backend
    holds once all three have been given to the coalescer, and what each got back."""
    backend = Backend()
    coalescer = Coalescer(backend.send, clock, limit=1)
    tasks = []
    for start, rid in ((1.0, "a"), (2.0, "b"), (3.0, "c")):
        r = request(1, start, rid)
        tasks.append(
            asyncio.create_task(coalescer.call(route, r.SerializeToString(), header(r), INFO, None))
        )
        for _ in range(5):  # it reaches the backend, or waits in the coalescer
            await asyncio.sleep(0)
    held = len(backend.calls)
    backend.release.set()
    replies = [pb.ModelInferResponse.FromString(reply) for reply in await asyncio.gather(*tasks)]
    values = [int(np.frombuffer(r.raw_output_contents[0], np.int64)[0]) for r in replies]
    assert [r.id for r in replies] == ["a", "b", "c"]
    return backend, coalescer, [held, *values]


async def test_an_unshared_backend_gets_one_call_and_the_rest_merge_behind_it() -> None:
    backend, coalescer, (held, *values) = await three_requests(backend_route(), Clock(1.0))
    assert held == 1  # "b" and "c" wait behind "a"'s call
    assert values == [1, 2, 3]
    assert backend.calls[0] == ("a", 1) and backend.calls[1][1] == 2  # then one of two rows
    assert coalescer.merged_calls == 1 and backend.most_in_flight == 1


async def test_a_shared_backend_gets_every_request_at_once() -> None:
    route = backend_route()
    assert route.state.record_report(others_waiting(1), 1.0)
    assert route.state.shared(1.0)
    backend, coalescer, (held, *values) = await three_requests(route, Clock(1.0))
    assert held == 3  # none held here: three calls in flight
    assert values == [1, 2, 3]
    assert backend.calls == [("a", 1), ("b", 1), ("c", 1)]
    assert coalescer.merged_calls == 0 and backend.most_in_flight == 3


async def test_a_backend_shared_only_with_this_gateways_own_group_still_merges() -> None:
    """The others a report shows are the requests of this gateway's own `--processes`
    group (its group figure says none come from outside it): requests are held behind
    the call in flight and merge, as on an unshared backend."""
    route = backend_route()
    siblings = LoadReport(1, 1, 0, 0, ((0, 0),) * (BUCKETS - 1) + ((1, 2000),), foreign=0)
    assert route.state.record_report(siblings, 1.0)
    assert route.state.shared(1.0) and not route.state.shared_outside_group(1.0)
    backend, coalescer, (held, *values) = await three_requests(route, Clock(1.0))
    assert held == 1 and values == [1, 2, 3]
    assert coalescer.merged_calls == 1 and backend.most_in_flight == 1


async def test_once_no_report_shows_others_for_a_while_requests_are_held_again() -> None:
    route = backend_route()
    route.state.record_report(others_waiting(1), 1.0)
    later = Clock(1.0 + SHARED_WINDOW_S)
    assert not route.state.shared(later())
    backend, coalescer, (held, *_) = await three_requests(route, later)
    assert held == 1 and coalescer.merged_calls == 1 and backend.most_in_flight == 1
