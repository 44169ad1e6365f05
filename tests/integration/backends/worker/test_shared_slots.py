"""A worker's batchers share its inference slots (backends.worker.batching.Slots): at
most that many batches run at once across its models and variants; a slot that frees
goes to the formed batch ranked first among them all (priority level, then due time);
a request cancelled while its batch waits for a slot neither runs nor keeps the slot;
a batch formed and waiting for a slot counts as waiting in load reports. Real batchers
over run functions that record what ran and may be held at a gate, in an executor with
threads to spare; and a real worker with emulated latency: no merging, and its variants
run one at a time on its one thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np

from backends.protocol.load import BUCKETS, DUE_EDGES_MS
from backends.runtimes.base import Array
from backends.worker.batching import Batcher, RunFn, Slots
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.integration.conftest import GATE_TIMEOUT_S, launch_worker, raw_request, samples
from tests.waiting import wait_until

EDGES_NS = [int(edge_ms * 1e6) for edge_ms in DUE_EDGES_MS]


class Clock:
    """Nanoseconds that move only when the test (or a run) says."""

    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


class Runs:
    """The run functions of several batchers, keeping one record: which batcher's run
    started in what order (with its first input value), and the most running at once.
    A run whose gate is closed waits at it in its thread until the test opens it; a run
    with a cost in `cost_ns` moves `clock` on by that much."""

    def __init__(self, clock: Clock | None = None) -> None:
        self._lock = threading.Lock()
        self._gates: dict[str, threading.Event] = {}
        self._clock = clock
        self.cost_ns: dict[str, int] = {}
        self.active = 0
        self.most = 0
        self.started: list[tuple[str, float]] = []

    def run(self, name: str, closed: bool = False) -> RunFn:
        gate = threading.Event()
        if not closed:
            gate.set()
        self._gates[name] = gate

        def run(inputs: Mapping[str, Array], outputs: Sequence[str]) -> list[Array]:
            with self._lock:
                self.active += 1
                self.most = max(self.most, self.active)
                self.started.append((name, float(inputs["x"][0, 0])))
            try:
                if not gate.wait(GATE_TIMEOUT_S):
                    raise TimeoutError(f"the gate of {name} stayed closed")
                if self._clock is not None:
                    self._clock.ns += self.cost_ns.get(name, 0)
                return [inputs["x"] * 2]
            finally:
                with self._lock:
                    self.active -= 1

        return run

    def holding(self, name: str) -> bool:
        """`name`'s run has started and waits at its closed gate."""
        return any(n == name for n, _ in self.started) and not self._gates[name].is_set()

    def open(self, name: str) -> None:
        self._gates[name].set()

    def close(self, name: str) -> None:
        self._gates[name].clear()

    def open_all(self) -> None:
        for gate in self._gates.values():
            gate.set()

    def names(self) -> list[str]:
        return [name for name, _ in self.started]


def row(value: float) -> dict[str, Array]:
    return {"x": np.full((1, 2), value, dtype=np.float32)}


@asynccontextmanager
async def batchers(
    runs: Runs,
    slots: Slots,
    specs: Mapping[str, bool],
    clock: Clock | None = None,
    max_batch_size: int = 1,
    max_queue_delay_s: float = 0.0,
) -> AsyncIterator[dict[str, Batcher]]:
    """A started batcher per name of `specs` (its gate closed where True), all over
    `slots`, in an executor with a thread for each; stopped, gates open, at the end."""
    extra = {} if clock is None else {"clock_ns": clock}
    with ThreadPoolExecutor(len(specs) + 1) as executor:
        made = {
            name: Batcher(
                runs.run(name, closed),
                executor,
                ["y"],
                max_batch_size,
                max_queue_delay_s,
                name=name,
                slots=slots,
                **extra,  # type: ignore[arg-type]
            )
            for name, closed in specs.items()
        }
        for batcher in made.values():
            batcher.start()
        try:
            yield made
        finally:
            runs.open_all()
            for batcher in made.values():
                await batcher.stop()


def batches_waiting(slots: Slots, count: int) -> Callable[[], bool]:
    return lambda: slots.waiting == count


Ask = tuple[Batcher, int | None, int]
"""A request to one batcher: (the batcher, its due_us, its priority)."""


def value(answer: dict[str, Array]) -> float:
    return float(answer["y"][0, 0])


async def test_batchers_sharing_one_slot_never_run_two_batches_at_once() -> None:
    runs, slots = Runs(), Slots(1)
    async with batchers(runs, slots, {"a": True, "b": False}) as made:
        a, b = made["a"], made["b"]
        first = asyncio.create_task(a.infer(row(1), 1))
        await wait_until(lambda: runs.holding("a"), what="a's batch to run")
        second = asyncio.create_task(b.infer(row(2), 1))
        # b's batch forms and waits for the slot a's batch holds: it does not run.
        await wait_until(lambda: slots.waiting == 1 and b.waiting == 0, what="b's batch to wait")
        assert runs.names() == ["a"] and b.running == 0 and slots.free == 0
        runs.open("a")
        assert [value(r) for r in await asyncio.gather(first, second)] == [2.0, 4.0]
        assert runs.names() == ["a", "b"]

        # A burst on both: every request answered, never two runs at once.
        burst = [asyncio.create_task(m.infer(row(v), 1)) for v in range(8) for m in (a, b)]
        answers = await asyncio.gather(*burst)
        assert [value(r) for r in answers] == [2.0 * v for v in range(8) for _ in (a, b)]
        assert runs.most == 1
        assert (slots.free, slots.waiting) == (1, 0)


async def test_two_slots_let_two_batchers_run_at_once() -> None:
    runs, slots = Runs(), Slots(2)
    async with batchers(runs, slots, {"a": True, "b": True, "c": False}) as made:
        held = asyncio.create_task(made["a"].infer(row(1), 1))
        await wait_until(lambda: runs.holding("a"), what="a's batch to run")
        # The second slot is free: b's batch runs beside a's.
        beside = asyncio.create_task(made["b"].infer(row(2), 1))
        await wait_until(lambda: runs.holding("b"), what="b's batch to run beside a's")
        assert runs.most == 2 and slots.free == 0
        # Both slots held: c's batch waits for one.
        third = asyncio.create_task(made["c"].infer(row(3), 1))
        await wait_until(lambda: slots.waiting == 1, what="c's batch to wait for a slot")
        runs.open("b")
        assert value(await beside) == 4.0
        assert value(await third) == 6.0  # b's slot went to c while a still runs
        assert not held.done() and runs.holding("a")
        runs.open("a")
        assert value(await held) == 2.0
        assert runs.most == 2


async def test_a_freed_slot_goes_to_the_batch_due_first_across_batchers() -> None:
    """The batch formed first but due later waits; the one formed after it, due
    sooner, takes the slot first. A priority level ranks before any due time."""
    runs, slots, clock = Runs(), Slots(1), Clock()
    async with batchers(runs, slots, {"busy": True, "a": False, "b": False}, clock) as made:
        busy, a, b = made["busy"], made["a"], made["b"]

        async def order(first: Ask, second: Ask) -> list[str]:
            """`first`'s request, then `second`'s form their batches while `busy` holds
            the slot: the order the two run in."""
            runs.close("busy")
            runs.started.clear()
            held = asyncio.create_task(busy.infer(row(0), 1))
            await wait_until(lambda: runs.holding("busy"), what="busy's batch to run")
            calls = []
            for batcher, due_us, priority in (first, second):
                calls.append(asyncio.create_task(batcher.infer(row(1), 1, priority, due_us)))
                await wait_until(batches_waiting(slots, len(calls)), what="a batch to form")
            runs.open("busy")
            await asyncio.gather(held, *calls)
            return runs.names()[1:]

        # a's batch formed first, due in 50 ms; b's formed after, due in 10 ms.
        assert await order((a, 50_000, 0), (b, 10_000, 0)) == ["b", "a"]
        # The other way round, the same: the deadline decides, not who formed first.
        assert await order((b, 10_000, 0), (a, 50_000, 0)) == ["b", "a"]
        # An explicit priority (1) ranks before the default level, however late it is due.
        assert await order((b, 1_000, 0), (a, 500_000, 1)) == ["a", "b"]
        # Within a level a due time ranks before none; equals keep their arrival.
        assert await order((a, None, 0), (b, 900_000, 0)) == ["b", "a"]
        assert await order((b, 7_000, 0), (a, 7_000, 0)) == ["b", "a"]


async def test_a_batcher_keeps_the_slot_for_its_own_next_request_when_it_is_due_first() -> None:
    """While a's batch runs, a's next request waits in a's queue (a's one batch at a time
    is running) and b's, due later, forms and waits for the slot. When a's batch ends,
    a's next request is due first and runs next; the slots do not take turns between
    batchers."""
    runs, slots, clock = Runs(), Slots(1), Clock()
    async with batchers(runs, slots, {"a": True, "b": False}, clock) as made:
        a, b = made["a"], made["b"]
        first = asyncio.create_task(a.infer(row(1), 1, 0, 10_000))
        await wait_until(lambda: runs.holding("a"), what="a's first batch to run")
        second = asyncio.create_task(a.infer(row(2), 1, 0, 20_000))
        await wait_until(lambda: a.waiting == 1, what="a's next request to queue")
        later = asyncio.create_task(b.infer(row(3), 1, 0, 30_000))
        await wait_until(batches_waiting(slots, 1), what="b's batch to wait for the slot")
        runs.open("a")
        await asyncio.gather(first, second, later)
        assert runs.started == [("a", 1.0), ("a", 2.0), ("b", 3.0)]
        # Due after b's, a's next request gives the slot up to b's batch.
        runs.close("a")
        runs.started.clear()
        first = asyncio.create_task(a.infer(row(4), 1, 0, 10_000))
        await wait_until(lambda: runs.holding("a"), what="a's batch to run")
        second = asyncio.create_task(a.infer(row(5), 1, 0, 90_000))
        await wait_until(lambda: a.waiting == 1, what="a's next request to queue")
        sooner = asyncio.create_task(b.infer(row(6), 1, 0, 30_000))
        await wait_until(batches_waiting(slots, 1), what="b's batch to wait for the slot")
        runs.open("a")
        await asyncio.gather(first, second, sooner)
        assert runs.started == [("a", 4.0), ("b", 6.0), ("a", 5.0)]
        assert (slots.free, slots.waiting) == (1, 0)


async def test_a_request_cancelled_while_its_batch_waits_for_a_slot_never_runs() -> None:
    runs, slots = Runs(), Slots(1)
    async with batchers(runs, slots, {"busy": True, "a": False}) as made:
        busy, a = made["busy"], made["a"]
        held = asyncio.create_task(busy.infer(row(0), 1))
        await wait_until(lambda: runs.holding("busy"), what="busy's batch to run")
        gone = asyncio.create_task(a.infer(row(1), 1))
        await wait_until(lambda: slots.waiting == 1, what="a's batch to wait for the slot")
        gone.cancel()  # its caller went away
        runs.open("busy")
        assert value(await held) == 0.0
        # a's batch got the slot with nothing left to run, and gave it back.
        await wait_until(lambda: slots.free == 1, what="the slot to be free again")
        assert value(await a.infer(row(5), 1)) == 10.0
        assert runs.started == [("busy", 0.0), ("a", 5.0)]
        assert a.stats.executions == 1 and a.running == 0
        assert (slots.free, slots.waiting) == (1, 0)


async def test_a_batcher_stopped_while_it_waits_for_a_slot_loses_none() -> None:
    runs, slots = Runs(), Slots(1)
    async with batchers(runs, slots, {"busy": True, "a": False, "b": False}) as made:
        busy, a, b = made["busy"], made["a"], made["b"]
        held = asyncio.create_task(busy.infer(row(0), 1))
        await wait_until(lambda: runs.holding("busy"), what="busy's batch to run")
        stranded = asyncio.create_task(a.infer(row(1), 1))
        await wait_until(lambda: slots.waiting == 1, what="a's batch to wait for the slot")
        await a.stop()  # cancelled inside Slots.acquire
        assert slots.waiting == 0
        stranded.cancel()
        runs.open("busy")
        await held
        await wait_until(lambda: slots.free == 1, what="the slot to be free again")
        assert value(await b.infer(row(3), 1)) == 6.0
        assert runs.names() == ["busy", "b"]


async def test_a_batch_waiting_for_a_slot_counts_as_waiting_in_load_reports() -> None:
    clock = Clock()
    runs, slots = Runs(clock), Slots(1)
    runs.cost_ns["a"] = 4_000_000
    specs = {"busy": True, "a": False}
    async with batchers(runs, slots, specs, clock, max_batch_size=2, max_queue_delay_s=0.5) as made:
        busy, a = made["busy"], made["a"]
        # One execution of a's: 4 ms on the test's clock for a batch of 2.
        await asyncio.gather(a.infer(row(9), 1), a.infer(row(9), 1))  # one batch of 2
        assert a.stats.by_size == {2: (1, 4_000_000)}
        per_request_ns = 2_000_000.0

        held = asyncio.create_task(busy.infer(row(0), 1, caller="x"))
        await wait_until(lambda: runs.holding("busy"), what="busy's batch to run")
        # A batch of two forms in a (one request of g/b's, one of g/a's, due in 20 ms)
        # and waits for the slot; a third (g/b's, no due time) waits in a's queue.
        formed = [
            asyncio.create_task(a.infer(row(1), 1, due_us=20_000, caller=caller))
            for caller in ("g/b", "g/a")
        ]
        await wait_until(lambda: slots.waiting == 1 and a.waiting == 0, what="a's batch to form")
        queued = asyncio.create_task(a.infer(row(2), 1, caller="g/b"))
        await wait_until(lambda: a.waiting == 1, what="a third request to queue")
        assert a.running == 0

        def others(caller: str) -> tuple[int | None, list[int], list[float]]:
            counts, work = [0] * BUCKETS, [0.0] * BUCKETS
            ends, foreign = a.others_load(caller, clock.ns, EDGES_NS, counts, work)
            assert foreign == 0  # no group named: none counted
            return ends, counts, work

        within_25ms = DUE_EDGES_MS.index(25.0)
        # g/a's view: g/b's two, waiting (the formed one due within 25 ms, the other
        # due never); none running in a (its batch has no slot), its own left out.
        ends, counts, work = others("g/a")
        assert ends is None
        assert counts[within_25ms] == 1 and counts[-1] == 1 and sum(counts) == 2
        assert work[within_25ms] == per_request_ns and work[-1] == per_request_ns
        # g/b's view: g/a's one, waiting in the formed batch.
        ends, counts, work = others("g/b")
        assert ends is None and counts[within_25ms] == 1 and sum(counts) == 1
        # As group g's: every request waiting in a is the group's own, none foreign.
        counts = [0] * BUCKETS
        ends, foreign = a.others_load("g/a", clock.ns, EDGES_NS, counts, [0.0] * BUCKETS, "g")
        assert (ends, sum(counts), foreign) == (None, 2, 0)
        # The batch running in `busy` holds x's request: running, for any other caller,
        # and from outside group g.
        blank = [0] * BUCKETS, [0.0] * BUCKETS
        assert busy.others_load("g/a", clock.ns, EDGES_NS, *blank) == (0, 0)
        assert busy.others_load("g/a", clock.ns, EDGES_NS, *blank, "g") == (0, 1)
        queued.cancel()  # its caller leaves: nothing waits for more rows at the end
        runs.open("busy")
        answers = await asyncio.gather(held, *formed)
        assert [value(r) for r in answers] == [0.0, 2.0, 2.0]


@asynccontextmanager
async def stub_at(address: str) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def one_row(repository: Path, model: str, variant: str | None = None) -> pb.ModelInferRequest:
    inputs, _ = samples(repository, model)
    request = raw_request(
        model, {name: a[:1] for name, a in inputs.items()}, dict.fromkeys(inputs, "FP32")
    )
    if variant is not None:
        request.parameters["switchyard_variant"].string_param = variant
    return request


async def test_an_emulated_worker_runs_concurrent_requests_one_at_a_time(
    repository: Path,
) -> None:
    launched = await launch_worker(
        repository,
        threads=1,
        hardware_class="test-1c",
        models=("digits",),
        emulate_latency_ms=150.0,
    )
    try:
        served = launched.models["digits"]
        batcher = served.variants[served.default].batcher
        request = one_row(repository, "digits")
        async with stub_at(launched.address) as stub:
            first = stub.ModelInfer(request)
            await wait_until(lambda: batcher.running == 1, what="the first request to run")
            behind = [stub.ModelInfer(request) for _ in range(2)]
            # Both queue while the first runs: one batch of two, once, before.
            await wait_until(lambda: batcher.waiting == 2, what="two requests to queue")
            await asyncio.gather(first, *behind)
            stats = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="digits"))
        model = stats.model_stats[0]
        assert (model.execution_count, model.inference_count) == (3, 3)
        assert [(b.batch_size, b.compute_infer.count) for b in model.batch_stats] == [(1, 3)]
    finally:
        await launched.stop()


async def test_a_one_thread_worker_runs_its_variants_one_at_a_time(repository: Path) -> None:
    launched = await launch_worker(
        repository,
        threads=1,
        hardware_class="test-1c",
        models=("transformer",),
        emulate_latency_ms=150.0,
    )
    try:
        variants = launched.models["transformer"].variants
        assert len(variants) >= 2, f"two variants to load, loaded {sorted(variants)}"
        first, second = sorted(variants)[:2]
        running, waiting = variants[first].batcher, variants[second].batcher
        async with stub_at(launched.address) as stub:
            ran = stub.ModelInfer(one_row(repository, "transformer", first))
            await wait_until(lambda: running.running == 1, what=f"{first} to run")
            held = stub.ModelInfer(one_row(repository, "transformer", second))

            def formed() -> bool:
                """`second`'s request is taken into a batch, which waits (for the slot)."""
                counts = [0] * BUCKETS
                waiting.others_load("someone", 0, EDGES_NS, counts, [0.0] * BUCKETS)
                return waiting.waiting == 0 and sum(counts) == 1

            # The worker's one thread runs `first`'s batch: `second`'s waits, formed.
            await wait_until(formed, what=f"{second}'s batch to wait for the worker's slot")
            assert running.running == 1 and waiting.running == 0
            answers = await asyncio.gather(ran, held)
        assert [a.parameters["switchyard_variant"].string_param for a in answers] == [
            first,
            second,
        ]
        assert running.stats.executions == waiting.stats.executions == 1
    finally:
        await launched.stop()
