"""Dynamic batching for one served model.

Requests wait in a queue; one consumer takes every request already waiting
(up to `max_batch_size` rows, waiting at most `max_queue_delay_s` for more),
concatenates those whose non-batch dimensions agree, runs them as one call on
the runtime in a worker thread, and splits the outputs back. While one batch
runs, the next one gathers, so batches grow with load and a lone request waits
for nobody. A batch that fails is retried one request at a time, so one bad
request never fails its neighbours.

Waiting requests are taken by priority, as Triton's request parameter `priority`
orders its scheduler's queue: a lower non-zero value first, and 0 (the default,
or no priority) after every explicit level. Within a level, earliest deadline
first: a request may say by when it is due with `switchyard_due_us` (microseconds
from its arrival; the gateway sends what is left of the request's SLA), and those
that do not say come after those that do; arrival order among equals.

Arrays in, arrays out: imports no grpc, no protobuf and nothing from the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from backends.protocol.parameters import priority_level
from backends.runtimes.base import Array

RunFn = Callable[[Mapping[str, Array], Sequence[str]], list[Array]]


@dataclass(slots=True)
class BatchStats:
    """Counters the statistics API reports (nanoseconds, as Triton does)."""

    executions: int = 0
    inferences: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    by_size: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Batch size -> (executions, compute ns)."""


NO_DEADLINE_NS = 2**63
"""Where a request that gives no deadline ranks within its priority level: after every
request that does."""


@dataclass(order=True, slots=True)
class _Pending:
    level: int
    due_ns: int
    seq: int
    inputs: dict[str, Array] = field(compare=False)
    rows: int = field(compare=False)
    key: tuple[tuple[str, tuple[int, ...]], ...] = field(compare=False)
    enqueued_ns: int = field(compare=False)
    future: asyncio.Future[list[Array]] = field(compare=False)


class Batcher:
    """Runs inference for one model, batching concurrent requests when it can."""

    def __init__(
        self,
        run: RunFn,
        executor: Executor,
        output_names: Sequence[str],
        max_batch_size: int,
        max_queue_delay_s: float = 0.0,
    ) -> None:
        self._run = run
        self._executor = executor
        self._outputs = list(output_names)
        self._max_rows = max(1, max_batch_size)
        self._batching = max_batch_size > 0
        self._delay_s = max_queue_delay_s
        self._queue: asyncio.PriorityQueue[_Pending] = asyncio.PriorityQueue()
        self._seq = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self.stats = BatchStats()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._consume())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def infer(
        self, inputs: dict[str, Array], rows: int, priority: int = 0, due_us: int | None = None
    ) -> dict[str, Array]:
        """Runs one request (`priority` as Triton's, due `due_us` microseconds from now
        or None: see the module); returns every output by name."""
        key = tuple(sorted((name, tuple(a.shape[1:])) for name, a in inputs.items()))
        future: asyncio.Future[list[Array]] = asyncio.get_running_loop().create_future()
        now_ns = time.perf_counter_ns()
        pending = _Pending(
            priority_level(priority),
            NO_DEADLINE_NS if due_us is None else now_ns + due_us * 1000,
            next(self._seq),
            inputs,
            rows,
            key,
            now_ns,
            future,
        )
        self._queue.put_nowait(pending)
        arrays = await future
        return dict(zip(self._outputs, arrays, strict=True))

    async def _next_batch(self) -> list[_Pending]:
        first = await self._queue.get()
        batch = [first]
        if not self._batching:
            return batch
        rows = first.rows
        deadline = time.perf_counter() + self._delay_s
        while rows < self._max_rows:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if item.future.done():  # the caller went away
                continue
            if item.key != first.key or rows + item.rows > self._max_rows:
                self._queue.put_nowait(item)  # keeps its place: level, deadline, arrival
                break
            batch.append(item)
            rows += item.rows
        return batch

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [p for p in await self._next_batch() if not p.future.done()]
            if not batch:
                continue
            start_ns = time.perf_counter_ns()
            for pending in batch:
                self.stats.queue_ns += start_ns - pending.enqueued_ns
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, batch)
            except Exception as exc:  # delivered to the callers, never kills the loop
                if len(batch) == 1:
                    _deliver(batch[0].future, exc)
                    continue
                for pending in batch:  # isolate the culprit
                    try:
                        single = await loop.run_in_executor(
                            self._executor, self._run_batch, [pending]
                        )
                        _deliver(pending.future, single[0])
                    except Exception as single_exc:
                        _deliver(pending.future, single_exc)
                continue
            elapsed_ns = time.perf_counter_ns() - start_ns
            size = sum(p.rows for p in batch)
            self.stats.executions += 1
            self.stats.inferences += size
            self.stats.compute_ns += elapsed_ns
            count, total = self.stats.by_size.get(size, (0, 0))
            self.stats.by_size[size] = (count + 1, total + elapsed_ns)
            for pending, result in zip(batch, results, strict=True):
                _deliver(pending.future, result)

    def _run_batch(self, batch: list[_Pending]) -> list[list[Array]]:
        """Runs in a worker thread: one runtime call for the whole batch."""
        if len(batch) == 1:
            return [self._run(batch[0].inputs, self._outputs)]
        names = batch[0].inputs.keys()
        merged = {name: np.concatenate([p.inputs[name] for p in batch]) for name in names}
        outputs = self._run(merged, self._outputs)
        split: list[list[Array]] = []
        offset = 0
        for pending in batch:
            split.append([out[offset : offset + pending.rows] for out in outputs])
            offset += pending.rows
        return split


def _deliver(future: asyncio.Future[list[Array]], result: list[Array] | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
